"""The resolver's sockets: UDP and TCP on one address. Each packet goes to the resolver; the
server only frames, bounds and sends, so nothing a client sends can stop it answering others."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Coroutine
from ipaddress import ip_address
from typing import Any

from .resolver import PolicyResolver

log = logging.getLogger(__name__)

MAX_PENDING_UDP = 1024
UDP_BATCH = 64  # datagrams read per wake-up, so that TCP and forwarded answers get their turn
UDP_RECEIVE_SIZE = 65535
# The kernel's default (208 KiB) holds about 200 queries: a burst while the event loop is busy
# with the proxy overflowed it, and queries were dropped unanswered. Capped at rmem_max.
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
# DNS over TCP (RFC 7766): a connection waiting for its next query longer than this is closed,
# as common resolvers do; and one client (its uid, else its address) holds at most
# MAX_TCP_PER_CLIENT of the MAX_TCP_CLIENTS connections, so that no account can take them all.
# A client over its share, or a new one when all are taken, gets room by the closing of the
# longest-idle connection of its own, or of the client holding most (RFC 7766 section 6.2.3).
TCP_IDLE_SECONDS = 10.0
MAX_TCP_CLIENTS = 256
MAX_TCP_PER_CLIENT = 16


class _Udp:
    """The UDP socket, read straight from the event loop in batches: asyncio's datagram
    transport takes one datagram per pass of the loop (and allocates a 256 KiB buffer for
    each), which alone capped the resolver at a fraction of what it can answer. Errors are
    handled as the transport did: a failed receive or send is skipped, a send the kernel
    cannot take yet is queued in order."""

    def __init__(self, resolver: PolicyResolver, sock: socket.socket) -> None:
        self.resolver = resolver
        self.socket = sock
        self.address = sock.getsockname()[:2]
        self.pending: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray(UDP_RECEIVE_SIZE)
        self._view = memoryview(self._buffer)
        self._unsent: deque[tuple[bytes, Any]] = deque()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._read_ready)

    def close(self) -> None:
        if not self._closed:
            self._loop.remove_reader(self.socket.fileno())
            self._loop.remove_writer(self.socket.fileno())
            self._write_ready()  # what the kernel takes of the answers still queued
            self._closed = True
            self.socket.close()

    def _read_ready(self) -> None:
        """Takes what has arrived (at most UDP_BATCH datagrams), then answers it all as one
        batch for the resolver (see PolicyResolver.begin_batch)."""
        receive, buffer, view = self.socket.recvfrom_into, self._buffer, self._view
        batch = []
        for _ in range(UDP_BATCH):
            try:
                size, addr = receive(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error for an earlier reply, say: nothing to answer
            batch.append((bytes(view[:size]), addr))
        if not batch:
            return
        self.resolver.begin_batch()
        try:
            for data, addr in batch:
                self.datagram_received(data, addr)
        finally:
            self.resolver.end_batch()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        client = (str(addr[0]), int(addr[1]))
        reply = self.resolver.handle(data, client, self.address, socket.IPPROTO_UDP)
        if isinstance(reply, bytes):  # checked first: an ABC's isinstance costs more
            self.sendto(reply, addr)
        elif isinstance(reply, Coroutine):
            if len(self.pending) >= MAX_PENDING_UDP:
                reply.close()  # overloaded: drop, the client retries
                return
            task = asyncio.ensure_future(self._send_later(reply, addr))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    def sendto(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self._closed:
            return
        if self._unsent:
            self._unsent.append((data, addr))
            return
        try:
            self.socket.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._unsent.append((data, addr))
            self._loop.add_writer(self.socket.fileno(), self._write_ready)
        except OSError:
            pass  # this reply is lost; the client retries

    def _write_ready(self) -> None:
        while self._unsent:
            data, addr = self._unsent[0]
            try:
                self.socket.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
            self._unsent.popleft()
        if not self._closed:
            self._loop.remove_writer(self.socket.fileno())

    async def _send_later(self, reply: Coroutine[Any, Any, bytes | None],
                          addr: tuple[str | Any, int]) -> None:
        data = await reply
        if data is not None:
            self.sendto(data, addr)


class _TcpConnection:
    __slots__ = ("client", "idle_since", "writer")

    def __init__(self, client: object, writer: asyncio.StreamWriter) -> None:
        self.client = client  # ("uid", N) or ("address", TEXT)
        self.writer = writer
        self.idle_since: float | None = None  # None: a query is being answered


class DnsServer:
    def __init__(self, resolver: PolicyResolver, idle_seconds: float = TCP_IDLE_SECONDS,
                 max_tcp: int = MAX_TCP_CLIENTS,
                 max_tcp_per_client: int = MAX_TCP_PER_CLIENT) -> None:
        self.resolver = resolver
        self.idle_seconds = idle_seconds
        self.max_tcp = max_tcp
        self.max_tcp_per_client = max_tcp_per_client
        self._udp: _Udp | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients = 0
        self._tcp_by_client: dict[object, set[_TcpConnection]] = {}

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listens on UDP and TCP; port 0 picks one free for both. Returns the address."""
        family = socket.AF_INET6 if ip_address(host.partition("%")[0]).version == 6 \
            else socket.AF_INET
        for attempt in range(20):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
            udp = _Udp(self.resolver, sock)
            bound = udp.address
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound[1],
                                                       reuse_address=True)
            except OSError:
                udp.close()
                if port != 0 or attempt == 19:
                    raise
                continue
            self._udp = udp
            return str(bound[0]), int(bound[1])
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = (str(peer[0]), int(peer[1]))
        server = writer.get_extra_info("sockname")[:2]
        connection = _TcpConnection(await self._tcp_client(client, server), writer)
        if not self._admit(connection):
            writer.close()
            return
        try:
            while True:
                # not loop.time(): uvloop's is the loop iteration's, in milliseconds, and
                # connections taken in one iteration would tie for "longest idle"
                connection.idle_since = time.monotonic()
                async with asyncio.timeout(self.idle_seconds):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    packet = await reader.readexactly(length)
                connection.idle_since = None
                reply = self.resolver.handle(packet, client, server, socket.IPPROTO_TCP)
                if isinstance(reply, Coroutine):
                    reply = await reply
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._forget(connection)
            writer.close()

    async def _tcp_client(self, client: tuple[str, int], server: tuple[str, int]) -> object:
        """Who holds a connection, for its share: the uid owning the client's socket (found
        as the resolver finds it), else its address."""
        owners = self.resolver.runtime.owners
        owner = None
        if owners is not None:
            try:
                owner = owners.owner(client, server, socket.IPPROTO_TCP)
                if owner is None:  # redirected here by nftables: found by its own address
                    owner = await asyncio.to_thread(owners.owner_of_local, client,
                                                    socket.IPPROTO_TCP)
            except OSError:
                owner = None
        return ("address", client[0]) if owner is None else ("uid", owner.uid)

    def _admit(self, connection: _TcpConnection) -> bool:
        """Counts a new connection in, making room if it must; False: no room."""
        own = self._tcp_by_client.get(connection.client, set())
        if len(own) >= self.max_tcp_per_client:
            if not self._close_longest_idle(own):
                return False
        elif self._tcp_clients >= self.max_tcp:
            if not self._close_longest_idle(max(self._tcp_by_client.values(), key=len)):
                return False
        self._tcp_by_client.setdefault(connection.client, set()).add(connection)
        self._tcp_clients += 1
        return True

    def _close_longest_idle(self, connections: set[_TcpConnection]) -> bool:
        idle = [c for c in connections if c.idle_since is not None]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since or 0.0)
        self._forget(victim)
        victim.writer.close()
        return True

    def _forget(self, connection: _TcpConnection) -> None:
        own = self._tcp_by_client.get(connection.client)
        if own is None or connection not in own:
            return  # closed to make room already
        own.discard(connection)
        if not own:
            del self._tcp_by_client[connection.client]
        self._tcp_clients -= 1
