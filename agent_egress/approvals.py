"""Access requests: what a governed account asked to reach, the denials behind it, who answered,
and the connections that wait for the answer in ask mode.

Everything here lives in the proxy's memory and is bounded: an account's recent denials (for
`agent-egress why`), at most MAX_OPEN_PER_ACCOUNT open requests and MAX_HELD_PER_ACCOUNT held
connections per account, closed requests kept for a day (for the metric and so that an old id
is named as closed rather than unknown). Nothing here decides or writes the audit log: the gate
does, and the control server (control.py) answers the commands.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from .auditevent import AuditEvent
from .rules import Decision

log = logging.getLogger(__name__)

DAY = 24 * 3600.0
REQUEST_LIFETIME = DAY  # an open request nobody answers expires after this
MAX_OPEN_PER_ACCOUNT = 16
MAX_HELD_PER_ACCOUNT = 32
MAX_DENIALS_PER_ACCOUNT = 500
MAX_ATTEMPTS = 20  # denied attempts kept as a request's evidence
MAX_REASON = 300
DEFAULT_PORTS = (80, 443)  # what a request without a port (a bare host) is for


class State(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"


class RequestError(Exception):
    """Why a request cannot be opened, found or answered; `usage` for bad input (exit 2), else
    a refusal (exit 1)."""

    def __init__(self, message: str, usage: bool = True) -> None:
        super().__init__(message)
        self.usage = usage


def rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).replace(microsecond=0).isoformat().replace(
        "+00:00", "Z")


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """A client-chosen text fit for one line of a policy comment or a terminal: control
    characters (newlines included) become spaces, and it is cut at `limit`."""
    cleaned = "".join(c if c.isprintable() else " " for c in text).strip()
    return cleaned[:limit]


@dataclass(frozen=True, slots=True)
class Denial:
    """One denial of an account, as `why` shows it."""

    moment: float
    event: AuditEvent
    hint: str | None
    unmatched: bool  # no rule matched a name: a request can change it

    def to_json(self) -> dict[str, object]:
        e = self.event
        return {"ts": e.ts, "event": str(e.event), "host": e.host, "port": e.port,
                "method": e.method, "path": (e.path or "").split("?", 1)[0] or None,
                "exe": e.exe, "rule": e.rule, "reason": e.reason, "hint": self.hint}


@dataclass(eq=False)
class AccessRequest:
    id: str
    account: str
    host: str  # canonical: a name, or an address
    port: int | None  # None: a bare host, ports 80 and 443
    path: str | None
    opened: float
    reason: str = ""
    duration: str | None = None  # what the requester asked for (--for), as given
    requester: str | None = None  # who opened it; None: a held connection (ask mode)
    state: State = State.PENDING
    closed: float | None = None
    closed_by: str | None = None
    answer: str = ""  # the rule written, or why it was rejected
    attempts: deque[Denial] = field(default_factory=lambda: deque(maxlen=MAX_ATTEMPTS))
    held: int = 0  # connections waiting for the answer now
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def destination(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port is not None else host

    def covers(self, host: str, port: int | None) -> bool:
        """Whether an attempt at `host`:`port` is what this request asks for: a request for a
        bare host is for ports 80 and 443; an attempt without a port (a DNS query, or a
        `request` for a bare host) is covered by any request for the host."""
        if host != self.host:
            return False
        if port is None:
            return True
        return port in DEFAULT_PORTS if self.port is None else port == self.port

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "account": self.account, "host": self.host, "port": self.port,
                "path": self.path, "reason": self.reason, "opened": rfc3339(self.opened),
                "attempts": [a.to_json() for a in self.attempts], "state": str(self.state),
                "for": self.duration, "held": self.held,
                "closed": rfc3339(self.closed) if self.closed else None,
                "closed_by": self.closed_by, "answer": self.answer or None}


class Approvals:
    """The proxy's access requests and recent denials; all calls on the event loop."""

    def __init__(self, lifetime: float = REQUEST_LIFETIME,
                 on_open: Callable[[AccessRequest], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.lifetime = lifetime
        self.on_open = on_open
        self.clock = clock
        self._requests: dict[str, AccessRequest] = {}
        self._denials: dict[str, deque[Denial]] = defaultdict(
            lambda: deque(maxlen=MAX_DENIALS_PER_ACCOUNT))
        self._held: dict[str, int] = defaultdict(int)

    # Denials

    def note_denial(self, event: AuditEvent, decision: Decision) -> None:
        """Keeps a denial for `why`, and as evidence for the open request that covers it."""
        if not event.account:
            return
        denial = Denial(self.clock(), event, decision.hint, decision.unmatched)
        self._denials[event.account].append(denial)
        if event.host is not None:
            for request in self._open(event.account):
                if request.covers(event.host, event.port):
                    request.attempts.append(denial)

    def denials(self, account: str, since: float) -> list[Denial]:
        """The account's denials since `since` (POSIX time), oldest first."""
        return [d for d in self._denials.get(account, ()) if d.moment >= since]

    # Requests

    def open(self, account: str, host: str, port: int | None, path: str | None,
             reason: str = "", duration: str | None = None,
             requester: str | None = None) -> tuple[AccessRequest, bool]:
        """The open request of `account` for `host`:`port`, joined, or a new one; and whether
        it is new. Raises RequestError when the account has too many open."""
        self.sweep()
        reason = one_line(reason)
        for request in self._open(account):
            if request.covers(host, port):
                if reason and reason not in request.reason:
                    request.reason = one_line(f"{request.reason}; {reason}" if request.reason
                                              else reason)
                if duration and not request.duration:
                    request.duration = duration
                if requester and not request.requester:
                    request.requester = requester
                return request, False
        if sum(1 for _ in self._open(account)) >= MAX_OPEN_PER_ACCOUNT:
            raise RequestError(f"account {account} has {MAX_OPEN_PER_ACCOUNT} open access "
                               "requests already; wait for an operator to answer them",
                               usage=False)
        request = AccessRequest(self._new_id(), account, host, port, path, self.clock(),
                                reason, duration, requester)
        for denial in self._denials.get(account, ()):
            event = denial.event
            if event.host is not None and request.covers(event.host, event.port):
                request.attempts.append(denial)
        self._requests[request.id] = request
        if self.on_open is not None:
            try:
                self.on_open(request)
            except Exception:
                log.exception("announcing access request %s failed", request.id)
        return request, True

    def find(self, request_id: str) -> AccessRequest:
        """The open request `request_id`; raises RequestError for an unknown or closed one."""
        self.sweep()
        request = self._requests.get(request_id.strip().lower())
        if request is None:
            raise RequestError(f"no access request {one_line(request_id, 40)!r} (unknown id; "
                               "`agent-egress pending` lists the open ones)")
        if request.state is not State.PENDING:
            by = f" by {request.closed_by}" if request.closed_by else ""
            raise RequestError(f"access request {request.id} is {request.state}{by} "
                               f"at {rfc3339(request.closed or request.opened)}, not pending")
        return request

    def pending(self) -> list[AccessRequest]:
        self.sweep()
        return sorted((r for r in self._requests.values() if r.state is State.PENDING),
                      key=lambda r: r.opened)

    def settle(self, request: AccessRequest, state: State, by: str | None,
               answer: str = "") -> None:
        request.state = state
        request.closed = self.clock()
        request.closed_by = by
        request.answer = answer
        request.settled.set()

    def counts(self) -> dict[tuple[str, str], int]:
        """Requests opened or answered in the last day, by account and state. Called from the
        metrics thread: it reads a copy and changes nothing."""
        now = self.clock()
        out: dict[tuple[str, str], int] = defaultdict(int)
        for request in list(self._requests.values()):
            state = request.state
            if state is State.PENDING and now - request.opened >= self.lifetime:
                state = State.EXPIRED
            if request.closed is None or now - request.closed < DAY:
                out[(request.account, str(state))] += 1
        return dict(out)

    def sweep(self) -> None:
        """Expires requests open longer than the lifetime; forgets what is older than a day."""
        now = self.clock()
        for request_id, request in list(self._requests.items()):
            if request.state is State.PENDING and now - request.opened >= self.lifetime:
                self.settle(request, State.EXPIRED, None, "nobody answered in time")
            if request.closed is not None and now - request.closed >= DAY:
                del self._requests[request_id]
        for account, denials in list(self._denials.items()):
            while denials and now - denials[0].moment >= DAY:
                denials.popleft()
            if not denials:
                del self._denials[account]

    # Ask mode: held connections

    async def hold(self, account: str, host: str, port: int | None, path: str | None,
                   wait: float) -> AccessRequest:
        """Opens or joins the request for `host`:`port` and waits up to `wait` seconds for
        its answer; returns the request (still pending if nobody answered in time). Raises
        RequestError when the account has too many connections or requests waiting."""
        if self._held[account] >= MAX_HELD_PER_ACCOUNT:
            raise RequestError(f"{MAX_HELD_PER_ACCOUNT} connections of account {account} "
                               "wait for an answer already", usage=False)
        request, _ = self.open(account, host, port, path)
        request.held += 1
        self._held[account] += 1
        try:
            async with asyncio.timeout(wait):
                await request.settled.wait()
        except TimeoutError:
            pass
        finally:
            request.held -= 1
            self._held[account] -= 1
        return request

    def _open(self, account: str) -> list[AccessRequest]:
        return [r for r in self._requests.values()
                if r.account == account and r.state is State.PENDING]

    def _new_id(self) -> str:
        while True:
            request_id = secrets.token_hex(4)
            if request_id not in self._requests:
                return request_id
