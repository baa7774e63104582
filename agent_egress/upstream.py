"""Resolving names for the proxy: the system's resolver, or DNS servers given with
--upstream-dns (tried in order, each with a timeout, over TCP when a UDP answer is truncated)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from ipaddress import ip_address

from dnslib import QTYPE, RCODE, DNSError, DNSQuestion, DNSRecord

from .rules import Address, parse_port, split_host_port
from .rules.hosts import canonical_address

DNS_PORT = 53
MAX_TTL = 300  # seconds an answer is kept at most


class ResolveError(Exception):
    """A name that could not be resolved; the message says why."""


def parse_server(text: str) -> tuple[str, int]:
    """`ADDR` or `ADDR:PORT` (IPv6 in brackets) of a DNS server."""
    host, port_text = split_host_port(text)
    port = DNS_PORT if port_text is None else parse_port(port_text)
    ip_address(host)  # raises ValueError for a name: servers are given as addresses
    return host, port


def system_dns_servers(resolv_conf: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The nameservers the system's resolver uses."""
    servers = []
    try:
        with open(resolv_conf) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    try:
                        servers.append((str(ip_address(fields[1].partition("%")[0])),
                                        DNS_PORT))
                    except ValueError:
                        continue
    except OSError:
        pass
    return servers


class SystemResolver:
    async def addresses(self, name: str) -> list[Address]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ResolveError(f"{name} does not resolve: {e.strerror}") from None
        return _unique(ip_address(str(info[4][0]).partition("%")[0]) for info in infos)


class DnsServers:
    """A stub resolver over the given servers."""

    def __init__(self, servers: Sequence[tuple[str, int]], timeout: float = 2.0) -> None:
        self.servers = list(servers)
        self.timeout = timeout
        self._cache: dict[str, tuple[float, list[Address]]] = {}

    async def addresses(self, name: str) -> list[Address]:
        cached = self._cache.get(name)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        answers = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"),
                                       return_exceptions=True)
        found: list[Address] = []
        errors: dict[str, None] = {}
        ttl = MAX_TTL
        for answer in answers:
            if isinstance(answer, BaseException):
                errors[str(answer)] = None
            else:
                found += answer[0]
                ttl = min(ttl, answer[1])
        if not found:
            raise ResolveError("; ".join(errors) or f"{name} has no A or AAAA records")
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[name] = (time.monotonic() + ttl, _unique(found))
        return self._cache[name][1]

    async def _query(self, name: str, qtype: str) -> tuple[list[Address], int]:
        question = DNSRecord.question(name, qtype)
        reply = DNSRecord.parse(await self.exchange(question.pack()))
        rcode = reply.header.rcode
        if rcode != RCODE.NOERROR:
            raise ResolveError(f"{name} does not resolve ({RCODE[rcode]})")
        wanted = getattr(QTYPE, qtype)
        records = [rr for rr in reply.rr if rr.rtype == wanted]
        return ([ip_address(str(rr.rdata)) for rr in records],
                min([rr.ttl for rr in records], default=MAX_TTL))

    async def exchange(self, packet: bytes) -> bytes:
        """Sends a DNS message to the first server that answers its question in time."""
        question = DNSRecord.parse(packet).q
        failures = []
        for server in self.servers:
            try:
                reply = await asyncio.wait_for(_udp(server, packet), self.timeout)
                parsed = DNSRecord.parse(reply)
                if parsed.header.tc:
                    reply = await asyncio.wait_for(_tcp(server, packet), self.timeout)
                    parsed = DNSRecord.parse(reply)
                _check_question(question, parsed)
                return reply
            except (TimeoutError, OSError, ValueError, struct.error, DNSError) as e:
                failures.append(f"{server[0]}:{server[1]}: {type(e).__name__} {e}".rstrip())
        raise ResolveError("no DNS server answered (" + "; ".join(failures) + ")")


def _check_question(question: DNSQuestion, reply: DNSRecord) -> None:
    """A reply that does not repeat the question answers some other query: a confused or
    spoofing server, whose records must not be taken for the name asked."""
    if (len(reply.questions) != 1 or reply.q.qtype != question.qtype
            or reply.q.qclass != question.qclass
            or str(reply.q.qname).lower() != str(question.qname).lower()):
        asked = reply.questions[0].qname if reply.questions else "nothing"
        raise ValueError(f"answered another question (for {asked})")


class _OneReply(asyncio.DatagramProtocol):
    def __init__(self, query_id: bytes) -> None:
        self.query_id = query_id
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if data[:2] == self.query_id and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _udp(server: tuple[str, int], packet: bytes) -> bytes:
    # A fresh random id per attempt: a spoofed answer must guess it (and the source port).
    packet = secrets.token_bytes(2) + packet[2:]
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _OneReply(packet[:2]), remote_addr=server)
    try:
        transport.sendto(packet)
        return await protocol.reply
    finally:
        transport.close()


async def _tcp(server: tuple[str, int], packet: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*server)
    try:
        writer.write(struct.pack("!H", len(packet)) + packet)
        await writer.drain()
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()


def _unique(addresses: Iterable[Address]) -> list[Address]:
    return list(dict.fromkeys(canonical_address(a) for a in addresses))
