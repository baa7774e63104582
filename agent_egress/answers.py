"""Which addresses the resolver gave each account, for which allowed names, until when.

Transparent mode lets a raw connection through only to an address that this account was given
for a name it may reach; this is that record. One address may be shared by several names (a
CDN, virtual hosts), so every name is kept, most recently given first. Bounded: the oldest
addresses go first, expired entries leave as new ones arrive, and an address keeps at most
MAX_NAMES_PER_ADDRESS names."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from .rules import Address

GRACE_SECONDS = 60.0
MAX_ENTRIES = 100_000  # (account, address, name) triples
MAX_NAMES_PER_ADDRESS = 32


@dataclass(frozen=True, slots=True)
class Remembered:
    name: str
    until: float


class AnswerMemory:
    def __init__(self, max_entries: int = MAX_ENTRIES, grace: float = GRACE_SECONDS,
                 max_names: int = MAX_NAMES_PER_ADDRESS) -> None:
        self.max_entries = max_entries
        self.grace = grace
        self.max_names = max_names
        # (account, address) -> name -> until; both in the order last given, oldest first
        self._entries: OrderedDict[tuple[str, Address], OrderedDict[str, float]] = OrderedDict()
        self._count = 0

    def remember(self, account: str, name: str, address: Address, ttl: int,
                 now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        key = (account, address)
        names = self._entries.pop(key, None)
        if names is None:
            names = OrderedDict()
        self._count -= len(names)
        names.pop(name, None)
        names[name] = now + ttl + self.grace
        for old, until in list(names.items()):
            if until <= now or len(names) > self.max_names:
                del names[old]
        self._entries[key] = names
        self._count += len(names)
        self._evict(now)

    def names_for(self, account: str, address: Address, now: float | None = None) -> list[str]:
        """The allowed names this account was given `address` for and may still use, the most
        recently given first."""
        now = time.monotonic() if now is None else now
        names = self._entries.get((account, address))
        if not names:
            return []
        return [name for name, until in reversed(names.items()) if until > now]


    def __len__(self) -> int:
        return self._count

    def _evict(self, now: float) -> None:
        while self._count > self.max_entries:
            _, names = self._entries.popitem(last=False)
            self._count -= len(names)
        while self._entries:
            key, names = next(iter(self._entries.items()))
            if max(names.values(), default=now) > now:
                break
            del self._entries[key]
            self._count -= len(names)
