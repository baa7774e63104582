"""Watches for governed accounts serving the network: a listening socket on a non-loopback
address is counted in agent_egress_exposed_listeners{account} (the nftables ruleset also keeps
such sockets from answering non-loopback peers)."""

from __future__ import annotations

import asyncio
import logging
import socket

from .identity import TCP_LISTEN, dump_sockets
from .metrics import Metrics
from .nftables import governed_uids
from .runtime import PolicyHolder

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 10.0


def exposed_listeners(policies: PolicyHolder) -> dict[str, int]:
    """Per governed account, how many of its TCP sockets listen beyond loopback."""
    owner = {uid: name for name, account in policies.current.accounts().items()
             for uid in governed_uids(account)[0]}
    counts = dict.fromkeys(sorted(set(owner.values())), 0)
    for entry in dump_sockets(socket.IPPROTO_TCP, 1 << TCP_LISTEN):
        if entry.uid in owner and not entry.local[0].is_loopback:
            counts[owner[entry.uid]] += 1
    return counts


async def watch(policies: PolicyHolder, metrics: Metrics,
                interval: float = INTERVAL_SECONDS) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            counts = await loop.run_in_executor(None, exposed_listeners, policies)
        except OSError as e:
            log.warning("cannot list listening sockets: %s", e)
        else:
            metrics.exposed_listeners.clear()
            for account, count in counts.items():
                metrics.exposed_listeners.labels(account).set(count)
        await asyncio.sleep(interval)
