from __future__ import annotations

from ipaddress import ip_address

from agent_egress.dns.memory import AnswerMemory
from agent_egress.dns.signals import TunnelSignals


def test_plain_names_raise_nothing():
    signals = TunnelSignals()
    assert signals.observe("a", "www.example.test", "example.test", "A", now=0) == []


def test_encoded_data_in_a_label():
    signals = TunnelSignals()
    label = "mzxw6ytboi2gs3lfn5xhk4tjon2wk3dpnzsxe2lopmqgc3tf"
    assert signals.observe("a", f"{label}.t.example.test", "t.example.test", "A", now=0) == [
        "long_label", "high_entropy"]


def test_many_unique_subdomains_under_one_parent():
    signals = TunnelSignals()
    found = [signals.observe("a", f"x{i}.data.example.test", "data.example.test", "A", now=i)
             for i in range(52)]
    assert found[49] == [] and found[51] == ["many_subdomains"]
    assert signals.observe("b", "x0.data.example.test", "data.example.test", "A", now=52) == []
    assert signals.observe("a", "y.data.example.test", "data.example.test", "A", now=200) == []


def test_bursts_of_txt():
    signals = TunnelSignals()
    found = [signals.observe("a", "t.example.test", "example.test", "TXT", now=i * 0.1)
             for i in range(22)]
    assert found[19] == [] and found[21] == ["record_type_burst"]


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


def test_answer_memory_keeps_every_name_an_address_was_given_for():
    """Issue 13 row 13: two allowed names on one address; resolving the second must not make
    the first one's raw TCP fail."""
    memory = AnswerMemory(grace=10, max_names=3)
    address = ip_address("192.0.2.1")
    memory.remember("codex", "ssh.test", address, ttl=60, now=0)
    memory.remember("codex", "www.test", address, ttl=5, now=1)
    assert memory.names_for("codex", address, now=2) == ["www.test", "ssh.test"]
    assert memory.name_for("codex", address, now=2) == "www.test"
    assert memory.names_for("codex", address, now=16) == ["ssh.test"]  # www.test expired
    memory.remember("codex", "ssh.test", address, ttl=60, now=17)  # given again: first
    assert memory.names_for("codex", address, now=17) == ["ssh.test"]
    for n in range(5):  # bounded per address: the oldest names go
        memory.remember("codex", f"n{n}.test", address, ttl=60, now=20 + n)
    assert memory.names_for("codex", address, now=30) == ["n4.test", "n3.test", "n2.test"]
    assert len(memory) == 3
    assert memory.names_for("other", address, now=30) == []
