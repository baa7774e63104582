"""Which addresses the resolver gave each account, for which allowed name, until when.

Transparent mode lets a raw connection through only to an address that this account was given
for a name it may reach; this is that record. Bounded: the oldest entries go first, and
expired ones leave as new ones arrive. The resolver writes it and the proxy reads it, so it
lives in the shared core beside the runtime that holds it, not in dns/."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from .rules import Address

GRACE_SECONDS = 60.0
MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Remembered:
    name: str
    until: float


class AnswerMemory:
    def __init__(self, max_entries: int = MAX_ENTRIES, grace: float = GRACE_SECONDS) -> None:
        self.max_entries = max_entries
        self.grace = grace
        self._entries: OrderedDict[tuple[str, Address], Remembered] = OrderedDict()

    def remember(self, account: str, name: str, address: Address, ttl: int,
                 now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        key = (account, address)
        self._entries.pop(key, None)
        self._entries[key] = Remembered(name, now + ttl + self.grace)
        self._evict(now)

    def name_for(self, account: str, address: Address, now: float | None = None) -> str | None:
        """The allowed name this account was given `address` for, if still current."""
        now = time.monotonic() if now is None else now
        entry = self._entries.get((account, address))
        if entry is None or entry.until <= now:
            return None
        return entry.name

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self, now: float) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if oldest.until > now:
                break
            del self._entries[key]
