"""mitmproxy's protocol detection, made to wait for what agent-egress decides on.

With no bytes from the client yet, mitmproxy would pick raw TCP at once in transparent mode,
before agent-egress could tell a TLS ClientHello or an HTTP request from anything else (and
decide on its SNI or Host). Waiting costs nothing for clients that speak first, as TLS, HTTP and
SSH clients do; protocols where the server speaks first are not supported through the
transparent listener. And with part of a ClientHello, mitmproxy would pick its TLS layer at
once, before the Enforcer could see the SNI and take an allowed tunnel as a counted
pass-through: it waits for the whole ClientHello, which the TLS layer needs anyway, as long as
it stays within MAX_CLIENT_HELLO_BYTES (limits.py); a larger one is refused."""

from __future__ import annotations

from mitmproxy.addons.next_layer import NeedsMoreData, NextLayer
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import Layer
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.mode_specs import TransparentMode

from .limits import oversized_hello


class ClientFirstNextLayer(NextLayer):
    name = "nextlayer"  # what other addons look it up by

    def _next_layer(self, context: Context, data_client: bytes,
                    data_server: bytes) -> Layer | None:
        if not data_client and isinstance(context.client.proxy_mode, TransparentMode):
            raise NeedsMoreData
        if too_large := oversized_hello(data_client):
            context.server.error = too_large  # refused as passthrough.refuse_next_layer does
            return layers.TCPLayer(context, ignore=True)
        if starts_like_tls_record(data_client):
            try:
                if parse_client_hello(data_client) is None:
                    raise NeedsMoreData
            except ValueError:
                pass  # not a ClientHello: mitmproxy's TLS layer refuses it
        layer: Layer | None = super()._next_layer(context, data_client, data_server)
        return layer
