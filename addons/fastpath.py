"""Allowed HTTPS tunnels without mitmproxy's layers.

Most CONNECTs an agent makes go to hosts whose rule needs no inspection, and what follows is a
TLS ClientHello naming that host. mitmproxy spends about 2 ms of CPU on such a tunnel (its
layers, hooks and a generator step per chunk). Here the same checks, by the same gate: the
account, the CONNECT decision, the pinned upstream address, the ClientHello's SNI;
then two protocols copy bytes, counted, until either side closes, and the tunnel is recorded as
mitmproxy's path records it.

A tunnel that a rule inspects is taken here too when its ClientHello offers HTTP/1.1 (or no
ALPN): TLS is terminated with a certificate from mitmproxy's store (addons/tlsterminate.py) and
its requests served by the request fast path (addons/requestpath.py, `Inside`).

Everything else is handed to mitmproxy untouched, its bytes so far replayed into mitmproxy's
connection handler, which then decides as always: a CONNECT that is denied (or inspected
where this listener does not inspect), an inspected tunnel whose client offers HTTP/2 only,
anything but a CONNECT, a head or ClientHello split over reads, bytes that are not TLS, a wrong
or missing SNI. When the CONNECT was already answered here, mitmproxy's own answer to the
replayed CONNECT is dropped, or the connection closed if mitmproxy refuses what was accepted
(the policy changed in between).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy.layers.tls import parse_client_hello

from agent_egress.addons import requestpath
from agent_egress.addons.closing import untrusted_ca_reason
from agent_egress.addons.handover import Handover, replay
from agent_egress.addons.tlsterminate import DecryptedTransport, Inspection, TlsServerEnd
from agent_egress.addons.upstreampool import UpstreamPool
from agent_egress.checks import sni_refusal
from agent_egress.clients import Client
from agent_egress.connections import Tunnel
from agent_egress.gate import Gate
from agent_egress.rules import HostError, host_text, parse_port, split_host_port

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 600.0  # as mitmproxy's connection handler: a tunnel quiet this long is closed
_HEAD_END = b"\r\n\r\n"


class ExplicitListener:
    """Serves mitmproxy's explicit-proxy listener: FastTunnels in front (with `fast`), on a
    socket bound beforehand if given (shared with other workers through SO_REUSEPORT). Add it
    to the master before it runs: it hooks the server list's "created, not yet started"
    signal, and replaces how the explicit-proxy server listens."""

    def __init__(self, servers: Any, gate: Gate, sock: socket.socket | None,
                 fast: bool, inspection: Inspection | None = None) -> None:
        """`inspection`: inspected tunnels are served here too (with the request fast path)."""
        self.servers = servers
        self.gate = gate
        self.sock = sock
        self.fast = fast
        self.inspection = inspection
        self.fast_tunnels: list[FastTunnels] = []
        servers.changed.connect(self.servers_changed)

    def servers_changed(self) -> None:
        for instance in self.servers:
            if instance.mode.type_name == "regular" and not instance.is_running:
                instance.listen = self._listener(instance)

    def _listener(self, instance: Any) -> Any:
        async def listen(host: str, port: int) -> list[asyncio.Server]:
            # asyncio's default backlog of 100 leaves a burst of new clients waiting on
            # retransmissions; SOMAXCONN is what the kernel allows (4096)
            where: dict[str, Any] = {"sock": self.sock} if self.sock else {
                "host": host, "port": port, "backlog": socket.SOMAXCONN}
            if not self.fast:
                return [await asyncio.start_server(instance.handle_stream, **where)]
            requests = requestpath.enabled()
            tunnels = FastTunnels(self.gate, instance.handle_stream, self._own_addresses,
                                  requests=requests,
                                  inspection=self.inspection if requests else None)
            self.fast_tunnels.append(tunnels)
            return [await asyncio.get_running_loop().create_server(tunnels.protocol, **where)]
        return listen

    def _own_addresses(self) -> set[tuple[str, int]]:
        return {(str(a[0]), a[1]) for server in self.servers for a in server.listen_addrs}

    async def close_tunnels(self) -> None:
        for tunnels in self.fast_tunnels:
            await tunnels.close()


class FastTunnels:
    """Serves the explicit proxy's listener: `protocol` for loop.create_server."""

    def __init__(self, gate: Gate, handover: Handover,
                 own_addresses: Callable[[], set[tuple[str, int]]],
                 requests: bool = False, inspection: Inspection | None = None) -> None:
        """`handover` is mitmproxy's handle_stream for this listener; `own_addresses` where
        this proxy listens (a tunnel to itself is mitmproxy's to refuse); `requests`: plain
        HTTP requests take the request fast path (addons/requestpath.py); `inspection`:
        inspected tunnels too."""
        self.gate = gate
        self.handover = handover
        self.own_addresses = own_addresses
        self.requests = requests
        self.inspection = inspection
        self.live: set[Any] = set()  # _Client and requestpath.PlainClient
        self.pool = UpstreamPool()  # the request fast path's idle upstream connections
        self._emptied = asyncio.Event()  # set whenever `live` becomes empty
        self._tasks: set[asyncio.Task[Any]] = set()
        self._records: set[asyncio.Task[Any]] = set()  # tasks about to write an audit line

    def protocol(self) -> asyncio.Protocol:
        return _Client(self)

    async def close(self, wait: float = 5.0) -> None:
        """Closes every tunnel and waits until each, and every request answered, is recorded
        (before the audit log shuts)."""
        self._emptied.clear()
        for client in list(self.live):
            client.close()
        try:
            async with asyncio.timeout(wait):
                if self.live:
                    await self._emptied.wait()
                while self._records:
                    await asyncio.wait(list(self._records))
        except TimeoutError:
            log.warning("%d fast tunnels still open and %d lines unwritten %s s after closing",
                        len(self.live), len(self._records), wait)
        self.pool.close()

    def left(self, client: Any) -> None:
        """`client` is no longer this listener's (closed, or handed to mitmproxy)."""
        self.live.discard(client)
        if not self.live:
            self._emptied.set()

    def keep(self, task: asyncio.Task[Any], records: bool = False) -> None:
        """Holds `task` until it is done (the loop keeps only weak references); one that
        finished in its eager first step (most requests) needs nothing. `records`: it writes
        an audit line, which `close` waits for."""
        if not task.done():
            held = self._records if records else self._tasks
            held.add(task)
            task.add_done_callback(held.discard)


class _Client(asyncio.Protocol):
    """The client's side: the CONNECT head, the ClientHello, then bytes to the destination."""

    def __init__(self, tunnels: FastTunnels) -> None:
        self.tunnels = tunnels
        self.transport: asyncio.Transport  # from connection_made, before any other call
        self.received = bytearray()  # what the client sent before the relay began
        self.head_length = 0
        self.answered = False  # our 200 to the CONNECT is out
        self.client: Client  # who it is, from connection_made
        self.tunnel: Tunnel | None = None  # allowed, answered, not yet open
        self.target: tuple[str, int] = ("", 0)  # what the CONNECT named
        self.upstream: _Upstream | None = None
        self.last_active = time.monotonic()
        self.idle: asyncio.TimerHandle | None = None
        self.finished = False
        self.eofs = 0  # half-closes seen: at two, both directions are done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # any transport with reading and writing, asyncio's or uvloop's
        self.transport = cast(asyncio.Transport, transport)
        self.tunnels.live.add(self)
        self.idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._check_idle)
        # who it is, at once: the lookup of its process runs while it sends its first request
        self.client = self.tunnels.gate.client(transport.get_extra_info("peername"),
                                               transport.get_extra_info("sockname"))

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.upstream is not None:
            self.tunnel.bytes_up += len(data)  # type: ignore[union-attr]
            self.upstream.transport.write(data)
            return
        self.received += data
        if not self.head_length:
            end = self.received.find(_HEAD_END)
            if end >= 0 and self.tunnels.requests and not self.received.startswith(b"CONNECT "):
                self._to_request_path()
                return
            if end < 0 or not self.received.startswith(b"CONNECT "):
                self._hand_over()
                return
            self.head_length = end + len(_HEAD_END)
            self.transport.pause_reading()
            self._start(self._connect())
        elif self.answered:
            self._hello()

    def _hello(self) -> None:
        hello_bytes = bytes(self.received[self.head_length:])
        if not hello_bytes or self.tunnel is None:
            return
        try:
            hello = parse_client_hello(hello_bytes) if starts_like_tls_record(
                hello_bytes) else None
        except ValueError:
            hello = None
        inspected = self.tunnel.decision.inspect
        if hello is None or sni_refusal(hello.sni, self.tunnel.host, self.tunnel.port) or (
                inspected and hello.alpn_protocols and b"http/1.1" not in hello.alpn_protocols):
            # not TLS, not whole yet, refused, or HTTP/2 only: mitmproxy goes on from the
            # decided CONNECT
            peer = self.transport.get_extra_info("peername")[:2]
            self.tunnels.gate.hand_over(peer, *self.target, self.tunnel)
            self.tunnel = None
            self._hand_over()
            return
        self.transport.pause_reading()
        if inspected:
            self._terminate(hello_bytes)
        else:
            self._start(self._dial(hello_bytes))

    async def _connect(self) -> None:
        request_line = bytes(self.received[:self.received.find(b"\r\n")])
        parts = request_line.split(b" ")
        target = _authority(parts[1]) if len(parts) == 3 and parts[2] in (
            b"HTTP/1.1", b"HTTP/1.0") else None
        if target is None:
            self._hand_over()
            return
        gate = self.tunnels.gate
        tunnel = await gate.connection(self.client, *target)
        if self.transport.is_closing():
            self._finish()
            return
        if not tunnel.decision.passes or (tunnel.decision.inspect and
                                          self.tunnels.inspection is None):
            # decided: mitmproxy takes this decision rather than resolving the name again
            peer = self.transport.get_extra_info("peername")[:2]
            gate.hand_over(peer, *target, tunnel)
            self._hand_over()
            return
        if tunnel.ip is None or (str(tunnel.ip), tunnel.port) in self.tunnels.own_addresses():
            self._hand_over()
            return
        # room for its line before the client is told the tunnel is open: without it the
        # refusal, with its reason, is a 403 to the CONNECT (mitmproxy's to answer)
        tunnel.decision, tunnel.promised = gate.promise(tunnel.decision)
        if not tunnel.decision.passes:
            gate.hand_over(self.transport.get_extra_info("peername")[:2], *target, tunnel)
            self._hand_over()
            return
        self.tunnel, self.target = tunnel, target
        self.answered = True
        self.transport.write(parts[2] + b" 200 Connection established\r\n\r\n")
        self.transport.resume_reading()
        self._hello()  # the client may have sent it with the CONNECT

    async def _dial(self, hello: bytes) -> None:
        if self.tunnel is None:
            self.close()  # never: a ClientHello is only taken after an allowed CONNECT
            return
        self.tunnel.closer = self.close
        tunnel = self.tunnels.gate.open(self.client, self.tunnel)
        if not tunnel.decision.passes:  # the audit log has no room for its line
            self.close()
            return
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _Upstream(self),
                                                       str(tunnel.ip), tunnel.port)
        except OSError as e:
            log.info("%s: cannot connect to %s: %s", self.client.address, tunnel.destination, e)
            self.transport.close()
            self._finish()
            return
        if self.transport.is_closing():
            upstream.transport.close()
            return
        self.upstream = upstream
        tunnel.bytes_up += len(hello)
        upstream.transport.write(hello)
        self.received.clear()
        self.transport.resume_reading()

    def _terminate(self, hello: bytes) -> None:
        """An inspected tunnel: TLS ends here, its requests go to the request fast path."""
        inspection, gate, client = self.tunnels.inspection, self.tunnels.gate, self.client
        if inspection is None or self.tunnel is None:
            self.close()  # never: only an inspected tunnel, when inspecting, comes here
            return
        tunnel = gate.open(client, self.tunnel)
        if not tunnel.decision.passes:  # the audit log has no room for its line
            self.close()
            return
        try:
            context = inspection.certificates.context(host_text(tunnel.host))
        except (ValueError, OSError) as e:  # ssl.SSLError is an OSError
            log.error("no certificate for %s: %s", tunnel.destination, e)
            gate.refuse_tunnel(client, tunnel, f"inspected HTTPS to {tunnel.destination}: the "
                               f"proxy cannot make a certificate for it ({e})")
            self.close()
            return

        def handshaken(decrypted: DecryptedTransport) -> None:
            decrypted.set_protocol(requestpath.PlainClient(
                self.tunnels, decrypted, client,
                requestpath.Inside(tunnel, inspection.upstream_tls)))
            self.tunnels.left(end)  # the request fast path's now

        def gone() -> None:
            self.tunnels.left(end)
            gate.finish(client)

        def failed(error: str, by_client: bool) -> None:
            if not tunnel.decision.passes:  # withdrawn meanwhile (recorded then)
                return
            gate.refuse_tunnel(client, tunnel, untrusted_ca_reason(tunnel.destination, error)
                               if by_client else f"inspected HTTPS to {tunnel.destination}: "
                               f"no TLS session ({error})")

        # the tunnel's bytes are its requests', as mitmproxy's path counts an inspected one
        # (Gate.end_exchange): not the TLS records that carried them too
        end = TlsServerEnd(self.transport, context, handshaken, failed, gone)
        tunnel.closer = self.transport.close
        self.tunnels.live.add(end)  # until its handshake is done: closed with the listener
        self.tunnels.left(self)
        if self.idle is not None:
            self.idle.cancel()  # the request fast path keeps its own
        self.finished = True  # the tunnel is the TLS end's to finish now
        end.start(hello)

    def _check_idle(self) -> None:
        quiet = time.monotonic() - self.last_active
        if quiet >= IDLE_TIMEOUT:
            self.close()
        else:
            self.idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT - quiet,
                                                              self._check_idle)

    def _to_request_path(self) -> None:
        """A request, not a CONNECT: the request fast path serves the connection from here."""
        plain = requestpath.PlainClient(self.tunnels, self.transport, self.client)
        self.transport.set_protocol(plain)
        self.tunnels.left(self)
        if self.idle is not None:
            self.idle.cancel()
        plain.take(bytes(self.received))

    def _hand_over(self) -> None:
        """Gives the connection, and what it sent so far, to mitmproxy."""
        self._start(replay(self.transport, bytes(self.received), self.tunnels.handover,
                           self.answered))
        self.tunnels.left(self)
        if self.idle is not None:
            self.idle.cancel()  # mitmproxy's own watchdog takes over
        self.tunnels.gate.finish(self.client)  # mitmproxy makes its own; this started none

    def _start(self, coroutine: Any) -> None:
        self.tunnels.keep(asyncio.get_running_loop().create_task(self._guarded(coroutine)))

    async def _guarded(self, coroutine: Any) -> None:
        try:
            await coroutine
        except Exception:
            log.exception("fast tunnel failed; closing the connection")
            self.close()

    # Flow control: the side that cannot keep up pauses the other's reading.

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.upstream is None or not self.upstream.transport.can_write_eof():
            return False
        self.upstream.transport.write_eof()
        return self.half_closed()

    def half_closed(self) -> bool:
        """One direction has ended; keeps the connections open for the other, if it has not."""
        self.eofs += 1
        if self.eofs < 2:
            return True
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnels.left(self)
        if self.upstream is not None:
            self.upstream.transport.close()
        self._finish()

    def close(self) -> None:
        self.transport.close()
        if self.upstream is not None:
            self.upstream.transport.close()

    def _finish(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if self.finished:
            return
        self.finished = True
        if self.tunnel is not None and self.client.tunnel is not self.tunnel:
            self.tunnels.gate.unpromise(self.tunnel)  # answered, closed before it opened
        self.tunnels.gate.finish(self.client)


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # asyncio's or uvloop's

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.last_active = time.monotonic()
        client.tunnel.bytes_down += len(data)  # type: ignore[union-attr]
        client.transport.write(data)

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()

    def eof_received(self) -> bool:
        transport = self.client.transport
        if not transport.can_write_eof():
            return False
        transport.write_eof()
        return self.client.half_closed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


def _authority(target: bytes) -> tuple[str, int] | None:
    """`host:port` or `[v6]:port` of a CONNECT; None for anything else."""
    try:
        host, port = split_host_port(target.decode("ascii"))
        if not host or port is None:
            return None
        return host, parse_port(port)
    except (UnicodeDecodeError, HostError):
        return None
