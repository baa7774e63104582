"""Escaping what a terminal would act on."""

from __future__ import annotations

import pytest

from agent_egress.terminal import counted, printable


@pytest.mark.parametrize("text, shown", [
    ("plain text, café, 日本語", "plain text, café, 日本語"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("line\nfake line\r", "line\\x0afake line\\x0d"),
    ("tab\there\x00\x7f", "tab\\x09here\\x00\\x7f"),
    ("\x9b31m C1 CSI", "\\x9b31m C1 CSI"),
    ("abc\u202edcba", "abc\\u202edcba"),  # right-to-left override
    ("zero\u200bwidth\u2028sep\ufeff", "zero\\u200bwidth\\u2028sep\\ufeff"),
    ("\U000e0041tag", "\\U000e0041tag"),
])
def test_printable(text, shown):
    assert printable(text) == shown
    assert printable(shown) == shown  # escaping is stable: nothing left to act on


def test_counted():
    assert [counted(n, "event") for n in (0, 1, 2)] == ["0 events", "1 event", "2 events"]
    assert counted(1, "proxy", "proxies") == "1 proxy" and counted(3, "proxy", "proxies") == \
        "3 proxies"
