from __future__ import annotations

from ipaddress import ip_address

from agent_egress.answers import AnswerMemory


def test_answer_memory_expires_and_is_bounded():
    memory = AnswerMemory(max_entries=2, grace=10)
    memory.remember("codex", "a.test", ip_address("192.0.2.1"), ttl=60, now=0)
    assert memory.names_for("codex", ip_address("192.0.2.1"), now=69)[:1] == ["a.test"]
    assert memory.names_for("codex", ip_address("192.0.2.1"), now=70) == []
    assert memory.names_for("other", ip_address("192.0.2.1"), now=1) == []
    memory.remember("codex", "b.test", ip_address("192.0.2.2"), ttl=60, now=1)
    memory.remember("codex", "c.test", ip_address("192.0.2.3"), ttl=60, now=2)
    assert len(memory) == 2
    assert memory.names_for("codex", ip_address("192.0.2.1"), now=3) == []
    memory.remember("codex", "d.test", ip_address("192.0.2.4"), ttl=1, now=200)
    assert len(memory) == 1


def test_answer_memory_keeps_every_name_an_address_was_given_for():
    """Issue 13 row 13: two allowed names on one address; resolving the second must not make
    the first one's raw TCP fail."""
    memory = AnswerMemory(grace=10, max_names=3)
    address = ip_address("192.0.2.1")
    memory.remember("codex", "ssh.test", address, ttl=60, now=0)
    memory.remember("codex", "www.test", address, ttl=5, now=1)
    assert memory.names_for("codex", address, now=2) == ["www.test", "ssh.test"]
    assert memory.names_for("codex", address, now=2)[:1] == ["www.test"]
    assert memory.names_for("codex", address, now=16) == ["ssh.test"]  # www.test expired
    memory.remember("codex", "ssh.test", address, ttl=60, now=17)  # given again: first
    assert memory.names_for("codex", address, now=17) == ["ssh.test"]
    for n in range(5):  # bounded per address: the oldest names go
        memory.remember("codex", f"n{n}.test", address, ttl=60, now=20 + n)
    assert memory.names_for("codex", address, now=30) == ["n4.test", "n3.test", "n2.test"]
    assert len(memory) == 3
    assert memory.names_for("other", address, now=30) == []
