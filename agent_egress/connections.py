"""What the gate keeps about a connection and a request while they last: the decision, the
address it pinned, when it started, the bytes that went each way."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .rules import Address, Decision, Host, Identity, Policy, host_text


@dataclass(eq=False)
class Tunnel:
    """A connection to one destination: a CONNECT, or a transparent connection."""

    host: Host
    port: int
    decision: Decision
    ip: Address | None
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0
    bytes_down: int = 0
    active: bool = False  # counted in agent_egress_active_connections
    unresolved: bool = False  # refused because the name could not be resolved, not by policy
    promised: int = 0  # room the audit log set aside for its line (gate.promise)
    identity: Identity | None = None  # who it was decided for (with the proxy user)
    policy: Policy | None = None  # the policy it was decided (or last rechecked) under
    closer: Callable[[], None] | None = None  # closes it: set by the adapter that carries it

    @property
    def destination(self) -> str:
        return f"{host_text(self.host)}:{self.port}"

    def duration_ms(self) -> int:
        return round((time.monotonic() - self.started) * 1000)


class Counted:
    """A body's bytes, counted as they pass: a response body's `stream` in mitmproxy."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.total += len(chunk)
        return chunk


@dataclass(slots=True)  # not frozen: one is made per request, and frozen takes 0.8 µs more
class Exchange:
    """An allowed request on its way: recorded once its response has come (or failed)."""

    decision: Decision
    host: Host
    port: int
    ip: Address | None
    started: float = field(default_factory=time.monotonic)
    received: Counted = field(default_factory=Counted)
    promised: int = 0  # room the audit log set aside for its line (gate.promise)

    def duration_ms(self) -> int:
        return round((time.monotonic() - self.started) * 1000)
