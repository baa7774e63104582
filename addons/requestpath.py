"""Plain HTTP/1.1 requests on the explicit listener without mitmproxy's layers.

An agent's plain-HTTP requests through the proxy are mostly kept-alive GETs and POSTs with a
Content-Length. For each request head (read strictly, agent_egress/http1.py) the same gate as
mitmproxy's path: identity, the decision on method and path, the Host and target checks, the
pinned address, the audit line when the response has been relayed. The request goes to the
origin in origin-form over a kept-alive connection of this client's (one per destination), and
the response comes back as it arrives, framed as the origin framed it (Content-Length as is,
chunked re-chunked as llhttp read it, close-delimited until the origin closes), with flow
control both ways.

Anything else goes to mitmproxy at a request boundary, the bytes from that request's head on
replayed (addons/handover.py), and mitmproxy decides it as always: a head request_head does not
take (HTTP/1.0, chunked bodies, Expect, upgrades, framing in doubt, a head split over reads,
an https:// or origin-form target), and a request whose rule injects a credential or must be
inspected. A denied request is answered here, as mitmproxy's path answers it, and the
connection closed. Set AGENT_EGRESS_FAST_REQUESTS=0 to send every request to mitmproxy (the
tests run both ways).

Inside an inspected tunnel (`Inside`: TLS terminated by addons/tlsterminate.py) the same, with
origin-form targets whose destination is the tunnel's, origins reached over TLS (verified, the
name as SNI), and the rule's credential injected here. A request this path does not take (its
head whole: it waits for the rest of a split one, as long as mitmproxy would) goes to mitmproxy
as the absolute-form `https://` request it stands for, with `Connection: close`: mitmproxy
decides it again, and the client opens a new connection for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy.layers.http._http1 import make_error_response

from agent_egress.addons.denial import denial
from agent_egress.addons.handover import Handover, replay
from agent_egress.addons.limits import MAX_HEAD_BYTES, REQUEST_HEAD_SECONDS
from agent_egress.addons.origin import Upstream, UpstreamKey
from agent_egress.addons.upstreampool import UpstreamPool
from agent_egress.clients import Client
from agent_egress.connections import Exchange, Tunnel
from agent_egress.gate import Gate, PendingRequest
from agent_egress.http1 import HEAD_END, RequestHead, request_head
from agent_egress.rules import Address, Decision, Host, Stage, address_text, host_text
from agent_egress.rules.operations import MAX_BODY

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 600.0  # as mitmproxy's connection handler: a connection quiet this long is closed
UNRESOLVED_STATUS = 502
RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS"})  # sent again when a kept-alive upstream
# connection turns out closed before any answer (idempotent and bodiless, RFC 9110 9.2.2)
CONNECT_TIMEOUT = 30.0  # for a new upstream connection; then the client gets a 502
# A request line as mitmproxy reads it the same: a method token, an origin-form target, a
# version, one space between them (and no LF, tab or other whitespace anywhere)
_ORIGIN_FORM_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (/[!-~]*) (HTTP/[0-9]\.[0-9])")


@dataclass(frozen=True, slots=True)
class Inside:
    """The inspected tunnel a PlainClient serves, and how its origins are reached."""

    tunnel: Tunnel
    upstream_tls: ssl.SSLContext

    def absolute_form(self, raw: bytes) -> bytes | None:
        """`raw` (a request head, whole or begun, in origin-form) as the absolute-form
        request to this tunnel's destination that it stands for, asking mitmproxy to close
        the connection after it; None when it is not origin-form."""
        line, end, rest = raw.partition(b"\r\n")
        match = _ORIGIN_FORM_LINE.fullmatch(line)
        # mitmproxy ends the line at any LF and splits it at any whitespace; a continuation
        # line first would fold into our Connection header (and hide its `close`)
        if not end or match is None or rest[:1] in (b" ", b"\t"):
            return None
        authority = f"{host_text(self.tunnel.host)}:{self.tunnel.port}".encode("ascii")
        return b"%s https://%s%s %s\r\nConnection: close\r\n%s" % (
            match[1], authority, match[2], match[3], rest)


def enabled() -> bool:
    """Off with AGENT_EGRESS_FAST_REQUESTS=0: every request then goes through mitmproxy."""
    return os.environ.get("AGENT_EGRESS_FAST_REQUESTS", "1") != "0"


class Closable(Protocol):
    def close(self) -> None: ...


class Listener(Protocol):
    """What the listener's fast paths share (addons/fastpath.py's FastTunnels)."""

    gate: Gate
    handover: Handover
    own_addresses: Callable[[], set[tuple[str, int]]]
    live: set[Any]
    pool: UpstreamPool  # idle upstream connections, per account

    def left(self, client: Any) -> None: ...

    def keep(self, task: asyncio.Task[Any], records: bool = False) -> None: ...


def needs_mitmproxy(decision: Decision) -> bool:
    """Requests whose rule injects a credential, or must be inspected, are mitmproxy's until
    this path does what its hooks do for them."""
    return decision.inspect or decision.credential is not None


def head_parts(head: RequestHead) -> Iterator[bytes]:
    """What the tripwire scans of a request head, as addons/tripwire.py gives it from
    mitmproxy's request: the target's path and authority, and every header: here their lines
    as received (each value whole in them, as in `name: value` joined; no join to make)."""
    yield head.path.encode("ascii")
    yield head.authority.encode("ascii")
    yield head.raw[head.fields_at:]


class PlainClient(asyncio.Protocol):
    """One client connection's plain-HTTP requests, one at a time (pipelined ones wait)."""

    def __init__(self, listener: Listener, transport: asyncio.Transport, client: Client,
                 inside: Inside | None = None) -> None:
        """`client`: who the connection is, as the tunnel fast path identified it on connect;
        `inside`: the inspected tunnel whose plaintext `transport` is."""
        self.listener = listener
        self.inside = inside
        self.gate = listener.gate
        self.transport = transport
        self.client = client
        self.received = bytearray()  # the client's bytes not yet taken
        self.head: RequestHead | None = None  # the request being served
        self.exchange: Exchange | None = None  # its record, once allowed
        self.upstream: Upstream | None = None  # where it went
        self.body_left = 0  # of its body, still to come from the client
        self.body_start = bytearray()  # what the audit reads of it, for its `op`
        self.upstream_full = False  # the upstream's send buffer is full: the client waits
        self.client_full = False  # the client's send buffer is full: the upstream waits
        self.client_eof = False  # the client has sent all it will send
        self.closing = False
        self.own: set[tuple[str, int]] | None = None  # where this proxy listens
        self.injected: tuple[str, str] | None = None  # the credential's header, if any
        self.head_deadline: asyncio.TimerHandle | None = None  # for a head still coming
        self.last_active = time.monotonic()
        self.idle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            IDLE_TIMEOUT, self._check_idle)
        listener.live.add(self)

    def take(self, received: bytes) -> None:
        """Starts on what the client sent so far (the protocol is already this one)."""
        self.data_received(received)

    # The client's bytes

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.body_left and self.upstream is not None and not self.received:
            body = data[:self.body_left]
            self._send_body(body)
            data = data[len(body):]
            if not data:
                return
        if self.head is None and not self.received:
            self._next(data)  # the common case: a whole request head in one read
            return
        self.received += data
        if self.head is None:
            self._next()
        else:
            self._update_reading()

    def _send_body(self, body: bytes) -> None:
        if self.upstream is None:
            return
        self.upstream.transport.write(body)
        self.body_left -= len(body)
        self.upstream.bytes_up += len(body)
        if len(self.body_start) < MAX_BODY:
            self.body_start += body[:MAX_BODY - len(self.body_start)]

    def _next(self, data: bytes | None = None) -> None:
        """Takes the next request head, if a whole one has come: from `received`, or from
        `data` just read when nothing else is waiting."""
        if self.closing:
            return
        if data is None:
            if not self.received:
                self._update_reading()
                return
            data = bytes(self.received)
            self.received.clear()
        end = data.find(HEAD_END) + len(HEAD_END)
        inside = self.inside is not None
        head = request_head(data[:end], origin_form=inside) if (
            len(HEAD_END) <= end <= MAX_HEAD_BYTES) else None
        if head is None and inside and end < len(HEAD_END) and len(data) < MAX_HEAD_BYTES \
                and b"\n\n" not in data and b"\n\r\n" not in data:
            self.received[:0] = data  # its rest is still to come (not ended by bare LFs)
            self._await_head()
            return
        self._head_arrived()
        if head is None:  # split over reads, too large or in doubt: mitmproxy decides
            self.received[:0] = data
            self._hand_over()
            return
        if end < len(data):
            self.received[:0] = data[end:]
        self.head = head
        try:
            self._serve(head)
        except Exception:
            log.exception("fast request failed; closing the connection")
            self.abort()

    def _await_head(self) -> None:
        """Inside a tunnel a split head is waited for, for as long as mitmproxy's path
        waits (addons/limits.py); then a 408."""
        if self.head_deadline is None:
            self.head_deadline = asyncio.get_running_loop().call_later(
                REQUEST_HEAD_SECONDS, self._head_too_slow)
        self._update_reading()

    def _head_arrived(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_too_slow(self) -> None:
        self.head_deadline = None
        self._answer_and_close(make_error_response(
            408, f"request head not complete after {REQUEST_HEAD_SECONDS:.0f} s"))

    def _update_reading(self) -> None:
        """Reads from the client unless what it sent ahead is not yet wanted (pipelined
        requests, a body before its upstream is ready: up to MAX_HEAD_BYTES of it) or the
        upstream cannot take the body as fast. Not paused for each request: every pause and
        resume is a system call."""
        if self.closing:
            return
        if len(self.received) >= MAX_HEAD_BYTES or (self.body_left and self.upstream_full):
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    async def _guarded(self, coroutine: Any) -> None:
        try:
            await coroutine
        except Exception:
            log.exception("fast request failed; closing the connection")
            self.abort()

    # One request

    def _serve(self, head: RequestHead) -> None:
        """Serves `head` without a task while nothing needs waiting for (a destination pinned
        on this connection, an upstream connection in the pool): the common case."""
        gate, inside = self.gate, self.inside
        host_raw, port = (host_text(inside.tunnel.host), inside.tunnel.port) if inside else (
            head.host, head.port)
        outcome = gate.request_now(self.client, host_raw, port, head.method, head.path,
                                   head.host_header, head.authority)
        if isinstance(outcome, PendingRequest):
            self._later(self._serve_later(head, outcome))
            return
        self._forward(head, port, *outcome)

    async def _serve_later(self, head: RequestHead, pending: PendingRequest) -> None:
        decision, host, ip, unresolved = await self.gate.request_later(pending)
        if self.closing:
            self.gate.finish(self.client)  # gone meanwhile: the audit room promised goes back
            return
        self._forward(head, pending.port, decision, host, ip, unresolved)

    def _later(self, coroutine: Any) -> None:
        """Goes on with the request in a task: something must be waited for."""
        self.listener.keep(asyncio.get_running_loop().create_task(self._guarded(coroutine)))

    def _forward(self, head: RequestHead, port: int, decision: Decision, host: Host,
                 ip: Address | None, unresolved: bool) -> None:
        """Sends a request the gate decided to its upstream, or answers its denial."""
        gate, inside = self.gate, self.inside
        caught = gate.carried(decision, head_parts(head))  # parts made only with secrets set
        if caught is not decision:
            decision, unresolved = caught, False
        if not decision.passes:
            self._later(self._refuse(head, decision, host, port, ip, unresolved))
            return
        ip_text = address_text(ip) if ip is not None else ""
        # a body is scanned for credentials before any of it is sent: mitmproxy's hooks do that
        scanned_body = head.content_length and gate.runtime.policies.secrets
        if (not inside and needs_mitmproxy(decision)) or scanned_body or ip is None or \
                self._is_own(ip_text, port):
            self.received[:0] = head.raw
            self.head = None
            self._hand_over()  # before any credential is taken: mitmproxy injects its own
            return
        self.injected = None
        if inside and decision.credential is not None:
            injected = gate.credential_header(decision)
            if isinstance(injected, Decision):
                self._later(self._refuse(head, injected, host, port, ip, False))
                return
            self.injected = injected
        self.exchange = gate.begin_exchange(self.client, decision, host, port, ip)
        key = UpstreamKey(decision.account, inside is not None, host_text(host), ip_text, port)
        upstream = self.listener.pool.take(key)
        if upstream is None:
            self._later(self._dial_and_send(head, key))
            return
        self._send(upstream, head)

    async def _dial_and_send(self, head: RequestHead, key: UpstreamKey) -> None:
        """Sends `head` on a new connection for `key`: none was idle, or the kept-alive one it
        went out on was closed by the origin before answering (its idle timeout crossed our
        request)."""
        try:
            upstream = await self._dial(key)
        except OSError as e:  # TimeoutError and TLS failures too
            self._upstream_failed(f"Cannot connect to {key.name}:{key.port}: "
                                  f"{e.strerror or e or 'timed out'}")
            return
        if self.transport.is_closing():
            upstream.transport.close()
            return
        self._send(upstream, head)

    async def _refuse(self, head: RequestHead, decision: Decision, host: Host, port: int,
                      ip: Address | None, unresolved: bool) -> None:
        """Answers a denied request here, recorded, and closes the connection."""
        await self.gate.attribute(self.client)
        self.gate.record(Stage.REQUEST, self.client, decision, host, port, ip,
                         method=head.method, path=head.path)
        response = denial(decision, f"{host_text(host)}:{port}",
                          UNRESOLVED_STATUS if unresolved else 403)
        self._answer_and_close(assemble_response(response))

    def _send(self, upstream: Upstream, head: RequestHead) -> None:
        self.upstream = upstream
        self.body_start.clear()
        upstream.begin(self, head.method)
        upstream.transport.write(head.origin_form(self.injected))
        self.body_left = head.content_length
        if self.body_left:
            body = bytes(self.received[:self.body_left])
            del self.received[:len(body)]
            self._send_body(body)
        self._update_reading()

    def _is_own(self, ip: str, port: int) -> bool:
        """Whether `ip`:`port` is where this proxy listens (mitmproxy refuses such a loop);
        the listeners' addresses are looked up once per client connection."""
        if self.own is None:
            self.own = self.listener.own_addresses()
        return (ip, port) in self.own

    async def _dial(self, key: UpstreamKey) -> Upstream:
        """A new connection to `key.ip`:`key.port` for the name `key.name`: over TLS inside an
        inspected tunnel, the origin's certificate verified for that name, sent as SNI."""
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {} if self.inside is None else {
            "ssl": self.inside.upstream_tls, "server_hostname": key.name.strip("[]")}
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, upstream = await loop.create_connection(lambda: Upstream(key), key.ip, key.port,
                                                       **tls)
        return upstream

    def response_done(self, upstream: Upstream, reusable: bool, keep_client: bool) -> None:
        """The upstream relayed the whole response."""
        head = self.head
        self.upstream = None
        if head is None:
            return
        reusable = reusable and self.body_left == 0
        keep_client = (keep_client and self.body_left == 0 and head.keep_alive and
                       not self.client_eof)
        self._end_exchange(head, upstream.bytes_down)
        if reusable and not self.closing:
            self.listener.pool.give(upstream)
        else:
            upstream.transport.close()
        self.head, self.body_left, self.upstream_full = None, 0, False
        if not keep_client:
            self.close()
            return
        self._next()

    def response_failed(self, upstream: Upstream, answered: bool, reason: str) -> None:
        """The upstream broke off: before its response began (a 502), or during it (the
        client's connection is closed: a broken transfer for it too)."""
        self.upstream = None
        upstream.transport.close()
        head = self.head
        if (head is not None and upstream.reused and not upstream.heard and not self.closing
                and head.method in RETRYABLE and head.content_length == 0):
            self._later(self._dial_and_send(head, upstream.key))
            return
        if answered or self.head is None:
            if self.head is not None:
                self._end_exchange(self.head, upstream.bytes_down)
            self.abort()
        else:
            self._upstream_failed(reason)

    def _upstream_failed(self, reason: str) -> None:
        log.info("%s: %s", self.client.address, reason)
        if self.head is not None:
            self._end_exchange(self.head, None)
        self._answer_and_close(make_error_response(502, reason))

    def _end_exchange(self, head: RequestHead, bytes_down: int | None) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        body = bytes(self.body_start) if head.content_length else None
        lookup = self.client.process
        if lookup is None or lookup.done():
            self.gate.end_exchange(self.client, exchange, head.method, head.path,
                                   head.content_length, bytes_down, body)
            return
        # the line names the client's process: wait (bounded) for the lookup, as mitmproxy's
        # path does; cancelled (the proxy stopping) or not, the request is recorded
        async def end() -> None:
            try:
                await self.gate.attribute(self.client)
            finally:
                self.gate.end_exchange(self.client, exchange, head.method, head.path,
                                       head.content_length, bytes_down, body)
        self.listener.keep(asyncio.get_running_loop().create_task(end()), records=True)

    def _answer_and_close(self, answer: bytes) -> None:
        self.head = None
        if not self.transport.is_closing():
            self.transport.write(answer)
        self.close()

    def _hand_over(self) -> None:
        """Gives the connection to mitmproxy, from the request head in `received` on."""
        received = bytes(self.received)
        if self.inside is not None:
            absolute = self.inside.absolute_form(received)
            if absolute is None:
                self._answer_and_close(make_error_response(
                    400, "inside a tunnel, a request's target must be a path (origin-form)"))
                return
            received = absolute
        self.closing = True
        self._stop_idle()
        self.listener.left(self)
        self.gate.finish(self.client)  # the audit room promised to the request goes back
        coroutine = replay(self.transport, received, self.listener.handover)
        self.listener.keep(asyncio.get_running_loop().create_task(coroutine))

    # Flow control: the side that cannot keep up pauses the other's reading.

    def pause_writing(self) -> None:
        self.client_full = True
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_full = False
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    def upstream_paused(self, paused: bool) -> None:
        self.upstream_full = paused
        self._update_reading()

    # The end

    def eof_received(self) -> bool:
        if self.head is None:
            return False  # between requests, or a head that cannot end now: closes
        if self.body_left:
            self.abort()  # the body will not come
            return False
        self.client_eof = True
        return True  # the response is still to be written; closed after it

    def _check_idle(self) -> None:
        quiet = time.monotonic() - self.last_active
        if quiet < IDLE_TIMEOUT:
            wait = IDLE_TIMEOUT - quiet
        elif self.head is not None:  # waiting for the origin: its own timeouts apply
            wait = IDLE_TIMEOUT
        else:
            self.close()
            return
        self.idle = asyncio.get_running_loop().call_later(wait, self._check_idle)

    def _stop_idle(self) -> None:
        self._head_arrived()
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def close(self) -> None:
        """Closes the client's connection once what was written to it is sent."""
        self.closing = True
        self.transport.close()

    def abort(self) -> None:
        self.closing = True
        self.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._stop_idle()
        self.listener.left(self)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.transport.close()
            if self.head is not None:
                self._end_exchange(self.head, upstream.bytes_down)
        elif self.head is not None:
            self._end_exchange(self.head, None)
        self.gate.finish(self.client)  # audit room promised to a request never forwarded
