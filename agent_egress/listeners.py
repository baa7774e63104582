"""Governed accounts serving the network: listening sockets on non-loopback addresses, counted
at each scrape in agent_egress_exposed_listeners{account} (the nftables ruleset also keeps such
sockets from answering non-loopback peers)."""

from __future__ import annotations

import socket

from .identity import TCP_LISTEN, dump_sockets
from .nftables import governed_accounts
from .rules import Policy


def exposed_listeners(policy: Policy) -> dict[str, int]:
    """Per governed account, how many of its TCP sockets listen beyond loopback."""
    owner = governed_accounts(policy)
    counts = dict.fromkeys(sorted(set(owner.values())), 0)
    for entry in dump_sockets(socket.IPPROTO_TCP, 1 << TCP_LISTEN):
        if entry.uid in owner and not entry.local[0].is_loopback:
            counts[owner[entry.uid]] += 1
    return counts
