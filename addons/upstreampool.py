"""Idle kept-alive connections to origins, shared by the client connections of one account on
one listener (addons/requestpath.py): a client that connects anew reuses the connection another
of the account's clients left idle, without a new TCP and TLS handshake with the origin (squid
keeps its server connections across clients the same way). Never across accounts: an origin
may keep state per connection (NTLM, a session) that must not pass from one account to another.
Each request on a reused connection is decided and recorded on its own, as on a new one.
"""

from __future__ import annotations

import time

from agent_egress.addons.origin import Upstream, UpstreamKey

# Idle connections kept in all. Not capped per destination: clients of one account that take
# turns on one origin leave as many idle between their requests as they use (a cap of 8 closed
# and dialled again a fifth of the connections under 32 kept-alive clients)
TOTAL = 1024
IDLE_LIMIT = 60.0  # seconds an idle connection is reused after (squid's server_idle_pconn_timeout)


class UpstreamPool:
    def __init__(self) -> None:
        self._idle: dict[UpstreamKey, list[Upstream]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def take(self, key: UpstreamKey) -> Upstream | None:
        """An idle connection for `key`, the last one given back first; None if there is none
        still open and idle for less than IDLE_LIMIT."""
        idle = self._idle.get(key)
        found = None
        while idle and found is None:
            upstream = idle.pop()
            self._count -= 1
            upstream.on_lost = None
            if upstream.transport.is_closing():
                continue
            if time.monotonic() - upstream.idle_since > IDLE_LIMIT:
                upstream.transport.close()  # the origin may have dropped it without a word
                continue
            found = upstream
        if idle is not None and not idle:
            del self._idle[key]
        return found

    def give(self, upstream: Upstream) -> None:
        """Keeps `upstream`, done with its response, for the next request to its key; closes
        it when TOTAL are kept already."""
        if self._count >= TOTAL:
            self._drop_stale()
        if self._count >= TOTAL:
            upstream.transport.close()
            return
        upstream.idle()
        upstream.idle_since = time.monotonic()
        upstream.on_lost = self._lost
        self._idle.setdefault(upstream.key, []).append(upstream)
        self._count += 1

    def _drop_stale(self) -> None:
        """Closes the connections idle longer than IDLE_LIMIT (they would not be taken): when
        the pool is full of connections to destinations no one asks for any more."""
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            fresh = [u for u in idle if now - u.idle_since <= IDLE_LIMIT]
            for upstream in idle:
                if now - upstream.idle_since > IDLE_LIMIT:
                    upstream.on_lost = None
                    upstream.transport.close()
            self._count -= len(idle) - len(fresh)
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]

    def _lost(self, upstream: Upstream) -> None:
        """An idle connection closed (by its origin, most often)."""
        idle = self._idle.get(upstream.key)
        if idle is not None and upstream in idle:
            idle.remove(upstream)
            self._count -= 1
            if not idle:
                del self._idle[upstream.key]

    def close(self) -> None:
        """Closes every idle connection (the listener is closing)."""
        for idle in self._idle.values():
            for upstream in idle:
                upstream.on_lost = None
                upstream.transport.close()
        self._idle.clear()
        self._count = 0
