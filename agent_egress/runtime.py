"""What the proxy and the resolver share in one process: the policy snapshot (swapped whole on
reload), the audit log, the upstream resolver and the socket-owner lookup."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .answers import AnswerMemory
from .audit import AuditLog
from .identity import SocketOwners
from .metrics import Metrics
from .rules import Policy, PolicyError, parse_policy
from .upstream import DnsServers, SystemResolver

log = logging.getLogger(__name__)

EMBEDDED_POLICY = "embedded default policy"


def embedded_policy() -> Policy:
    """Learning mode for every local client, source-control presets allowed."""
    data = resources.files(__package__).joinpath("default-policy.yaml").read_bytes()
    return Policy(parse_policy(data, EMBEDDED_POLICY))


class PolicyHolder:
    """The policy in force. Readers take `current` once per decision and use that snapshot;
    a reload replaces the reference only when the new file is valid."""

    def __init__(self, path: Path | None,
                 on_change: Callable[[Policy], None] | None = None) -> None:
        self.path = path
        self.current = Policy.load(path) if path else embedded_policy()
        self.on_change = on_change
        self.loaded_at = time.time()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self._stamp = self._file_stamp()

    def reload(self) -> bool:
        if self.path is None:
            return True
        self._stamp = self._file_stamp()
        try:
            policy = Policy.load(self.path)
        except PolicyError as e:
            self.reloads_failed += 1
            log.error("policy reload refused, keeping policy %s in force:\n%s",
                      self.current.digest, e)
            return False
        self.current = policy
        self.loaded_at = time.time()
        self.reloads_ok += 1
        if self.on_change is not None:
            self.on_change(policy)
        log.info("policy reloaded from %s: %s", self.path, policy.digest)
        return True

    async def watch(self, interval: float = 1.0) -> None:
        """Reloads when the file changes (also when it is replaced by a rename)."""
        while True:
            await asyncio.sleep(interval)
            if self.path is not None and self._file_stamp() != self._stamp:
                self.reload()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size


@dataclass
class Runtime:
    policies: PolicyHolder
    audit: AuditLog
    resolver: SystemResolver | DnsServers
    owners: SocketOwners | None
    metrics: Metrics
    memory: AnswerMemory = field(default_factory=AnswerMemory)
    on_audit_failure: str = "deny"  # or "allow": keep serving, unrecorded
