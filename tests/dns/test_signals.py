from __future__ import annotations

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
