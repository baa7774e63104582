"""Finds the rules that name a destination without scanning them all.

Names are looked up exactly and then by each parent (`*.parent` rules), so the cost grows with
the number of labels in the name, not with the number of rules. Networks are kept per prefix
length, so an address costs one dictionary look-up per distinct prefix length in use.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from .hosts import Address, Host, Name
from .model import Rule


class DestinationIndex[T]:
    """Maps destinations to the values stored with the rules that cover them."""

    def __init__(self, entries: Iterable[tuple[Rule, T]]) -> None:
        exact: defaultdict[str, list[T]] = defaultdict(list)
        below: defaultdict[str, list[T]] = defaultdict(list)
        networks: defaultdict[tuple[int, int], defaultdict[int, list[T]]] = defaultdict(
            lambda: defaultdict(list))
        for rule, value in entries:
            if rule.host is not None:
                if rule.host.startswith("*."):
                    below[rule.host[2:]].append(value)
                else:
                    exact[rule.host].append(value)
            elif rule.network is not None:
                net = rule.network
                key = int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
                networks[(net.version, net.prefixlen)][key].append(value)
        self._exact = {k: tuple(v) for k, v in exact.items()}
        self._below = {k: tuple(v) for k, v in below.items()}
        # Longest prefix first, so the most specific network rule is met first.
        self._networks = sorted(
            ((version, length, {k: tuple(v) for k, v in table.items()})
             for (version, length), table in networks.items()),
            key=lambda entry: -entry[1])

    def candidates(self, host: Host) -> list[T]:
        """Rules whose host or network covers `host`, most specific first."""
        if isinstance(host, Name):
            found = list(self._exact.get(host.text, ()))
            for parent in host.parents:
                found.extend(self._below.get(parent, ()))
            return found
        return self.network_candidates(host)

    def network_candidates(self, address: Address) -> list[T]:
        found: list[T] = []
        value = int(address)
        for version, length, table in self._networks:
            if version == address.version:
                found.extend(table.get(value >> (address.max_prefixlen - length), ()))
        return found
