"""Many concurrent clients, for tests/test_load.py and bench/bench_load.py: plain-HTTP keep-alive
GETs and CONNECT tunnels carrying TLS, through the explicit proxy or (transparent mode) straight
to the origin, allowed and denied; and bursts of DNS queries. Every request has a key of its
own (a path or a host name) so that it can be matched with its one audit event.

Standard library only: the transparent-mode benchmark runs it inside a network namespace as an
agent account with the system's python3, `python3 - PLAN_JSON < load.py`, which prints the
results as JSON."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# what each kind of request is, and the audit event that records it: (event, key, decision)
AUDITED = {
    "http": ("request", "path", "allow"),
    "http-denied": ("request", "path", "deny"),
    "tunnel": ("connect", "host", "allow"),
    "tunnel-denied": ("connect", "host", "deny"),
    "dns": ("dns", "host", "allow"),
    "dns-denied": ("dns", "host", "deny"),
}
OK, DENIED, FAILED = "ok", "denied", "failed"
# what a request that broke raises (ssl.SSLError is an OSError; a garbled answer, ValueError
# or IndexError)
BROKEN = (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError)
ADMIT = 50  # first connections opened at once: half the proxy's listen backlog (100)


@dataclass
class Plan:
    """What the clients do. `proxy` None: transparent mode, where the clients connect to the
    origins' addresses themselves and nftables sends them to the proxy."""

    run: str  # in every path and name, so that runs sharing an audit log stay apart
    http: tuple[str, int]  # the plain-HTTP origin's address
    https: tuple[str, int]  # the HTTPS origin's
    workers: dict[str, int]  # kind ("http", "tunnel", "http-denied", "tunnel-denied") -> count
    proxy: tuple[str, int] | None = None
    ca_file: str | None = None  # verifies the origin; None: not verified
    allowed_host: str = "web.test"
    denied_host: str = "denied.test"
    tunnel_domain: str = "secure.test"  # tunnels go to a new name under it each time
    denied_domain: str = "denied.test"
    seconds: float = 0.0  # each worker repeats until then; 0: `requests` each
    requests: int = 1
    timeout: float = 30.0  # for each step of a request
    # The proxy's pid, when its descriptors can be counted: the clients' first connections
    # are then opened in batches, each once the proxy holds the batch before.
    gate_pid: int = 0


@dataclass
class Outcome:
    kind: str
    key: str
    result: str  # OK, DENIED or FAILED (the allowed not served, or the denied served)
    ms: float
    detail: str = ""


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    connected: int = 0  # first connections open together before any request
    idle_fds: int = 0  # the proxy's open descriptors before them (with gate_pid)
    held_fds: int = 0  # and once they were all open, before any request


class _Refused(Exception):
    """The proxy answered, but not with the origin's response."""


def _initials(kind: str) -> str:
    """"hd" for "http-denied": in keys, which must differ between kinds."""
    return "".join(part[0] for part in kind.split("-"))


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Reads one response; its status, and whether the connection stays open."""
    status, headers = await _head(reader)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()
        return status, False
    return status, headers.get("connection", "").lower() != "close"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (TimeoutError, OSError, ssl.SSLError):
        writer.transport.abort()


class _Clients:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.load = Load()
        self.ssl = ssl.create_default_context(cafile=plan.ca_file)
        if plan.ca_file is None:
            self.ssl.check_hostname = False
            self.ssl.verify_mode = ssl.CERT_NONE
        self.started = asyncio.Event()
        self.admission = asyncio.Condition()
        self.admitted = 0
        self.waiting = 0
        self.deadline = 0.0

    async def run(self) -> Load:
        plan = self.plan
        workers = [(kind, n) for kind, count in plan.workers.items() for n in range(count)]
        self.waiting = len(workers)
        tasks = [asyncio.create_task(self.worker(kind, i, n))
                 for i, (kind, n) in enumerate(workers)]
        await self.gate(len(workers))
        await asyncio.gather(*tasks)
        return self.load

    def proxy_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.plan.gate_pid}/fd")) if self.plan.gate_pid else 0

    async def gate(self, workers: int) -> None:
        """Lets the workers open their first connections ADMIT at a time, each batch once the
        proxy holds the ones before (when `gate_pid` is given); then, with every first
        connection open, lets them all go. (A burst beyond the proxy's listen backlog leaves
        connections that the kernel completed for the client but never queued for the proxy,
        until the client sends something.)"""
        limit = time.monotonic() + self.plan.timeout
        self.load.idle_fds = self.proxy_fds()
        while self.admitted < workers and time.monotonic() < limit:
            async with self.admission:
                self.admitted += ADMIT
                self.admission.notify_all()
            # The proxy's descriptors are counted in /proc: nothing to await, so a short poll,
            # bounded by the plan's timeout.
            while time.monotonic() < limit and (  # noqa: ASYNC110
                    workers - self.waiting < min(self.admitted, workers) or
                    self.plan.gate_pid and
                    self.proxy_fds() < self.load.idle_fds + self.load.connected):
                await asyncio.sleep(0.02)
        async with self.admission:  # the rest, if it took too long, so that none is left behind
            self.admitted = workers
            self.admission.notify_all()
        self.load.held_fds = self.proxy_fds()
        self.deadline = time.monotonic() + self.plan.seconds
        self.started.set()

    def more(self, done: int) -> bool:
        if self.plan.seconds:
            return time.monotonic() < self.deadline
        return done < self.plan.requests

    async def connect(self, address: tuple[str, int]) -> tuple[asyncio.StreamReader,
                                                                asyncio.StreamWriter]:
        target = self.plan.proxy or address
        return await asyncio.wait_for(asyncio.open_connection(*target), self.plan.timeout)

    async def first(self, address: tuple[str, int],
                    place: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The worker's first connection, opened before the gate when admitted."""
        async with self.admission:
            await self.admission.wait_for(lambda: self.admitted > place)
        try:
            opened = await self.connect(address)
            self.load.connected += 1
            return opened
        except (TimeoutError, OSError):
            return None
        finally:
            self.waiting -= 1
            await self.started.wait()

    async def worker(self, kind: str, place: int, n: int) -> None:
        if kind.startswith("http"):
            await self.http_worker(kind, place, n)
        else:
            await self.tunnel_worker(kind, place, n)

    def record(self, kind: str, key: str, result: str, began: float, detail: str = "") -> None:
        self.load.outcomes.append(Outcome(kind, key, result, (time.monotonic() - began) * 1000,
                                          detail))

    async def http_worker(self, kind: str, place: int, n: int) -> None:
        """GETs of a new path each, one after another on a kept-alive connection (a new one
        when the server closes it)."""
        plan = self.plan
        host = plan.denied_host if kind == "http-denied" else plan.allowed_host
        origin = plan.http
        target = f"http://{host}:{origin[1]}" if plan.proxy else ""
        host_header = f"{host}:{origin[1]}" if plan.proxy or origin[1] != 80 else host
        opened = await self.first(origin, place)
        done = 0
        while self.more(done):
            path = f"/load/{plan.run}/{_initials(kind)}{n}-{done}"
            done += 1
            began = time.monotonic()
            try:
                if opened is None:
                    opened = await self.connect(origin)
                reader, writer = opened
                writer.write(f"GET {target}{path} HTTP/1.1\r\nHost: {host_header}\r\n\r\n"
                             .encode())
                status, keep = await asyncio.wait_for(_response(reader), plan.timeout)
            except BROKEN as e:
                self.record(kind, path, FAILED, began, repr(e))
                if opened is not None:
                    await _close(opened[1])
                opened = None
                continue
            expected = 403 if kind == "http-denied" else 200
            self.record(kind, path, (DENIED if expected == 403 else OK) if status == expected
                        else FAILED, began, "" if status == expected else f"status {status}")
            if not keep:
                await _close(writer)
                opened = None
        if opened is not None:
            await _close(opened[1])

    async def tunnel_worker(self, kind: str, place: int, n: int) -> None:
        """A new connection each time: a CONNECT (unless transparent), TLS with a new server
        name, one GET."""
        plan = self.plan
        domain = plan.denied_domain if kind == "tunnel-denied" else plan.tunnel_domain
        origin = plan.https
        opened = await self.first(origin, place)
        done = 0
        while self.more(done):
            name = f"{plan.run}-{_initials(kind)}{n}-{done}.{domain}"
            done += 1
            began = time.monotonic()
            writer = None
            try:
                if opened is None:
                    opened = await self.connect(origin)
                reader, writer = opened
                opened = None
                status = await asyncio.wait_for(self.tunnel(reader, writer, name, origin[1]),
                                                plan.timeout)
                result = OK if status == 200 and kind == "tunnel" else FAILED
                self.record(kind, name, result, began, "" if result == OK else
                            f"served ({status}) though denied" if status == 200 else
                            f"status {status}")
            except _Refused as e:
                self.record(kind, name, DENIED if kind == "tunnel-denied" else FAILED, began,
                            str(e))
            except BROKEN as e:
                # Transparent mode refuses a TLS connection by closing it: no status to read.
                refused = plan.proxy is None and kind == "tunnel-denied"
                self.record(kind, name, DENIED if refused else FAILED, began, repr(e))
            if writer is not None:
                await _close(writer)

    async def tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     name: str, port: int) -> int:
        if self.plan.proxy:
            writer.write(f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n"
                         .encode())
            status, headers = await _head(reader)
            if status != 200:
                raise _Refused(f"CONNECT answered {status}")
        await writer.start_tls(self.ssl, server_hostname=name)
        writer.write(f"GET /load/{self.plan.run}/{name} HTTP/1.1\r\nHost: {name}\r\n"
                     "Connection: close\r\n\r\n".encode())
        status, _ = await _response(reader)
        return status


def run(plan: Plan) -> Load:
    return asyncio.run(_Clients(plan).run())


def run_elsewhere(plan: Plan, prefix: Sequence[str] = (), python: str = sys.executable,
                  timeout: float = 600) -> Load:
    """Runs the clients in a process of their own (`prefix` runs it under another command, as
    another user say), with this file as its program on standard input."""
    done = subprocess.run([*prefix, python, "-", json.dumps(asdict(plan))],
                          input=Path(__file__).read_text(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load clients exited {done.returncode}:\n{done.stderr}")
    result = json.loads(done.stdout)
    result["outcomes"] = [Outcome(**o) for o in result["outcomes"]]
    return Load(**result)


# DNS


def query(ident: int, name: str) -> bytes:
    """A recursive query for `name`'s A records."""
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


class _Socket(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        ident = struct.unpack("!H", data[:2])[0] if len(data) >= 12 else -1
        asked = self.waiting.get(ident)
        # the question comes back as it was asked: a reply to an earlier query is not this one
        if asked is not None and data[12:].startswith(asked[0][12:]) and not asked[1].done():
            asked[1].set_result(data)


async def _dns_burst(server: tuple[str, int], names: list[tuple[str, str]], sockets: int,
                     window: int, answer_wait: float) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    pending: Iterator[tuple[str, str]] = iter(names)
    outcomes: list[Outcome] = []

    async def ask(transport: asyncio.DatagramTransport, protocol: _Socket, lane: int) -> None:
        ident = lane
        for kind, name in pending:
            packet = query(ident, name)
            answer = loop.create_future()
            protocol.waiting[ident] = (packet, answer)
            began = time.monotonic()
            transport.sendto(packet)
            try:
                reply = await asyncio.wait_for(answer, answer_wait)
            except TimeoutError:
                outcomes.append(Outcome(kind, name, FAILED, answer_wait * 1000, "no answer"))
                continue
            finally:
                del protocol.waiting[ident]
                ident = (ident + window) % 65536
            ms = (time.monotonic() - began) * 1000
            rcode, answers = reply[3] & 0xF, struct.unpack("!H", reply[6:8])[0]
            if kind == "dns":
                result = OK if rcode == 0 and answers else FAILED
            else:
                result = DENIED if rcode == 3 else FAILED
            outcomes.append(Outcome(kind, name, result, ms, f"rcode {rcode}, {answers} answers"))

    endpoints = [await loop.create_datagram_endpoint(_Socket, remote_addr=server)
                 for _ in range(sockets)]
    try:
        await asyncio.gather(*(ask(transport, protocol, lane)
                               for transport, protocol in endpoints for lane in range(window)))
    finally:
        for transport, _ in endpoints:
            transport.close()
    return outcomes


def dns_names(run: str, count: int, denied_every: int = 4) -> list[tuple[str, str]]:
    """(kind, name): a new name each, ten per parent (many unique subdomains of one parent is
    a tunnelling signal, which is not what this load is about); every `denied_every`th under
    denied.test, the others under ok.test."""
    return [("dns-denied", f"q{i}.p{i // 10}.{run}.denied.test") if i % denied_every == 0
            else ("dns", f"q{i}.p{i // 10}.{run}.ok.test") for i in range(count)]


def dns_burst(server: tuple[str, int], names: list[tuple[str, str]], sockets: int = 50,
              window: int = 8, timeout: float = 10.0) -> list[Outcome]:
    """Sends every query from `sockets` UDP sockets, each with up to `window` outstanding."""
    return asyncio.run(_dns_burst(server, names, sockets, window, timeout))


# Audit


@dataclass
class Matching:
    requests: int = 0
    matched: int = 0  # requests with exactly one event, of the expected decision
    missing: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wrong_decision: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # this run's, but no request's


def match_audit(outcomes: list[Outcome], events: list[dict[str, Any]], run: str) -> Matching:
    """Each request against the audit events that name its key: exactly one each."""
    expected = {(AUDITED[o.kind][0], o.key): o.kind for o in outcomes}
    decisions: dict[tuple[str, str], list[object]] = {key: [] for key in expected}
    matching = Matching(requests=len(outcomes))
    for event in events:
        name = str(event.get("event"))
        key = event.get("path") if name == "request" else event.get("host")
        if not isinstance(key, str) or run not in key:
            continue
        if (name, key) not in expected:
            matching.unexpected.append(f"{name} {key}")
        else:
            decisions[(name, key)].append(event.get("decision"))
    for (name, key), kind in expected.items():
        found = decisions[(name, key)]
        if not found:
            matching.missing.append(key)
        elif len(found) > 1:
            matching.duplicated.append(key)
        elif found[0] != AUDITED[kind][2]:
            matching.wrong_decision.append(f"{key}: {found[0]}")
        else:
            matching.matched += 1
    return matching


def main() -> None:
    plan = Plan(**json.loads(sys.argv[1]))
    plan.http, plan.https = tuple(plan.http), tuple(plan.https)  # type: ignore[assignment]
    if plan.proxy is not None:
        plan.proxy = tuple(plan.proxy)  # type: ignore[assignment]
    json.dump(asdict(run(plan)), sys.stdout)


if __name__ == "__main__":
    main()
