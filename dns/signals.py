"""Signs that DNS is being used as a tunnel: data smuggled out in names, or back in records.

Each signal is cheap to compute and bounded in memory: long labels or names, labels that look
like encoded data (high entropy), many unique names under one parent in a short window, and
bursts of the record types tunnels favour (TXT, NULL, ANY)."""

from __future__ import annotations

import functools
import time
from collections import OrderedDict, deque

from agent_egress.encoded import looks_encoded

LONG_LABEL = 40
LONG_NAME = 120
UNIQUE_WINDOW = 60.0
UNIQUE_LIMIT = 50
BURST_WINDOW = 10.0
BURST_LIMIT = 20
BURST_TYPES = frozenset({"TXT", "NULL", "ANY"})
MAX_TRACKED = 10_000


@functools.lru_cache(maxsize=4096)
def _shape(name: str) -> tuple[str, ...]:
    """The signals a name raises by itself: worked out once for names asked again and again."""
    found = []
    labels = name.split(".")
    if any(len(label) > LONG_LABEL for label in labels):
        found.append("long_label")
    if len(name) > LONG_NAME:
        found.append("long_name")
    if any(looks_encoded(label) for label in labels):
        found.append("high_entropy")
    return tuple(found)


class TunnelSignals:
    """Per account: `observe` returns the signals a query raises ("long_label", ...)."""

    def __init__(self) -> None:
        # (account, parent) -> recent unique subdomains and when each was first seen
        self._subdomains: OrderedDict[tuple[str, str], dict[str, float]] = OrderedDict()
        self._bursts: dict[str, deque[float]] = {}

    def observe(self, account: str, name: str, parent: str | None, qtype: str,
                now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        found = list(_shape(name))
        if parent is not None and self._many_unique(account, parent, name, now):
            found.append("many_subdomains")
        if qtype in BURST_TYPES and self._burst(account, now):
            found.append("record_type_burst")
        return found

    def _many_unique(self, account: str, parent: str, name: str, now: float) -> bool:
        key = (account, parent)
        seen = self._subdomains.pop(key, None) or {}
        self._subdomains[key] = seen  # most recently used last
        if len(self._subdomains) > MAX_TRACKED:
            self._subdomains.popitem(last=False)
        for old in [n for n, t in seen.items() if now - t > UNIQUE_WINDOW]:
            del seen[old]
        if name not in seen and len(seen) <= UNIQUE_LIMIT:
            seen[name] = now
        return len(seen) > UNIQUE_LIMIT

    def _burst(self, account: str, now: float) -> bool:
        times = self._bursts.setdefault(account, deque(maxlen=BURST_LIMIT + 1))
        times.append(now)
        while times and now - times[0] > BURST_WINDOW:
            times.popleft()
        return len(times) > BURST_LIMIT
