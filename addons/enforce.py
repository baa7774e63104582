"""The mitmproxy addon: a thin adapter from mitmproxy's hooks to the gate (agent_egress/gate.py).

CONNECT: the gate decides the account, host and port, and pins the upstream address. Inside
the tunnel: the TLS ClientHello's SNI must name the CONNECT host; TLS passes through unless a
rule needs to see requests. Requests (plain HTTP, or inspected HTTPS): the gate decides each
one. Upstream: mitmproxy dials exactly the pinned address, and the connection keeps the name
it was opened for, so that the requests after it reuse it.

mitmproxy logs a hook's exception and lets the flow go on; every hook here denies instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from mitmproxy import connection, http, tcp, tls
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer, mode_specs, server_hooks
from mitmproxy.proxy.layers.tls import parse_client_hello

from agent_egress.addons.denial import denial
from agent_egress.checks import host_header_name, host_or_name, host_or_none, sni_refusal
from agent_egress.clients import Client
from agent_egress.connections import Exchange
from agent_egress.gate import Gate
from agent_egress.rules import Address, Name, Stage, host_text

from . import transparent, tripwire
from .closing import mitmproxy_closer, untrusted_ca_reason
from .limits import oversized_hello
from .passthrough import CountingTCPLayer, refuse_next_layer

log = logging.getLogger(__name__)

Hooked = TypeVar("Hooked")
UNRESOLVED_STATUS = 502  # as mitmproxy answers when it cannot connect upstream
_EXCHANGE = "agent_egress"  # the flow's metadata key for its Exchange


def _deny_on_error(refuse: Callable[[Any, str], None]) -> Callable[
        [Callable[[Enforcer, Hooked], Coroutine[Any, Any, None] | None]],
        Callable[[Enforcer, Hooked], Coroutine[Any, Any, None]]]:
    """Runs a hook; if it raises, logs the error and refuses the connection or flow."""

    def wrap(hook: Callable[[Enforcer, Hooked], Coroutine[Any, Any, None] | None]) -> Callable[
            [Enforcer, Hooked], Coroutine[Any, Any, None]]:
        @functools.wraps(hook)
        async def guarded(self: Enforcer, obj: Hooked) -> None:
            try:
                result = hook(self, obj)
                if result is not None:
                    await result
            except Exception:
                log.exception("policy hook %s failed; denying", hook.__name__)
                refuse(obj, "internal policy error (denied; see the agent-egress log)")

        return guarded

    return wrap


def _refuse_flow(flow: http.HTTPFlow, reason: str) -> None:
    flow.response = http.Response.make(403, f"agent-egress: {reason}\n".encode(),
                                       {"Content-Type": "text/plain"})


def _refuse_client(client: connection.Client, reason: str) -> None:
    client.error = reason


def _refuse_server(data: server_hooks.ServerConnectionHookData, reason: str) -> None:
    data.server.error = reason


def _refuse_hello(data: tls.ClientHelloData, reason: str) -> None:
    data.ignore_connection = True
    data.context.server.error = reason


def _refuse_tcp(flow: tcp.TCPFlow, reason: str) -> None:
    flow.server_conn.error = reason
    flow.kill()


class Enforcer:
    gate: Gate  # given, or set in configure when loaded by mitmdump -s

    def __init__(self, gate: Gate | None = None) -> None:
        if gate is not None:
            self.gate = gate
        self.clients: dict[str, Client] = {}
        self._dialled_names: dict[str, tuple[str, int]] = {}  # server id -> name it is for

    def done(self) -> None:
        self.gate.close()

    # Connections

    @_deny_on_error(_refuse_client)
    def client_connected(self, client: connection.Client) -> None:
        transparent_mode = isinstance(client.proxy_mode, mode_specs.TransparentMode)
        self.clients[client.id] = self.gate.client(client.peername, client.sockname,
                                                   transparent_mode)

    def client_disconnected(self, client: connection.Client) -> None:
        self.gate.forget(client.peername[:2])
        known = self.clients.pop(client.id, None)
        if known is not None:
            self.gate.finish(known)

    # CONNECT

    @_deny_on_error(_refuse_flow)
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        client = self.clients[flow.client_conn.id]
        if flow.response is not None:  # proxy authentication failed
            self._record_auth_failure(client, flow)
            return
        request = flow.request
        tunnel = self.gate.handed_over(flow.client_conn.peername[:2], request.host, request.port)
        if tunnel is None:
            tunnel = await self.gate.connection(client, request.host, request.port,
                                                _proxy_user(flow))
        if not tunnel.decision.passes:
            await self.gate.attribute(client)
        tunnel.closer = mitmproxy_closer(flow.client_conn.id)
        self.gate.open(client, tunnel)
        if not tunnel.decision.passes:
            flow.response = denial(tunnel.decision, tunnel.destination,
                                   UNRESOLVED_STATUS if tunnel.unresolved else 403)

    @_deny_on_error(refuse_next_layer)
    async def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Takes allowed pass-through TLS tunnels, so their bytes are counted: mitmproxy's own
        pass-through has no flow to count on. Everything else goes on to tls_clienthello,
        requestheaders or tcp_start. In transparent mode, decides first what the connection
        is for (addons/transparent.py)."""
        if nextlayer.layer is not None:
            return
        client = self.clients.get(nextlayer.context.client.id)
        if client is None:
            return
        if client.original is not None and client.tunnel is None:
            await transparent.dispatch(self.gate, nextlayer, client)
            return
        tunnel = client.tunnel
        if tunnel is None or not tunnel.decision.passes:
            return
        data = nextlayer.data_client()
        if too_large := oversized_hello(data):
            self.gate.refuse_tunnel(client, tunnel, too_large)
            refuse_next_layer(nextlayer, too_large)
            return
        if tunnel.decision.inspect or not starts_like_tls_record(data):
            return
        try:
            hello = parse_client_hello(data)
        except ValueError:
            return  # mitmproxy's TLS layer will refuse it
        if hello is None:
            return  # wait for the rest of the ClientHello
        refusal = sni_refusal(hello.sni, tunnel.host, tunnel.port)
        if refusal:
            self.gate.refuse_tunnel(client, tunnel, refusal)
            refuse_next_layer(nextlayer, refusal)
        else:
            nextlayer.layer = CountingTCPLayer(nextlayer.context, tunnel)

    @_deny_on_error(_refuse_hello)
    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        client = self.clients[data.context.client.id]
        tunnel = client.tunnel
        if tunnel is None:
            _refuse_hello(data, "TLS without a CONNECT")
            return
        refusal = sni_refusal(data.client_hello.sni, tunnel.host, tunnel.port)
        if refusal:
            self.gate.refuse_tunnel(client, tunnel, refusal)
            _refuse_hello(data, refusal)
        elif not tunnel.decision.inspect:
            data.ignore_connection = True

    async def tls_failed_client(self, data: tls.TlsData) -> None:
        """The client broke off the handshake of inspected TLS: most often it does not trust
        the proxy's CA. Recorded, with what to install where (mitmproxy only logs it)."""
        client = self.clients.get(data.context.client.id)
        tunnel = client.tunnel if client is not None else None
        if client is None or tunnel is None or not tunnel.decision.passes:
            return
        await self.gate.attribute(client)
        self.gate.refuse_tunnel(client, tunnel, untrusted_ca_reason(
            tunnel.destination, data.conn.error or "handshake failed"))

    @_deny_on_error(_refuse_tcp)
    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        client = self.clients[flow.client_conn.id]
        tunnel = client.tunnel
        if tunnel is None:
            _refuse_tcp(flow, "TCP without a CONNECT")
        elif tunnel.decision.inspect:
            reason = (f"{tunnel.destination} may only be reached by requests the proxy can "
                      "inspect, not by raw TCP")
            self.gate.refuse_tunnel(client, tunnel, reason)
            _refuse_tcp(flow, reason)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        client = self.clients.get(flow.client_conn.id)
        message = flow.messages[-1]
        if client is not None and client.tunnel is not None:
            if message.from_client:
                client.tunnel.bytes_up += len(message.content)
            else:
                client.tunnel.bytes_down += len(message.content)
        flow.messages.clear()  # counted; keeping them would hold the whole stream in memory

    # Requests: plain HTTP, and HTTPS that a rule inspects

    @_deny_on_error(_refuse_flow)
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        client = self.clients[flow.client_conn.id]
        if flow.response is not None:  # proxy authentication failed
            self._record_auth_failure(client, flow)
            return
        request = flow.request
        tunnel = client.tunnel
        if tunnel is not None:
            host_raw, port = host_text(tunnel.host), tunnel.port
        elif client.original is not None:  # transparent plain HTTP: Host names the target
            host_raw = host_header_name(request.host_header or "") or str(client.original[0])
            port = client.original[1]
        else:
            host_raw, port = request.host, request.port
        decision, host, ip, unresolved = await self.gate.request(
            client, host_raw, port, request.method, request.path, request.host_header,
            request.authority, _proxy_user(flow))
        caught = self.gate.carried(decision, tripwire.head_parts(request))
        if caught is not decision:
            decision, unresolved = caught, False
        elif decision.passes and decision.credential is not None:
            decision = tripwire.inject(self.gate, request, decision)
        if not decision.passes:
            await self.gate.attribute(client)
            self.gate.record(Stage.REQUEST, client, decision, host, port, ip,
                             method=request.method, path=request.path)
            flow.response = denial(decision, f"{host_text(host)}:{port}",
                                   UNRESOLVED_STATUS if unresolved else 403)
            return
        if not request.is_http2 and not request.is_http3:
            request.authority = ""  # the origin gets origin-form: only Host names the host
        flow.metadata[_EXCHANGE] = self.gate.begin_exchange(client, decision, host, port, ip)
        tripwire.watch_streamed_body(self.gate, flow, _EXCHANGE)

    @_deny_on_error(_refuse_flow)
    def request(self, flow: http.HTTPFlow) -> None:
        """The whole body is here (mitmproxy buffers up to stream_large_bodies), nothing of it
        sent yet: its start must not carry a credential."""
        exchange = flow.metadata.get(_EXCHANGE)
        if not isinstance(exchange, Exchange) or flow.response is not None or \
                flow.request.stream:
            return
        caught = self.gate.carried(exchange.decision, tripwire.body_parts(flow.request))
        if caught is not exchange.decision:
            flow.metadata[_EXCHANGE] = tripwire.refused(exchange, caught)
            flow.response = denial(caught, f"{host_text(exchange.host)}:{exchange.port}")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Streams every response body on as it arrives: an origin that breaks off mid-body
        is then a broken transfer for the client too (not a complete-looking 502 or a
        truncated body), and the audit counts the bytes that really came."""
        exchange = flow.metadata.get(_EXCHANGE)
        if isinstance(exchange, Exchange) and flow.response is not None:
            flow.response.stream = exchange.received

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._end_exchange(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._end_exchange(flow)

    async def _end_exchange(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.pop(_EXCHANGE, None)
        client = self.clients.get(flow.client_conn.id)
        if not isinstance(exchange, Exchange) or client is None:
            return
        try:
            await self.gate.attribute(client)  # the client waits for its answer: it exists
        finally:  # cancelled (the proxy is stopping) or not, the request is recorded
            bytes_down = exchange.received.total if flow.response is not None else None
            self.gate.end_exchange(client, exchange, flow.request.method, flow.request.path,
                                   _body_size(flow.request), bytes_down,
                                   flow.request.raw_content)

    # Upstream

    @_deny_on_error(_refuse_server)
    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Dials exactly the address that was checked for this destination, and nothing
        that was not checked."""
        client = self.clients[data.client.id]
        if data.server.address is None:
            data.server.error = "no destination"
            return
        host, port = data.server.address
        tunnel = client.tunnel
        if tunnel is not None:
            if not tunnel.decision.passes or tunnel.ip is None:
                data.server.error = tunnel.decision.reason
                return
            ip: Address | None = tunnel.ip
        else:
            ip = _pinned_for(client, host, port)
        if ip is None:
            data.server.error = f"no policy decision for {host}:{port}"
            return
        if data.server.sni is None and isinstance(host_or_none(host), Name):
            data.server.sni = host
        # mitmproxy reuses a connection for the next request to the same host and port as its
        # address: once connected, it is given back its name (server_connected).
        self._dialled_names[data.server.id] = (host, port)
        data.server.address = (str(ip), port)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        name = self._dialled_names.pop(data.server.id, None)
        if name is not None:
            # mitmproxy refuses to move an open connection elsewhere; this only gives it back
            # the name it was asked for (its peer stays the pinned address)
            object.__setattr__(data.server, "address", name)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._dialled_names.pop(data.server.id, None)

    # Audit

    def _record_auth_failure(self, client: Client, flow: http.HTTPFlow) -> None:
        request = flow.request
        tried = "Proxy-Authorization" in request.headers
        decision = self.gate.refuse_client("proxy authentication failed" if tried else
                                           "proxy authentication required")
        if request.method == "CONNECT":
            self.gate.record(Stage.CONNECT, client, decision, host_or_name(request.host),
                             request.port, None)
        else:
            self.gate.record(Stage.REQUEST, client, decision, host_or_name(request.host),
                             request.port, None, method=request.method, path=request.path)


def _proxy_user(flow: http.HTTPFlow) -> str | None:
    proxy_auth = flow.metadata.get("proxyauth")
    return str(proxy_auth[0]) if proxy_auth else None


def _pinned_for(client: Client, host: str, port: int) -> Address | None:
    """The address decided for a request to `host`:`port`. In transparent mode mitmproxy
    dials the client's original address: it must be the one a decided request pinned."""
    named = host_or_none(host)
    if named is None:
        return None
    ip = client.pinned.get((host_text(named), port))
    if ip is None and not isinstance(named, Name) and named in {
            address for (_, p), address in client.pinned.items() if p == port}:
        ip = named
    return ip


def _body_size(message: http.Message) -> int | None:
    if message.raw_content is not None:
        return len(message.raw_content)
    length = message.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None
