"""Relaying a connection's bytes unread: counted when allowed, refused when not."""

from __future__ import annotations

from typing import Any

from mitmproxy.proxy import events, layer, layers

from agent_egress.connections import Tunnel


class CountingTCPLayer(layers.TCPLayer):
    """mitmproxy's own pass-through (no flow, so no hook per chunk) counting the bytes."""

    def __init__(self, context: Any, tunnel: Tunnel) -> None:
        super().__init__(context, ignore=True)
        self.tunnel = tunnel

    def relay_messages(self, event: Any) -> Any:
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.tunnel.bytes_up += len(event.data)
            else:
                self.tunnel.bytes_down += len(event.data)
        yield from super().relay_messages(event)


def refuse_next_layer(nextlayer: layer.NextLayer, reason: str) -> None:
    """Nothing of the connection reaches a server: the client is answered by a closed relay."""
    nextlayer.context.server.error = reason
    nextlayer.layer = layers.TCPLayer(nextlayer.context, ignore=True)
