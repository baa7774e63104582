"""Scripted parts for the fast paths' in-process tests (tests/addons/test_requestpath.py,
test_inspectpath.py): an origin that answers by path and records what it received, a stand-in
for mitmproxy that records what it is handed, a resolver for two names, the listener with the
real gate in front, and a strict (h11) reader of responses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import h11
import uvloop

from agent_egress.addons.fastpath import FastTunnels
from agent_egress.addons.handover import Handover
from agent_egress.addons.tlsterminate import Inspection
from agent_egress.audit import AuditLog
from agent_egress.gate import Gate
from agent_egress.metrics import Metrics
from agent_egress.runtime import PolicyHolder, Runtime
from agent_egress.upstream import ResolveError

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class Names:
    async def addresses(self, name: str) -> list[Any]:
        if name not in ("web.test", "api.test"):
            raise ResolveError(f"{name} does not resolve")
        return [ip_address("127.0.0.1")]


# The origin: answers by path, records what it received


ANSWERS = {
    "/hello": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    "/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the origin closes",
    "/early": b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/empty": b"HTTP/1.1 204 No Content\r\n\r\n",
    "/head": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
    "/two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "/broken": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
    "/switch": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
    "/close-length": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    "/empty-close": b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
    "/then-drop": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/idle-drop": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",  # kept alive, then closed
    "/too-much": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
}


class ScriptedOrigin:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.connections = 0
        self.dropped = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:]
                                                     if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((method, target, headers, body))
                if target.startswith("/big/"):
                    size = int(target.split("/")[2])
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                    writer.write(b"x" * size)
                elif target == "/echo":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                                 % (len(str(len(body))), str(len(body)).encode()))
                else:
                    writer.write(ANSWERS[target])
                await writer.drain()
                if target in ("/close", "/broken", "/too-much", "/switch", "/close-length",
                              "/empty-close", "/idle-drop"):
                    break
                if target == "/then-drop":  # the next request crosses our idle timeout
                    await reader.readuntil(b"\r\n\r\n")
                    self.dropped += 1
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class Mitmproxy:
    """Stands in for mitmproxy's handle_stream: records what it was handed, answers 299."""

    def __init__(self) -> None:
        self.handed: list[bytes] = []

    async def handle_stream(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)  # what the client sends meanwhile belongs to mitmproxy too
        data = bytes(reader._buffer)  # type: ignore[attr-defined]
        self.handed.append(data)
        writer.write(b"HTTP/1.1 299 mitmproxy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()


async def closes(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 0.2) == b""
    except TimeoutError:
        return False


@dataclass
class Answer:
    status_code: int
    body: bytes


async def read_responses(reader: asyncio.StreamReader, count: int,
                         methods: list[str]) -> list[Any]:
    client = h11.Connection(h11.CLIENT)
    responses: list[Any] = []
    current: Any = None
    asked = 0
    while len(responses) < count:
        if asked == len(responses):  # h11 needs the request to know how the response is framed
            asked += 1
            client.send(h11.Request(method=methods[len(responses)], target="/",
                                    headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:  # closed before the response was whole
            break
        if event is h11.NEED_DATA:
            client.receive_data(await asyncio.wait_for(reader.read(65536), 10))
        elif isinstance(event, h11.Response):
            current = Answer(event.status_code, b"")
        elif isinstance(event, h11.InformationalResponse):
            continue
        elif isinstance(event, h11.Data):
            current.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            responses.append(current)
            current = None
            if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                break
            client.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            break
    return responses


@asynccontextmanager
async def fast_listener(policy: Path, audit: Path, handover: Handover,
                        inspection: Inspection | None = None
                        ) -> AsyncIterator[tuple[Gate, FastTunnels, int]]:
    """The explicit listener's fast paths (requests too; inspected tunnels with `inspection`)
    with the real gate over `policy`, on a loopback port: the gate, the listener and its port.
    Closed afterwards, every tunnel and line recorded."""
    gate = Gate(Runtime(PolicyHolder(policy), AuditLog(audit), Names(), None,  # type: ignore[arg-type]
                        Metrics()))
    tunnels = FastTunnels(gate, handover, set, requests=True, inspection=inspection)
    server = await asyncio.get_running_loop().create_server(tunnels.protocol, "127.0.0.1", 0)
    try:
        yield gate, tunnels, server.sockets[0].getsockname()[1]
    finally:
        await tunnels.close()
        server.close()
        gate.runtime.audit.close()
        gate.close()
