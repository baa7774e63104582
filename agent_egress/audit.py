"""The audit log: one JSON line per destination event (an AuditEvent, auditevent.py), in the
form a line formatter gives it (JSON lines by default, OCSF with ocsf.line).

Events are queued by the event loop and written by one thread, so a slow disk never blocks the
proxy; `close()` drains the queue, so nothing accepted is lost on shutdown. Each batch is one
`write()` on an O_APPEND descriptor, so lines never interleave.

Before traffic flows on a decision, the gate has `promise` set room aside for its line in the
space this writer keeps reserved ahead of the file (auditspace.py says why a reservation, and
not a flag or a wait for the next write, is what makes the rule "no traffic on a line the
kernel has not accepted" hold); the line, written later, hands its promise back.
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
from .auditspace import SLACK_BYTES, ReservedSpace

log = logging.getLogger(__name__)

_BATCH = 512
# After the first event of a batch, the writer waits this long for more: woken for each event
# (or every 2 ms), it takes the GIL from the event loop hundreds of times a second, and each
# hand-over costs system calls (about 10 µs of the proxy's CPU per request under load, measured
# with the request fast path); lines reach the file at most this much later
_GATHER = 0.02
_STOP = object()
_GROW = object()  # wakes the writer to reserve more room


class AuditLog:
    def __init__(self, path: Path | None,
                 formatter: Callable[[AuditEvent], str] = AuditEvent.line,
                 slack: int = SLACK_BYTES) -> None:
        """`path` None writes to standard output; `formatter` makes each event's line; `slack`:
        the room reserved beyond the promised lines."""
        self.path = path
        self.formatter = formatter
        self.events = 0
        self.write_errors = 0
        self.failing = False  # the last write failed: traffic may go unrecorded
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._reopen = threading.Event()
        self.space = ReservedSpace(slack)
        self._fd = self._open()
        self._growing = False  # a _GROW is queued
        self.space.reset(self._fd)
        if not self.space.reservable and path is not None:
            log.warning("audit log %s: not a regular file, no room can be reserved for lines "
                        "ahead: traffic is refused only once a write has failed", path)
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()

    def promise(self, size: int) -> bool:
        """Sets room aside for one line of at most `size` bytes, to be written later with
        `record(event, size)`; False when there is none (the gate then refuses the traffic).
        Where no room can be reserved: False once a write has failed."""
        kept = self.space.promise(size)
        if self.space.running_low() and not self._growing:
            self._growing = True
            self._queue.put(_GROW)
        return not self.failing if kept is None else kept

    def release(self, promised: int) -> None:
        """Hands back room promised to a line that will not be written."""
        self.space.release(promised)

    def record(self, event: AuditEvent, promised: int = 0) -> None:
        """Queues one event; `promised`: the room `promise` set aside for it."""
        self._queue.put((event, promised) if promised else event)

    def record_all(self, events: list[tuple[AuditEvent, int]]) -> None:
        """Queues events that belong together (a batch of DNS queries), in order, each with
        the room promised to it."""
        for event, promised in events:
            self._queue.put((event, promised) if promised else event)

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
            if _GROW in batch:
                self._growing = False
                batch = [e for e in batch if e is not _GROW]
            self._write(batch)

    def _write(self, batch: list[object]) -> None:
        if self._reopen.is_set() and self.path is not None:
            self._reopen.clear()
            try:
                fd = self._open()
            except OSError as e:
                log.error("cannot reopen audit log %s: %s", self.path, e)
            else:
                self.space.reset(fd)
                os.close(self._fd)
                self._fd = fd
        lines = [self._line(item) for item in batch]
        count = sum(line.count(b"\n") for line, _ in lines)
        dropped = 0
        if self.space.reservable:
            data, dropped = self.space.plan(self._fd, lines)
        else:
            data = b"".join(line for line, _ in lines)
        if dropped:
            self.write_errors += 1
            self.failing = True
            log.error("audit log full: %d events lost (no traffic flowed on them: room for "
                      "the lines of allowed traffic is reserved)", dropped)
            count -= dropped
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            self.write_errors += 1
            self.failing = True
            log.error("audit log write failed, %d events lost: %s", count, e)
            return
        self.events += count
        if not dropped and batch:
            self.failing = False


    def _line(self, item: object) -> tuple[bytes, int]:
        """A queued item as (bytes, room promised to it): an event, an event with its
        promise, or lines relayed from a worker (promised by the worker, in its own
        reservation)."""
        if isinstance(item, bytes):
            return item, 0
        if isinstance(item, tuple):
            event, promised = item
            return self.formatter(event).encode(), promised
        return self.formatter(item).encode(), 0  # type: ignore[arg-type]
