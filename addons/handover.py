"""Giving a client connection that a fast path started on to mitmproxy: what the client sent so
far is replayed into mitmproxy's connection handler, which then serves it as if it had
accepted the connection itself (and decides again, as always)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

READ_LIMIT = 1 << 16

# mitmproxy's handle_stream for the listener
Handover = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


def replay(transport: asyncio.Transport, received: bytes, handover: Handover,
           answered: bool = False) -> Coroutine[Any, Any, None]:
    """Makes mitmproxy's stream protocol `transport`'s, with `received` fed to it; returns
    mitmproxy's coroutine serving the connection, for the caller to run. `answered`: the fast
    path already answered the CONNECT that `received` begins with."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    reader.feed_data(received)
    writer_type = AnsweredWriter if answered else asyncio.StreamWriter
    writer = writer_type(transport, protocol, reader, loop)
    transport.resume_reading()
    return handover(reader, writer)


class AnsweredWriter(asyncio.StreamWriter):
    """For a connection whose CONNECT was answered before mitmproxy saw it: drops mitmproxy's
    200 to the replayed CONNECT; any other answer closes the connection, since the client
    already took the tunnel as open."""

    answered = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.answered:
            super().write(data)
            return
        self.answered = True
        if bytes(data[9:13]) != b"200 ":
            self.transport.close()
