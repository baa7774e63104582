"""Connections that outlive the decision that opened them. A CONNECT tunnel (or transparent
connection) is decided once, when it opens; a rule can stop allowing it while it is open, by
its `expires` passing or by a reload that withdraws or narrows it. The gate keeps the open,
allowed tunnels here; whenever the policy in force changes or one of its `expires` passes,
each is decided again, and those no longer allowed are closed (through the close hook their
adapter registered) with an audit event saying why."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .connections import Tunnel
from .rules import Policy, Query, Stage, host_text

if TYPE_CHECKING:
    from .clients import Client
    from .gate import Gate

log = logging.getLogger(__name__)

RECHECK_INTERVAL = 0.25  # seconds between looks at the policy and the clock


class LiveTunnels:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.open: dict[Tunnel, Client] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._checked: Policy | None = None
        self._last_look = time.time()

    def add(self, client: Client, tunnel: Tunnel) -> None:
        self.open[tunnel] = client
        if self._watcher is None or self._watcher.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a test calling the gate directly): nothing to watch with
            self._watcher = loop.create_task(self._watch())

    def remove(self, tunnel: Tunnel) -> None:
        self.open.pop(tunnel, None)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _watch(self) -> None:
        while self.open:
            await asyncio.sleep(RECHECK_INTERVAL)
            try:
                self.recheck()
            except Exception:
                log.exception("rechecking open connections failed")

    def recheck(self, now: float | None = None) -> None:
        """Decides every open tunnel again if the policy changed since it was decided, or an
        `expires` has passed since the last look."""
        policy = self.gate.policy
        now = time.time() if now is None else now
        expiry = policy.next_expiry(self._last_look)
        expired = expiry is not None and expiry <= now
        self._last_look = now
        if policy is self._checked and not expired and all(
                tunnel.policy is policy for tunnel in self.open):
            return
        self._checked = policy
        for tunnel, client in list(self.open.items()):
            if expired or tunnel.policy is not policy:
                why = self._withdrawn(policy, client, tunnel, now,
                                      expired and tunnel.policy is policy)
                tunnel.policy = policy
                if why is not None:
                    self._end(client, tunnel, why)

    def _withdrawn(self, policy: Policy, client: Client, tunnel: Tunnel, now: float,
                   by_time: bool) -> str | None:
        """Why `tunnel` is no longer allowed under `policy` now, or None while it is."""
        decided = tunnel.decision
        choice = self.gate.account(policy, tunnel.identity or client.identity)
        if choice.account is None:
            return f"closed while open, as the policy changed (now {policy.digest}): " \
                   f"{choice.reason}"
        # the engine's decision alone: a failing audit log refuses new traffic, it does not
        # end what was decided and recorded before
        decision = policy.decide(Query(choice.account, host_text(tunnel.host), tunnel.port,
                                       Stage.CONNECT, now=now))
        if decision.passes and tunnel.ip is not None:
            checked = policy.decide_address(decision.account, host_text(tunnel.host),
                                            tunnel.ip, tunnel.port, now)
            if not checked.passes:
                decision = checked
        cause = f"rule {decided.rule} expired" if by_time and decided.rule else \
            f"the policy changed (now {policy.digest})"
        if not decision.passes:
            return f"closed while open, as {cause}: {decision.reason}"
        if decision.inspect and not decided.inspect:
            return (f"closed while open, as {cause}: {decision.reason}, which this tunnel "
                    "(not inspected) cannot be")
        return None

    def _end(self, client: Client, tunnel: Tunnel, why: str) -> None:
        self.remove(tunnel)
        self.gate.withdraw(client, tunnel, why)
        closer: Callable[[], None] | None = tunnel.closer
        if closer is None:
            log.warning("%s: %s has no close hook; it stays open: %s", client.address,
                        tunnel.destination, why)
            return
        closer()

