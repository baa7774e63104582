"""Reading audit logs back: plain, gzipped or standard input, JSON lines or OCSF (told apart
line by line), one event at a time, with every unreadable line reported (file:line) and skipped
rather than stopping the read."""

from __future__ import annotations

import gzip
import io
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import IO, cast

from . import ocsf
from .auditevent import AuditEvent, load_object


def read_events(paths: Iterable[str],
                complain: Callable[[str], None] | None = None) -> Iterator[AuditEvent]:
    """Events from each path in turn ("-" is standard input)."""
    complain = complain or (lambda message: print(message, file=sys.stderr))
    for path in paths:
        try:
            with _open(path) as lines:
                yield from _events(path, lines, complain)
        except OSError as e:
            complain(f"{path}: cannot read: {e.strerror or e}")


def _open(path: str) -> IO[str]:
    buffered = cast(io.BufferedReader, sys.stdin.buffer) if path == "-" else open(path, "rb")
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.GzipFile(fileobj=buffered), errors="replace")
    return io.TextIOWrapper(buffered, errors="replace")


def _events(path: str, lines: IO[str], complain: Callable[[str], None]) -> Iterator[AuditEvent]:
    number = 0
    try:
        for number, line in enumerate(lines, 1):  # noqa: B007 - used after the loop
            if line.isspace():  # lines are never empty: only blank ones are skipped
                continue
            try:
                event = parse_line(line)
            except ValueError as problem:
                complain(f"{path}:{number}: {problem}; line skipped")
            else:
                yield event
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        complain(f"{path}:{number + 1}: the file ends early or is corrupt ({e}); read up to here")


def parse_line(line: str) -> AuditEvent:
    """The event an audit line holds, written as JSON lines or as OCSF (which has a
    `class_uid`, a key no JSON-lines event has); ValueError saying what is wrong otherwise."""
    data = load_object(line)
    if "class_uid" in data:
        return ocsf.event(data)
    return AuditEvent.from_dict(data)
