"""An authoritative DNS server for the tests' `.test` names that remembers every query, so a
test can prove that a name never reached it."""

from __future__ import annotations

import socket
import threading
from ipaddress import ip_address

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import DNSLogger, DNSServer


class Zone:
    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = {name.lower().rstrip("."): list(v) for name, v in records.items()}
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((name, qtype))
        addresses = self.records.get(name)
        if addresses is None and "." in name:  # "*.example.test" stands for any name below
            parent = name.split(".", 1)[1]
            addresses = next((self.records[f"*.{suffix}"] for suffix in _suffixes(parent)
                              if f"*.{suffix}" in self.records), None)
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for text in addresses:
            address = ip_address(text)
            if qtype == "A" and address.version == 4:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(text), ttl=60))
            elif qtype == "AAAA" and address.version == 6:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(text), ttl=60))
        return reply

    def asked(self, name: str) -> bool:
        with self._lock:
            return any(q == name for q, _ in self.queries)


def _suffixes(name: str) -> list[str]:
    labels = name.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


class TestDNS:
    """UDP and TCP on one loopback port."""

    def __init__(self, zone: Zone, host: str = "127.0.0.1", port: int = 0) -> None:
        self.zone = zone
        self.host = host
        logger = DNSLogger(log="-request,-reply,-truncated,-recv,-send,-data", prefix=False)
        for attempt in range(20):  # a free UDP port may be taken for TCP: try another
            self.udp = DNSServer(zone, address=host, port=port, logger=logger)
            self.port = self.udp.server.server_address[1]
            try:
                self.tcp = DNSServer(zone, address=host, port=self.port, tcp=True,
                                     logger=logger)
                break
            except OSError:
                self.udp.server.server_close()
                if port or attempt == 19:
                    raise
        # room for a burst of queries (the default holds about 200) while threads start
        self.udp.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.udp.start_thread()
        self.tcp.start_thread()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self.udp.stop()
        self.tcp.stop()
        self.udp.server.server_close()
        self.tcp.server.server_close()
