"""What the proxy and the resolver share in one process: the policy snapshot (swapped whole on
reload), the audit log, the upstream resolver and the socket-owner lookup."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .answers import AnswerMemory
from .audit import AuditLog
from .credentials import Secrets, load_secrets, stamp
from .filetrust import read_checked
from .identity import SocketOwners
from .metrics import Metrics
from .nftables import governed_accounts
from .rules import Policy, PolicyError, Problem, parse_policy
from .rules.loader import gc_paused
from .upstream import DnsServers, SystemResolver

log = logging.getLogger(__name__)

EMBEDDED_POLICY = "embedded default policy"
EMBEDDED_EDITING = ("the embedded default policy has no file to edit: `agent-egress init "
                    "policy.yaml` writes it to one; then run with --policy policy.yaml")


def embedded_policy() -> Policy:
    """Learning mode for every local client, source-control presets allowed."""
    data = resources.files(__package__).joinpath("default-policy.yaml").read_bytes()
    return Policy(parse_policy(data, EMBEDDED_POLICY), editing=EMBEDDED_EDITING)


class UntrustedPolicy(ValueError):
    """A policy file that an account it governs could have written: not to be put in force."""


class PolicyHolder:
    """The policy in force. Readers take `current` once per decision and use that snapshot;
    a reload replaces the reference only when the new file is valid and no governed account
    could have written it (the file, a link or a directory on its way: see filetrust.py).

    In the running proxy, reloads (`request_reload`, `watch`) read, parse and index the file in
    a worker thread, so that the event loop keeps answering during the seconds a large policy
    takes; the loop only swaps the reference and runs `on_change`. `reload` does it all in the
    caller's thread, for callers without a loop.

    The credentials' secrets (credentials.py) are read with the policy and swapped with it:
    `secrets` always belongs to `current`. A change to a secret file reloads both."""

    def __init__(self, path: Path | None,
                 on_change: Callable[[Policy], None] | None = None) -> None:
        self.path = path
        self.current, self.secrets = _load(path, None) if path else (embedded_policy(),
                                                                         Secrets())
        self.on_change = on_change
        self.loaded_at = time.time()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self._stamp = self._stamps()
        self._lock: asyncio.Lock | None = None
        self._queued = False
        self._tasks: set[asyncio.Task[bool]] = set()

    def reload(self) -> bool:
        """Reloads in this thread (blocking it for as long as the file takes)."""
        if self.path is None:
            return True
        self._stamp = self._stamps()
        return self._apply(_attempt(self.path, self.current))

    async def reload_off_loop(self) -> bool:
        """Reloads with the file read, parsed and indexed in a worker thread; reloads run one
        at a time, in the order asked."""
        if self.path is None:
            return True
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            self._queued = False
            self._stamp = self._stamps()
            with _short_gil_turns():
                outcome = await asyncio.to_thread(_attempt, self.path, self.current)
            retired = [self.current]
            applied = self._apply(outcome)
            if applied:
                # A 100,000-rule policy takes tens of milliseconds to free: this reference is
                # dropped in a thread, which frees it when it is the last.
                await asyncio.to_thread(retired.clear)
            return applied

    def request_reload(self) -> None:
        """For a signal handler on the event loop: starts a reload off the loop, unless one
        not yet begun is waiting already (it will read the file as it is then)."""
        if self._queued:
            return
        self._queued = True
        task = asyncio.get_running_loop().create_task(self.reload_off_loop())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def watch(self, interval: float = 1.0) -> None:
        """Reloads when the file changes (also when it is replaced by a rename)."""
        while True:
            await asyncio.sleep(interval)
            if self.path is not None and self._stamps() != self._stamp:
                await self.reload_off_loop()

    def _apply(self, outcome: tuple[Policy, Secrets] | PolicyError | UntrustedPolicy) -> bool:
        if not isinstance(outcome, tuple):
            self.reloads_failed += 1
            log.error("policy reload refused, keeping policy %s in force:%s%s",
                      self.current.digest, "\n" if isinstance(outcome, PolicyError) else " ",
                      outcome)
            return False
        self.current, self.secrets = outcome
        self.loaded_at = time.time()
        self.reloads_ok += 1
        if self.on_change is not None:
            self.on_change(self.current)
        log.info("policy reloaded from %s: %s", self.path, self.current.digest)
        return True

    def _stamps(self) -> tuple[object, ...]:
        """The policy file's stamp and its secret files' (a rotated secret reloads)."""
        return self._file_stamp(), *sorted((path, stamp(path))
                                           for path in self.secrets.files())

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size


RELOAD_SWITCH_INTERVAL = 0.0005


@contextlib.contextmanager
def _short_gil_turns() -> Iterator[None]:
    """While a thread parses, the event loop's thread waits for the GIL after each system call
    it makes, up to the switch interval (5 ms) every time, and a request through the proxy
    makes dozens: a tenth of the interval for the reload's duration keeps those waits short."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, RELOAD_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _attempt(path: Path, current: Policy
             ) -> tuple[Policy, Secrets] | PolicyError | UntrustedPolicy:
    """The new policy, or why not; safe to run in any thread (touches no state)."""
    try:
        return _load(path, current)
    except (PolicyError, UntrustedPolicy) as e:
        return e


def _load(path: Path, current: Policy | None) -> tuple[Policy, Secrets]:
    """Reads the file through a checked chain (see filetrust.py), then parses it, then reads
    its credentials' secrets. The accounts that may not have written it (nor read a secret)
    are those the policy in force governs and those the new one does; the proxy's own uid
    aside (it owns its files: start-up warns)."""
    file = str(path)
    try:
        data, chain = read_checked(path)
    except OSError as e:
        raise PolicyError([Problem(file, 1, 1, f"cannot read the policy: "
                                               f"{e.strerror or e}")]) from None
    if current is not None and (reason := chain.untrusted_reason(_governed(current))):
        raise UntrustedPolicy(reason)
    # The objects about to be built (a million for 100,000 rules) are all in the youngest
    # generation: its first collection once the collector is back, on whichever thread, would
    # hold the GIL for a few hundred milliseconds walking them. Freezing, then unfreezing,
    # moves every tracked object to the oldest generation without a walk: where a long-lived
    # policy ends up anyway. Once the proxy serves, start-up's objects are frozen for good
    # (runner.settle_heap): unfreezing would hand them back to the collector, so the policy
    # stays frozen with them, and what is garbage by then is collected first (only what was
    # made since start-up is walked; cyclic garbage made during the parse stays frozen).
    settled = gc.get_freeze_count() > 0
    if settled:
        gc.collect()
    with gc_paused():
        policy = Policy(parse_policy(data, file))
        gc.freeze()
    if not settled:
        gc.unfreeze()
    if reason := chain.untrusted_reason(_governed(policy)):
        raise UntrustedPolicy(reason)
    governed = _governed(policy)
    if current is not None:
        governed.update(_governed(current))
    return policy, load_secrets(policy.document, governed)


def _governed(policy: Policy) -> dict[int, str]:
    governed = governed_accounts(policy)
    governed.pop(os.getuid(), None)
    return governed


@dataclass
class Runtime:
    policies: PolicyHolder
    audit: AuditLog
    resolver: SystemResolver | DnsServers
    owners: SocketOwners | None
    metrics: Metrics
    memory: AnswerMemory = field(default_factory=AnswerMemory)
    on_audit_failure: str = "deny"  # or "allow": keep serving, unrecorded
