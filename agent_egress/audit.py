"""The audit log: one JSON line per destination event (an AuditEvent, auditevent.py), in the
form a line formatter gives it (JSON lines by default, OCSF with ocsf.line).

Events are queued by the event loop and written by one thread, so a slow disk never blocks the
proxy; `close()` drains the queue, so nothing accepted is lost on shutdown. Each batch is one
`write()` on an O_APPEND descriptor, so lines never interleave.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .auditevent import AuditEvent

log = logging.getLogger(__name__)

_BATCH = 512
# After the first event of a batch, the writer waits this long for more: woken for each event
# (or every 2 ms), it takes the GIL from the event loop hundreds of times a second, and each
# hand-over costs system calls (about 10 µs of the proxy's CPU per request under load, measured
# with the request fast path); lines reach the file at most this much later
_GATHER = 0.02
_STOP = object()


class AuditLog:
    def __init__(self, path: Path | None,
                 formatter: Callable[[AuditEvent], str] = AuditEvent.line) -> None:
        """`path` None writes to standard output; `formatter` makes each event's line."""
        self.path = path
        self.formatter = formatter
        self.events = 0
        self.write_errors = 0
        self.failing = False  # the last write failed: traffic may go unrecorded
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._reopen = threading.Event()
        self._fd = self._open()
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()

    def record(self, event: AuditEvent) -> None:
        """Queues one event."""
        self._queue.put(event)

    def record_all(self, events: list[AuditEvent]) -> None:
        """Queues events that belong together (a batch of DNS queries), in order."""
        for event in events:
            self._queue.put(event)

    def append_lines(self, data: bytes) -> None:
        """Queues complete JSON lines written elsewhere (by a proxy worker process): they go
        out between this process's own events, never inside one."""
        self._queue.put(data)

    def reopen(self) -> None:
        """Opens the file anew before the next write (after logrotate moved it)."""
        self._reopen.set()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        if self.path is not None:
            os.close(self._fd)

    def _open(self) -> int:
        if self.path is None:
            return sys.stdout.fileno()
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            time.sleep(_GATHER)
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [e for e in batch if e is not _STOP]
            if batch:
                self._write(batch)

    def _write(self, batch: list[object]) -> None:
        if self._reopen.is_set() and self.path is not None:
            self._reopen.clear()
            try:
                fd = self._open()
            except OSError as e:
                log.error("cannot reopen audit log %s: %s", self.path, e)
            else:
                os.close(self._fd)
                self._fd = fd
        line = self.formatter
        data = b"".join(item if isinstance(item, bytes) else line(item).encode()  # type: ignore
                        for item in batch)
        count = sum(item.count(b"\n") if isinstance(item, bytes) else 1 for item in batch)
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            self.write_errors += 1
            self.failing = True
            log.error("audit log write failed, %d events lost: %s", count, e)
            return
        self.events += count
        self.failing = False

