"""Bounds on what one client can make the proxy hold: the bytes and the time of a request head,
and the process's open-file limit.

mitmproxy's HTTP/1 server buffers a request head until its blank line arrives, with no size
limit ("FIXME: protect against header size DoS" in its `_http1.py`) and no time limit: its
`tcp_timeout` watchdog counts any byte as activity, so a client sending a byte every few seconds
(slowloris) keeps a half-sent request, and its socket, forever. Here each unfinished head may
buffer at most MAX_HEAD_BYTES (plus one read) and must be complete REQUEST_HEAD_SECONDS after
its first byte, as Apache's mod_reqtimeout and nginx's client_header_timeout require; the
answers are 431 and 408, then the connection is closed. Framing the parser cannot consume (an
endless chunk-size line, data pipelined behind a request still being answered) is bounded by the
same size, by closing the connection. A connection that sends nothing at all is left to
mitmproxy's idle `tcp_timeout`.

A TLS ClientHello is bounded likewise: mitmproxy's protocol detection buffers a connection's
first bytes until the whole ClientHello has come, and its header may announce up to 16 MiB.
Four connections sending a few MiB of one each left the proxy 14 MiB larger for good (the
buffer is joined anew on every read, and the allocator keeps the freed blocks). A ClientHello
that is unfinished and already larger than MAX_CLIENT_HELLO_BYTES, or announces more, is refused
and the connection closed."""

from __future__ import annotations

import logging
import resource

from h11._receivebuffer import ReceiveBuffer
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ErrorCode, RequestProtocolError
from mitmproxy.proxy.layers.http._http1 import Http1Server, make_error_response
from mitmproxy.proxy.layers.tls import get_client_hello

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # large cookies and tokens fit; nginx allows 4 x 8 KiB by default
REQUEST_HEAD_SECONDS = 20.0  # Apache's mod_reqtimeout default for the first header byte
OPEN_FILES_CEILING = 1 << 20
# Go's crypto/tls allows a handshake message 64 KiB; browsers' ClientHellos, post-quantum key
# shares included, take under 2 KiB
MAX_CLIENT_HELLO_BYTES = 64 * 1024
_HANDSHAKE_CLIENT_HELLO = 1


class BoundedHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server side, refusing request heads that grow too large or too slow."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self._deadline: commands.RequestWakeup | None = None  # for the head being received

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup):
            if event.command is self._deadline and self.state == self.read_headers:
                yield from self._refuse_head(408, f"request head not complete in "
                                                  f"{REQUEST_HEAD_SECONDS:g} s")
            return
        yield from super()._handle_event(event)
        if self.state == self.read_headers:
            if len(self.buf) > MAX_HEAD_BYTES:
                yield from self._refuse_head(431, f"request head larger than {MAX_HEAD_BYTES} "
                                                  "bytes")
            elif self.buf and self._deadline is None:
                self._deadline = commands.RequestWakeup(REQUEST_HEAD_SECONDS)
                yield self._deadline
        else:
            self._deadline = None
            if self.state in (self.read_body, self.wait) and len(self.buf) > MAX_HEAD_BYTES:
                yield from self._close_unparsed()

    def _refuse_head(self, status: int, reason: str) -> layer.CommandGenerator[None]:
        yield commands.Log(f"{_peer(self.conn.peername)}: {reason}; closing", logging.INFO)
        yield commands.SendData(self.conn, make_error_response(status, reason))
        yield commands.CloseConnection(self.conn)
        self.state = self.done

    def _close_unparsed(self) -> layer.CommandGenerator[None]:
        """As mitmproxy does on a framing error, and with the same flaw: when more data is
        already buffered, its reader may die before it closes the socket (see the threat
        model); the bytes are dropped either way."""
        reason = f"more than {MAX_HEAD_BYTES} bytes the HTTP/1 parser cannot consume"
        yield commands.Log(f"{_peer(self.conn.peername)}: {reason}; closing", logging.INFO)
        yield commands.CloseConnection(self.conn)
        yield ReceiveHttp(RequestProtocolError(self.stream_id, reason,
                                               ErrorCode.GENERIC_CLIENT_ERROR))
        self.buf = ReceiveBuffer()
        self.state = self.done


def _peer(address: tuple[str, int] | None) -> str:
    return f"{address[0]}:{address[1]}" if address else "client"


class RequestHeadLimits:
    """Gives every HTTP/1 layer that mitmproxy's next-layer logic chose a bounded server side.
    Runs after it (and after the Enforcer, which may have chosen a pass-through instead).
    HttpLayer takes a client connection handler registered before it starts (`setdefault`):
    that is where this one goes. HTTP/2 and HTTP/3 bound their headers in their own codecs."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        chosen = nextlayer.layer
        if type(chosen) is not layers.HttpLayer or chosen.context.client.alpn not in (
                None, b"", b"http/1.1", b"http/1.0"):
            return
        chosen.connections.setdefault(chosen.context.client,
                                      BoundedHttp1Server(chosen.context.fork()))


def oversized_hello(data: bytes) -> str | None:
    """Why a connection whose first bytes are `data` must be refused: a TLS ClientHello, not
    complete, that already takes (with its record headers) or announces more than
    MAX_CLIENT_HELLO_BYTES; None otherwise (a whole ClientHello, anything else, or a small
    part of one). Cheap for the usual small first read."""
    if not starts_like_tls_record(data):
        return None
    announced = int.from_bytes(data[6:9]) if len(data) >= 9 and \
        data[5] == _HANDSHAKE_CLIENT_HELLO else 0
    if announced <= MAX_CLIENT_HELLO_BYTES and len(data) <= MAX_CLIENT_HELLO_BYTES:
        return None
    try:
        if get_client_hello(data) is not None:
            return None  # whole, and followed by more (TLS 1.3 early data)
    except ValueError:
        return None  # not TLS records after all: mitmproxy's TLS layer refuses it
    return (f"TLS ClientHello larger than {MAX_CLIENT_HELLO_BYTES // 1024} KiB "
            f"({max(announced, len(data))} bytes announced or sent)")


def raise_open_file_limit() -> None:
    """Each client costs the proxy a descriptor or two: raise the soft limit to the hard one
    (as Go's runtime does), so that a few hundred idle connections do not exhaust the usual
    soft limit of 1024 and lock every other client out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else min(hard,
                                                                           OPEN_FILES_CEILING)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, e)
