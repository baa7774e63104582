"""Reading audit logs back: plain, gzipped or standard input, one event at a time, with every
unreadable line reported (file:line) and skipped rather than stopping the read."""

from __future__ import annotations

import gzip
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, cast

from .audit import KEYS

_TYPES: dict[str, tuple[type, ...]] = {
    "ts": (str,), "event": (str,), "account": (str,), "host": (str,), "decision": (str,),
    "port": (int,), "uid": (int,), "pid": (int,), "bytes_up": (int,), "bytes_down": (int,),
}
_KEYSET = frozenset(KEYS)
_ALLOWED = tuple((key, frozenset({*types, type(None)})) for key, types in _TYPES.items())
DECISIONS = ("allow", "deny", "would_deny")
EVENTS = ("dns", "connect", "request")


def read_events(paths: Iterable[str],
                complain: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
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


def _events(path: str, lines: IO[str], complain: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    number = 0
    try:
        for number, line in enumerate(lines, 1):  # noqa: B007 - used after the loop
            if line.isspace():  # lines are never empty: only blank ones are skipped
                continue
            problem, event = _parse(line)
            if problem:
                complain(f"{path}:{number}: {problem}; line skipped")
            else:
                yield event
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        complain(f"{path}:{number + 1}: the file ends early or is corrupt ({e}); read up to here")


def _parse(line: str) -> tuple[str | None, dict[str, Any]]:
    try:
        event = json.loads(line)
    except ValueError:
        return "not a JSON object (truncated or corrupt line)", {}
    if type(event) is not dict:  # json gives exact types: dict, str, int, never subclasses
        return "not a JSON object", {}
    if not event.keys() <= _KEYSET or "event" not in event:
        unknown = sorted(set(event) - _KEYSET)
        return (f"not an agent-egress audit event (unknown keys {unknown})" if unknown
                else "not an agent-egress audit event (no 'event')"), {}
    get = event.get
    for key, allowed in _ALLOWED:
        if type(get(key)) not in allowed:  # exact types, so that a bool is not an int
            types = _TYPES[key]
            return f"{key} is {type(get(key)).__name__}, expected {types[0].__name__}", {}
    if event["event"] not in EVENTS or event.get("decision") not in DECISIONS:
        return f"unknown event {event['event']!r} or decision {event.get('decision')!r}", {}
    return None, event
