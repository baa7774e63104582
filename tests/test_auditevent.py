"""The audit line's bytes: written by orjson where it writes json's bytes, else by json, so a
line is the same whichever wrote it (readers, tests and hashes of lines rely on that)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from agent_egress.auditevent import KEYS, AuditEvent, encode
from agent_egress.rules import Mode, Result, Stage

PLAIN = st.none() | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e)) | \
    st.integers(min_value=-2**63, max_value=2**63 - 1)
# what orjson and json may write apart, in the types an event's keys have: non-ASCII, DEL,
# control characters, lone surrogates, big ints; floats in the one float key
HOSTILE = st.text(st.characters(codec=None, exclude_categories=()), max_size=8) | \
    st.sampled_from(["\x7f", "a\x00b", "\u2028", "\ud800", "é", "\\\"", "\t\n"]) | \
    st.integers() | st.sampled_from([2**63, 2**64, -2**63 - 1])
DURATION = PLAIN | st.floats() | st.sampled_from([1e-05, 2.5e-07, 1e16, float("nan")])
VALUE = PLAIN | st.lists(PLAIN | HOSTILE, max_size=3)


def json_line(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


@example(dict.fromkeys(KEYS), [("path", "/a\x7f")], None)
@example(dict.fromkeys(KEYS), [], 1e-05)
@example(dict.fromkeys(KEYS), [("reason", "\u2028")], None)
@given(st.fixed_dictionaries({key: VALUE for key in KEYS}),
       st.lists(st.tuples(st.sampled_from(KEYS), HOSTILE), max_size=2), DURATION)
def test_a_line_has_jsons_bytes_whatever_it_holds(data, hostile, duration):
    data.update(hostile)
    data["duration_ms"] = duration
    assert encode(data) == json_line(data)


def test_a_request_line_keeps_its_keys_in_order_and_drops_the_query():
    event = AuditEvent(ts="2026-01-01T00:00:00.000Z", event=Stage.REQUEST, account="agent",
                       client="127.0.0.1:5000", host="web.test", port=80, ip="127.0.0.1",
                       method="GET", path="/a?token=x", decision=Result.ALLOW,
                       rule="policy.yaml:3", reason="allowed", mode=Mode.ENFORCE,
                       policy="sha256:0", bytes_up=0, bytes_down=6, duration_ms=1,
                       ancestry=["bash", "ünïcode"])
    line = event.line()
    assert line.endswith("\n") and line.count("\n") == 1
    data = json.loads(line)
    assert list(data) == list(KEYS) and data["path"] == "/a"
    assert line == json_line(data) + "\n"
