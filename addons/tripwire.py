"""What the tripwire and the credential injection need from a mitmproxy request: the parts of
it a credential's value could ride in, and the header to set. The gate decides
(`Gate.carried`, `Gate.credential_header`); this only reads and writes the flow.

A body up to mitmproxy's stream_large_bodies is buffered whole before anything of the request
is sent, and scanned in the `request` hook. A larger (or chunked HTTP/1) body is streamed: its
URL and headers were scanned before they went, and its first SCANNED_BODY bytes are held back
until scanned; when they carry a credential, no byte of the body is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from mitmproxy import http

from agent_egress.connections import Exchange
from agent_egress.credentials import SCANNED_BODY, body_head
from agent_egress.gate import Gate
from agent_egress.rules import Decision


def head_parts(request: http.Request) -> list[bytes]:
    """The request line's target and authority, and every header as sent."""
    fields = request.headers.fields
    return [request.data.path, request.data.authority,
            b"\n".join(name + b": " + value for name, value in fields)]


def body_parts(request: http.Request) -> list[bytes]:
    body = request.raw_content
    if not body:
        return []
    return [body_head(body, request.headers.get("content-encoding"))]


def inject(gate: Gate, request: http.Request, decision: Decision) -> Decision:
    """Sets the credential's header, replacing every one the client sent."""
    header = gate.credential_header(decision)
    if isinstance(header, Decision):
        return header
    name, value = header
    request.headers[name] = value
    return decision


def refused(exchange: Exchange, caught: Decision) -> Exchange:
    return replace(exchange, decision=caught)


def watch_streamed_body(gate: Gate, flow: http.HTTPFlow, key: str) -> None:
    """For a body mitmproxy streams (too large to buffer, or chunked), scans its start on the
    way, holding it back until scanned."""
    request = flow.request
    streamed = request.stream or (
        not request.is_http2 and not request.is_http3
        and "chunked" in request.headers.get("transfer-encoding", "").lower())
    if not streamed or not gate.runtime.policies.secrets:
        return

    def check(head: bytes) -> bool:
        exchange = flow.metadata.get(key)
        if not isinstance(exchange, Exchange):
            return True
        caught = gate.carried(exchange.decision,
                              [body_head(head, request.headers.get("content-encoding"))])
        if caught is exchange.decision:
            return False
        flow.metadata[key] = refused(exchange, caught)
        return True

    request.stream = _HeldBack(check)


class _HeldBack:
    """A request body's stream: the first SCANNED_BODY bytes are held until `caught` has
    looked at them; after a catch, nothing more is sent."""

    def __init__(self, caught: Callable[[bytes], bool]) -> None:
        self.caught = caught
        self.held: list[bytes] = []
        self.size = 0
        self.state = "holding"

    def __call__(self, chunk: bytes) -> list[bytes]:
        if self.state == "passing":
            return [chunk] if chunk else []
        if self.state == "stopped":
            return []
        if chunk:
            self.held.append(chunk)
            self.size += len(chunk)
            if self.size < SCANNED_BODY:
                return []
        held, self.held = self.held, []
        if self.caught(b"".join(held)):
            self.state = "stopped"
            return []
        self.state = "passing"
        return held
