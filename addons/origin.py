"""The origin's side of the request fast path (addons/requestpath.py): a kept-alive connection
to an origin that relays one response at a time to the client connection using it.

The response head is read by llhttp (strict) and relayed as received once its framing is
certain (agent_egress/http1.py's response_framing): a Content-Length body by count, a chunked
body re-chunked as llhttp read it (trailers dropped), a close-delimited body until the origin
closes. Interim (1xx) responses are relayed and the final one awaited. What the fast path does
not relay (two Content-Lengths, a Transfer-Encoding other than chunked alone, a 101, a head
over 64 KiB or one llhttp refuses) is a 502 if nothing was relayed yet, else a cut-off transfer;
bytes after a response's end retire the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol, cast

import httptools

from agent_egress.addons.limits import MAX_HEAD_BYTES
from agent_egress.http1 import (
    HEAD_END,
    LAST_CHUNK,
    ResponseFraming,
    chunk,
    framing_headers,
    response_framing,
)


class Client(Protocol):
    """The client connection an Upstream relays to (requestpath.PlainClient)."""

    transport: asyncio.Transport
    client_full: bool
    last_active: float

    def response_done(self, upstream: Upstream, reusable: bool, keep_client: bool) -> None: ...

    def response_failed(self, upstream: Upstream, answered: bool, reason: str) -> None: ...

    def upstream_paused(self, paused: bool) -> None: ...


class UpstreamKey(NamedTuple):
    """What a kept-alive connection may serve (addons/upstreampool.py): one account's
    requests to `name` (the name its certificate was verified for, when `tls`) at the pinned
    address `ip`:`port`."""

    account: str
    tls: bool
    name: str
    ip: str
    port: int


class Upstream(asyncio.Protocol):
    """A kept-alive connection to an origin: relays one response at a time to its client."""

    def __init__(self, key: UpstreamKey) -> None:
        self.key = key
        self.on_lost: Callable[[Upstream], None] | None = None  # while idle in a pool
        self.idle_since = 0.0  # time.monotonic() when it was last given back to a pool
        self.transport: asyncio.Transport
        self.client: Client | None = None
        self.method = ""
        self.buffer = bytearray()  # a response head still coming
        self.parser: httptools.HttpResponseParser | None = None
        self.head_read = False
        self.keep_alive = False
        self.message_complete = False
        self.messages = 0  # begun on this parser: more than one, and the origin sent too much
        self.chunks: list[bytes] = []  # of a chunked body, re-chunked, to write at once
        self.framing: ResponseFraming | None = None
        self.left = 0  # of a Content-Length body
        self.answered = False  # something of the response went to the client
        self.bytes_up = 0
        self.bytes_down = 0
        self.reused = False  # has served a response before
        self.heard = False  # the origin has sent something since the request went out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # asyncio's or uvloop's

    def begin(self, client: Client, method: str) -> None:
        self.client, self.method = client, method
        self.heard = False
        if self.buffer:
            self.buffer.clear()
        self.framing, self.answered, self.head_read = None, False, False
        self.bytes_up = self.bytes_down = 0
        self._new_parser()
        if client.client_full:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def idle(self) -> None:
        self.reused = True  # its next request may cross the origin closing it
        self.client = None
        self.parser = None
        self.transport.resume_reading()  # to see the origin close it

    def _new_parser(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head_read = self.message_complete = False
        self.messages = 0

    # llhttp's callbacks: none per header (httptools calls only the callbacks defined here);
    # the framing headers are read from the head llhttp accepted (http1.framing_headers)

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_headers_complete(self) -> None:
        self.head_read = True
        if self.parser is not None:  # now: llhttp forgets `Connection: close` at the end
            self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.bytes_down += len(body)
        self.chunks.append(chunk(body))

    def on_message_complete(self) -> None:
        self.message_complete = True

    # The origin's bytes

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self.transport.close()  # unasked-for bytes on an idle connection
            return
        client.last_active = time.monotonic()
        self.heard = True
        framing = self.framing
        if framing is None:
            self._head(data)
        elif framing.body == "length":
            self._length_body(data)
        elif framing.body == "chunked":
            self._chunked_body(data)
        else:  # until the origin closes
            self.bytes_down += len(data)
            client.transport.write(data)

    def _head(self, data: bytes) -> None:
        client = self.client
        if client is None or self.parser is None:
            return
        if self.buffer:
            self.buffer += data
            data = bytes(self.buffer)
        end = data.find(HEAD_END)
        if end < 0:
            if not self.buffer:
                self.buffer += data
            if len(self.buffer) > MAX_HEAD_BYTES:
                self._fail("response head too large")
            return
        self.buffer.clear()
        head, rest = data[:end + len(HEAD_END)], data[end + len(HEAD_END):]
        try:
            self.parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._fail(f"invalid response from the origin: {e}")
            return
        framing = response_framing(self.parser.get_status_code(), self.keep_alive,
                                   framing_headers(head), self.message_complete,
                                   self.method) if self.head_read else None
        if framing is None:
            self._fail("a response the proxy cannot relay as it is (framing)")
            return
        self.answered = True
        if framing.body == "length" and len(rest) == framing.length:  # all in: one write
            self.bytes_down += len(rest)
            client.transport.write(head + rest)
            self.framing = framing
            self._done(reusable=True)
            return
        client.transport.write(head)
        if framing.status < 200:  # an interim response: the final one follows
            self._new_parser()
            if rest:
                self._head(rest)
            return
        self.framing = framing
        if framing.body == "none":
            self._done(reusable=not rest)
        elif framing.body == "length":
            self.left = framing.length
            if rest:
                self._length_body(rest)
        elif rest:
            self.data_received(rest)

    def _length_body(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        body = data[:self.left] if len(data) > self.left else data
        self.left -= len(body)
        self.bytes_down += len(body)
        client.transport.write(body)
        if not self.left:
            self._done(reusable=len(body) == len(data))

    def _chunked_body(self, data: bytes) -> None:
        if self.parser is None or self.client is None:
            return
        extra = False
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            if not self.message_complete:
                self.chunks.clear()
                self._fail(f"invalid chunked body from the origin: {e}")
                return
            extra = True  # bytes after the last chunk of a response that closes
        if self.message_complete:
            self.chunks.append(LAST_CHUNK)
        if self.chunks:
            self.client.transport.write(b"".join(self.chunks))
            self.chunks.clear()
        if self.message_complete:
            # bytes after the last chunk (another response begun) make the connection unusable
            self._done(reusable=self.messages == 1 and not extra)

    def _done(self, reusable: bool) -> None:
        client, self.client = self.client, None
        framing, self.framing = self.framing, None
        keep_alive = framing is not None and framing.keep_alive
        if client is not None:
            client.response_done(self, reusable and keep_alive, keep_client=keep_alive)

    def _fail(self, reason: str) -> None:
        client, self.client = self.client, None
        self.transport.close()
        if client is not None:
            client.response_failed(self, self.answered, reason)

    # Flow control and the end

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_paused(False)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        client, self.client = self.client, None
        if client is None:
            if self.on_lost is not None:
                self.on_lost(self)
            return
        if self.framing is not None and self.framing.body == "close":
            self.framing = None
            client.response_done(self, reusable=False, keep_client=False)
        else:
            reason = f": {exc}" if exc else ""
            client.response_failed(self, self.answered,
                                   f"the origin closed the connection{reason}")

