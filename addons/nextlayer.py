"""mitmproxy's protocol detection, made to wait for the client in transparent mode.

With no bytes from the client yet, mitmproxy would pick raw TCP at once, before agent-egress
could tell a TLS ClientHello or an HTTP request from anything else (and decide on its SNI or
Host). Waiting costs nothing for clients that speak first, as TLS, HTTP and SSH clients do;
protocols where the server speaks first are not supported through the transparent listener."""

from __future__ import annotations

from mitmproxy.addons.next_layer import NeedsMoreData, NextLayer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import Layer
from mitmproxy.proxy.mode_specs import TransparentMode


class ClientFirstNextLayer(NextLayer):
    name = "nextlayer"  # what other addons look it up by

    def _next_layer(self, context: Context, data_client: bytes,
                    data_server: bytes) -> Layer | None:
        if not data_client and isinstance(context.client.proxy_mode, TransparentMode):
            raise NeedsMoreData
        layer: Layer | None = super()._next_layer(context, data_client, data_server)
        return layer
