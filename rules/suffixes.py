"""The Public Suffix List, loaded once for everything that asks about it: the loader (wildcards
over a public suffix), `learn` (which parent a wildcard may name) and `discover`."""

from __future__ import annotations

import functools

from publicsuffixlist import PublicSuffixList


def is_public_suffix(name: str) -> bool:
    """Whether `name` (an A-label name) is a public suffix, the list's private section (shared
    hosting platforms) included."""
    return _full().is_public(name)


def is_icann_suffix(name: str) -> bool:
    """Whether `name` is a public suffix of the list's ICANN section (`com`, `co.uk`): one no
    single organisation controls."""
    return _icann().is_public(name)


@functools.cache
def _full() -> PublicSuffixList:
    return PublicSuffixList()


@functools.cache
def _icann() -> PublicSuffixList:
    # the same file, read without its private section: the library answers per instance
    return PublicSuffixList(only_icann=True)
