"""An authoritative DNS server for the tests' `.test` names that remembers every query, so a
test can prove that a name never reached it."""

from __future__ import annotations

import random
import socket
import threading
from ipaddress import ip_address

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSLabel, DNSRecord
from dnslib.server import DNSLogger, DNSServer


class Zone:
    """`records` maps names to addresses. `extras` maps a name to records in zone-file form,
    each after the section it goes in ("answer www.test. 60 A 192.0.2.1", "authority ...",
    "additional ..."), added to every answer for that name: a hostile or careless server."""

    def __init__(self, records: dict[str, list[str]],
                 extras: dict[str, list[str]] | None = None) -> None:
        self.records = {name.lower().rstrip("."): list(v) for name, v in records.items()}
        self.extras = {name.lower().rstrip("."): list(v) for name, v in (extras or {}).items()}
        self.queries: list[tuple[str, str]] = []
        self.wire_names: list[tuple[bytes, ...]] = []  # each question's labels, byte for byte
        self._lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((name, qtype))
            self.wire_names.append(tuple(request.q.qname.label))
        for line in self.extras.get(name, ()):
            section, text = line.split(None, 1)
            add = {"answer": reply.add_answer, "authority": reply.add_auth,
                   "additional": reply.add_ar}[section]
            add(*RR.fromZone(text))
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


class FaultyDNS:
    """A DNS server on one loopback UDP port whose fault a test switches while the proxy runs.
    Healthy, it answers every name with 127.0.0.1; `fault` is one of FAULTS, or None."""

    FAULTS = ("down", "slow", "random bytes", "wrong id", "truncated", "another name")

    def __init__(self, delay: float = 4.0) -> None:
        self.delay = delay  # how late a slow answer comes: longer than the resolver waits
        self.fault: str | None = None
        self.socket = self._bind(0)
        self.port = self.socket.getsockname()[1]
        self._serving = threading.Thread(target=self._serve, args=(self.socket,), daemon=True)
        self._serving.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_fault(self, fault: str | None) -> None:
        """"down" closes the socket, so queries get ICMP port unreachable; leaving it binds
        the same port again."""
        assert fault is None or fault in self.FAULTS
        if fault == "down" and self.fault != "down":
            self.socket.close()
            self._serving.join(5)
        elif fault != "down" and self.fault == "down":
            self.socket = self._bind(self.port)
            self._serving = threading.Thread(target=self._serve, args=(self.socket,),
                                             daemon=True)
            self._serving.start()
        self.fault = fault

    def stop(self) -> None:
        self.socket.close()

    @staticmethod
    def _bind(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", port))
        return sock

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                data, client = sock.recvfrom(4096)
            except OSError:
                return
            reply = self._reply(data)
            if self.fault == "slow":
                threading.Timer(self.delay, self._send, (sock, reply, client)).start()
            else:
                self._send(sock, reply, client)

    @staticmethod
    def _send(sock: socket.socket, reply: bytes, client: tuple[str, int]) -> None:
        try:
            sock.sendto(reply, client)
        except OSError:
            pass  # closed meanwhile

    def _reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        name = request.q.qname
        if self.fault == "another name":
            name = DNSLabel("elsewhere.test")
            request.questions[0].qname = name
        reply = request.reply()
        if request.q.qtype == QTYPE.A:
            reply.add_answer(RR(name, QTYPE.A, rdata=A("127.0.0.1"), ttl=1))
        packed = bytes(reply.pack())
        if self.fault == "random bytes":
            return random.randbytes(len(packed))
        if self.fault == "wrong id":
            return bytes([data[0] ^ 0xFF, data[1]]) + packed[2:]
        if self.fault == "truncated":
            return packed[:len(packed) - 7]
        return packed
