"""The resolver's sockets: UDP and TCP on one address. Each packet goes to the resolver; the
server only frames, bounds and sends, so nothing a client sends can stop it answering others."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Coroutine
from typing import Any

from .resolver import PolicyResolver

log = logging.getLogger(__name__)

MAX_PENDING_UDP = 1024
TCP_IDLE_SECONDS = 10.0
MAX_TCP_CLIENTS = 256


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: PolicyResolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport
        self.address = transport.get_extra_info("sockname")[:2]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        client = (str(addr[0]), int(addr[1]))
        reply = self.resolver.handle(data, client, self.address, socket.IPPROTO_UDP)
        if isinstance(reply, Coroutine):
            if len(self.pending) >= MAX_PENDING_UDP:
                reply.close()  # overloaded: drop, the client retries
                return
            task = asyncio.ensure_future(self._send_later(reply, addr))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        elif reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    async def _send_later(self, reply: Coroutine[Any, Any, bytes | None],
                          addr: tuple[str | Any, int]) -> None:
        data = await reply
        if data is not None and self.transport is not None:
            self.transport.sendto(data, addr)


class DnsServer:
    def __init__(self, resolver: PolicyResolver) -> None:
        self.resolver = resolver
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listens on UDP and TCP; port 0 picks one free for both. Returns the address."""
        loop = asyncio.get_running_loop()
        for attempt in range(20):
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _Udp(self.resolver), local_addr=(host, port))
            bound = transport.get_extra_info("sockname")[:2]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound[1],
                                                       reuse_address=True)
            except OSError:
                transport.close()
                if port != 0 or attempt == 19:
                    raise
                continue
            self._udp = transport
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
        if self._tcp_clients >= MAX_TCP_CLIENTS:
            writer.close()
            return
        self._tcp_clients += 1
        peer = writer.get_extra_info("peername")
        client = (str(peer[0]), int(peer[1]))
        server = writer.get_extra_info("sockname")[:2]
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_SECONDS):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    packet = await reader.readexactly(length)
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
            self._tcp_clients -= 1
            writer.close()
