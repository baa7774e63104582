"""How mitmproxy's connections end outside the policy's decisions: closing one from outside its
hooks (the close hook the gate calls when a tunnel's rule stops allowing it, see
agent_egress/livetunnels.py: mitmproxy has no public call for it, so its connection handler's
task is cancelled, as its own idle timeout and shutdown do), and why a client broke off the
TLS handshake of an inspected connection."""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import ctx

log = logging.getLogger(__name__)

REASON = "agent-egress: no longer allowed"


def mitmproxy_closer(client_id: str) -> Callable[[], None]:
    def close() -> None:
        server = ctx.master.addons.get("proxyserver") if ctx.master else None
        handler = server.connections.get(client_id) if server is not None else None
        io = handler.transports.get(handler.client) if handler is not None else None
        if io is None or io.handler is None:
            return  # gone already
        io.handler.cancel(REASON)

    return close


def untrusted_ca_reason(destination: str, error: str) -> str:
    """The audit reason for a client that refused the proxy's certificate: what happened, and
    what the operator installs where."""
    return (f"inspected HTTPS to {destination}: the client broke off the TLS handshake "
            f"({error}); it must trust the proxy's CA for requests to this destination to be "
            "inspected: add the certificate that `agent-egress ca` names to the client's trust "
            "store, or give the account the environment `agent-egress env` prints (a bundle of "
            "the system's CAs and the proxy's, STATE_DIR/ca-bundle.pem, in SSL_CERT_FILE, "
            "CURL_CA_BUNDLE, GIT_SSL_CAINFO, PIP_CERT, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS "
            "and the like)")
