"""What a transparent connection is for, decided from its first bytes: TLS by its SNI, plain
HTTP by each request's Host (in the request hooks), anything else as raw TCP by the name the
resolver gave this account the address for."""

from __future__ import annotations

import re

from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.tls import parse_client_hello

from agent_egress.clients import Client
from agent_egress.gate import Gate

from .closing import mitmproxy_closer
from .passthrough import refuse_next_layer

_HTTP_REQUEST = re.compile(rb"[A-Z]{3,10} [/*]")  # the start of an HTTP/1 request line


async def dispatch(gate: Gate, nextlayer: layer.NextLayer, client: Client) -> None:
    """Decides the connection once the client has spoken; leaves `nextlayer` alone until
    then, and for HTTP, whose requests are decided one by one."""
    data = nextlayer.data_client()
    if not data or client.original is None:
        return  # wait until the client speaks
    address, port = client.original
    if starts_like_tls_record(data):
        try:
            hello = parse_client_hello(data)
        except ValueError:
            refuse_next_layer(nextlayer, "not a TLS ClientHello")
            return
        if hello is None:
            return
        target = hello.sni if hello.sni else str(address)
        tunnel = await gate.connection(client, target, port, original=address)
    elif _HTTP_REQUEST.match(data):
        return
    else:
        tunnel = gate.raw_tcp(client, address, port)
    tunnel.closer = mitmproxy_closer(nextlayer.context.client.id)
    gate.open(client, tunnel)
    if not tunnel.decision.passes:
        refuse_next_layer(nextlayer, tunnel.decision.reason)
    elif not tunnel.decision.inspect:
        nextlayer.layer = layers.TCPLayer(nextlayer.context)
