"""Idle kept-alive connections to origins, shared by the client connections of one account on
one listener (addons/requestpath.py): a client that connects anew reuses the connection another
of the account's clients left idle, without a new TCP and TLS handshake with the origin (squid
keeps its server connections across clients the same way). Never across accounts: an origin
may keep state per connection (NTLM, a session) that must not pass from one account to another.
Each request on a reused connection is decided and recorded on its own, as on a new one.
"""

from __future__ import annotations

from agent_egress.addons.origin import Upstream, UpstreamKey

PER_DESTINATION = 8  # idle connections kept to one destination for one account
TOTAL = 1024  # idle connections kept in all


class UpstreamPool:
    def __init__(self) -> None:
        self._idle: dict[UpstreamKey, list[Upstream]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def take(self, key: UpstreamKey) -> Upstream | None:
        """An idle connection for `key`, the last one given back first; None if there is none
        still open."""
        idle = self._idle.get(key)
        while idle:
            upstream = idle.pop()
            self._count -= 1
            if not idle:
                del self._idle[key]
            upstream.on_lost = None
            if not upstream.transport.is_closing():
                return upstream
            idle = self._idle.get(key)
        return None

    def give(self, upstream: Upstream) -> None:
        """Keeps `upstream`, done with its response, for the next request to its key; closes
        it when enough are kept already."""
        key = upstream.key
        idle = self._idle.setdefault(key, [])
        if len(idle) >= PER_DESTINATION or self._count >= TOTAL:
            if not idle:
                del self._idle[key]
            upstream.transport.close()
            return
        upstream.idle()
        upstream.on_lost = self._lost
        idle.append(upstream)
        self._count += 1

    def _lost(self, upstream: Upstream) -> None:
        """An idle connection closed (by its origin, most often)."""
        idle = self._idle.get(upstream.key)
        if idle is not None and upstream in idle:
            idle.remove(upstream)
            self._count -= 1
            if not idle:
                del self._idle[upstream.key]

    def close(self) -> None:
        for idle in self._idle.values():
            for upstream in idle:
                upstream.on_lost = None
                upstream.transport.close()
        self._idle.clear()
        self._count = 0
