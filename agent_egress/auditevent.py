"""The audit event: one typed value for every key of DESIGN.md's audit record, how it is
written as a JSON line and how a line is read back. The writer (audit.py), the resolver, the
proxy's gate and the offline readers (learn, replay, report) all use this type, so adding a
key is one typed edit here."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import orjson

from .rules import Mode, Result, Stage


@dataclass(slots=True, kw_only=True)  # not frozen: one is made per request, and a frozen
# dataclass of 28 fields takes 2.4 µs more to make; nothing changes an event once it is made
class AuditEvent:
    """One destination event (DNS query, connection, request), allowed or not. The field
    order is the order of the keys in each line."""

    ts: str
    event: Stage
    account: str | None = None
    client: str | None = None  # ip:port
    uid: int | None = None
    user: str | None = None
    pid: int | None = None
    exe: str | None = None
    cmdline: str | None = None
    host: str | None = None
    port: int | None = None
    ip: str | None = None
    method: str | None = None
    path: str | None = None  # query removed
    qtype: str | None = None
    decision: Result
    rule: str | None = None  # FILE:LINE, for people
    reason: str | None = None
    mode: Mode | None = None
    policy: str | None = None  # hash of the policy in force
    bytes_up: int | None = None
    bytes_down: int | None = None
    duration_ms: float | None = None
    rule_id: str | None = None
    op: str | None = None
    ancestry: list[str] | None = None
    credential: str | None = None
    approval: str | None = None

    def line(self) -> str:
        """The event as one JSON line, keys in their fixed order. ASCII only: a name with
        U+0085 or U+2028 in it must not look like two lines to a reader."""
        values = _VALUES(self)
        path = values[_PATH]
        if isinstance(path, str) and "?" in path:  # the log never holds a query string
            values = (*values[:_PATH], path.split("?", 1)[0], *values[_PATH + 1:])
        return encode(dict(zip(KEYS, values, strict=True))) + "\n"

    @classmethod
    def parse(cls, line: str) -> AuditEvent:
        """The event a line holds; ValueError saying what is wrong with it otherwise. Keys
        that an older version did not write are None."""
        return cls.from_dict(load_object(line))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEvent:
        """The event a decoded JSON line holds (`data` is consumed); ValueError as `parse`."""
        unknown = data.keys() - _KEYSET
        if unknown:
            raise ValueError(f"not an agent-egress audit event (unknown keys {sorted(unknown)})")
        if "event" not in data:
            raise ValueError("not an agent-egress audit event (no 'event')")
        for key, allowed, expected in _CHECKED:
            if type(data.get(key)) not in allowed:  # exact types: a bool is not an int
                raise ValueError(f"{key} is {type(data.get(key)).__name__}, expected {expected}")
        try:
            data["event"] = Stage(data["event"])
            data["decision"] = Result(str(data.get("decision")))
            if data.get("mode") is not None:
                data["mode"] = Mode(data["mode"])
        except ValueError:
            raise ValueError(f"unknown event {data['event']!r}, decision "
                             f"{data.get('decision')!r} or mode {data.get('mode')!r}") from None
        data.setdefault("ts", "")
        return cls(**data)


KEYS = tuple(f.name for f in fields(AuditEvent))
_KEYSET = frozenset(KEYS)
_PATH = KEYS.index("path")
_VALUES = attrgetter(*KEYS)  # every value at once, in the keys' order
# json.dumps makes an encoder per call; no circular check: an event holds no containers but
# `ancestry`, a list of strings
_ENCODE = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_NONE = type(None)
# keys whose type a reader relies on, with the types a line may give them
_CHECKED: tuple[tuple[str, frozenset[type], str], ...] = tuple(
    (key, frozenset(types), types[0].__name__) for key, types in {
        "ts": (str, _NONE), "event": (str,), "account": (str, _NONE), "host": (str, _NONE),
        "decision": (str, _NONE), "port": (int, _NONE), "uid": (int, _NONE), "pid": (int, _NONE),
        "bytes_up": (int, _NONE), "bytes_down": (int, _NONE), "rule": (str, _NONE),
        "rule_id": (str, _NONE), "op": (str, _NONE), "method": (str, _NONE),
        "path": (str, _NONE), "reason": (str, _NONE), "mode": (str, _NONE),
        "ancestry": (list, _NONE),
    }.items())


def encode(data: dict[str, Any]) -> str:
    """An event's keys and values as json.dumps writes them (compact, ASCII only). orjson
    makes the line ten times faster (3 µs of the writer's time, holding the GIL, per event)
    where its bytes are json's: ASCII without DEL (json escapes both, orjson neither), no
    float in `duration_ms` (the one float key: they spell 1e-05 apart), nothing it refuses (an
    int beyond 64 bits, a lone surrogate); else json writes it."""
    if type(data["duration_ms"]) is not float:
        try:
            line = orjson.dumps(data)
        except orjson.JSONEncodeError:
            pass
        else:
            if line.isascii() and b"\x7f" not in line:
                return line.decode("ascii")
    return _ENCODE(data)


def load_object(line: str) -> dict[str, Any]:
    """The JSON object a line holds; ValueError otherwise."""
    try:
        data = json.loads(line)
    except ValueError:
        raise ValueError("not a JSON object (truncated or corrupt line)") from None
    if type(data) is not dict:  # json gives exact types: dict, str, int, never subclasses
        raise ValueError("not a JSON object")
    return data


def timestamp() -> str:
    """Now, as every event spells its time: RFC 3339, UTC, milliseconds (the system clock's
    nanoseconds floored), formatted once per millisecond."""
    global _last
    ms = time.time_ns() // 1_000_000
    if ms != _last[0]:
        moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
        _last = (ms, rfc3339(moment))
    return _last[1]


def rfc3339(moment: datetime, timespec: str = "milliseconds") -> str:
    """`moment` (aware) in UTC as RFC 3339 with a `Z`, to `timespec` (as isoformat's)."""
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


_last = (-1, "")


def as_dict(event: AuditEvent) -> dict[str, Any]:
    """The event's keys and values as plain JSON types (for CSV and JSON output)."""
    return json.loads(event.line())  # type: ignore[no-any-return]
