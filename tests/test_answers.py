from __future__ import annotations

from ipaddress import ip_address

from agent_egress.answers import AnswerMemory


def test_answer_memory_expires_and_is_bounded():
    memory = AnswerMemory(max_entries=2, grace=10)
    memory.remember("codex", "a.test", ip_address("192.0.2.1"), ttl=60, now=0)
    assert memory.name_for("codex", ip_address("192.0.2.1"), now=69) == "a.test"
    assert memory.name_for("codex", ip_address("192.0.2.1"), now=70) is None
    assert memory.name_for("other", ip_address("192.0.2.1"), now=1) is None
    memory.remember("codex", "b.test", ip_address("192.0.2.2"), ttl=60, now=1)
    memory.remember("codex", "c.test", ip_address("192.0.2.3"), ttl=60, now=2)
    assert len(memory) == 2
    assert memory.name_for("codex", ip_address("192.0.2.1"), now=3) is None
    memory.remember("codex", "d.test", ip_address("192.0.2.4"), ttl=1, now=200)
    assert len(memory) == 1
