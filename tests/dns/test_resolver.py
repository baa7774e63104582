"""The resolver end to end: `agent-egress run` answering dig (UDP and TCP) and a dnslib client,
forwarding to the tests' authoritative server, which records every query it receives."""

from __future__ import annotations

import os
import pwd
import re
import socket
import struct
import subprocess
import time

import pytest
from dnslib import RCODE, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import dnsserver
from support.proxy import RunningProxy, wait_until

UID = os.getuid()


def policy(extra_accounts: str = "") -> str:
    return f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: web.test
      - host: public.test
      - host: metadata.test
      - host: "*.tunnel.test"
      - cidr: 127.0.0.1/32
    deny:
      - host: blocked.web.test
{extra_accounts}"""


@pytest.fixture(scope="module")
def resolver(cli, tmp_path_factory, dns):
    running = RunningProxy(cli, tmp_path_factory.mktemp("resolver"), policy(),
                           "--upstream-dns", dns.address)
    yield running
    running.stop()


def dig(resolver, *args, user=None):
    done = subprocess.run(["dig", "@127.0.0.1", "-p", str(resolver.dns_port), "+time=5",
                           "+tries=1", *args], capture_output=True, text=True, timeout=30,
                          user=user)
    return done.stdout


def status(output: str) -> str:
    match = re.search(r"status: (\w+)", output)
    assert match, output
    return match.group(1)


def answers(output: str) -> list[str]:
    return [line.split()[-1] for line in output.split(";; ANSWER SECTION:\n")[-1].splitlines()
            if line and not line.startswith(";")] if ";; ANSWER SECTION:" in output else []


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_allowed_name_is_answered(resolver, transport):
    output = dig(resolver, transport, "web.test")
    assert status(output) == "NOERROR" and answers(output) == ["127.0.0.1"]


def test_denied_name_gets_nxdomain_with_ede_and_is_never_forwarded(resolver, dns):
    output = dig(resolver, "never-forwarded.other.test")
    assert status(output) == "NXDOMAIN"
    assert "; EDE: 15 (Blocked): (agent-egress: account tester: no rule matched for " \
           "never-forwarded.other.test)" in output
    assert not dns.zone.asked("never-forwarded.other.test")


def test_deny_rule_names_itself_in_the_ede(resolver, dns):
    output = dig(resolver, "+tcp", "blocked.web.test")
    line = resolver.policy_file.read_text().splitlines().index("      - host: blocked.web.test")
    assert f"(agent-egress: account tester: denied by rule: host blocked.web.test " \
           f"({resolver.policy_file}:{line + 1}))" in output
    assert not dns.zone.asked("blocked.web.test")


def test_no_ede_for_a_client_without_edns(resolver):
    output = dig(resolver, "+noedns", "other.test")
    assert status(output) == "NXDOMAIN" and "OPT PSEUDOSECTION" not in output


def test_rebinding_answers_are_stripped(resolver):
    output = dig(resolver, "metadata.test")
    assert status(output) == "NOERROR" and answers(output) == []
    (event,) = resolver.wait_for_events(lambda e: e["host"] == "metadata.test")
    assert event["reason"].endswith("; removed internal answers: 169.254.169.254")


def test_public_answers_pass_and_are_cached_with_their_ttl_counting_down(resolver, dns):
    first = dig(resolver, "public.test")
    assert answers(first) == ["203.0.113.5"]
    time.sleep(1.1)
    second = dig(resolver, "PUBLIC.test")
    assert answers(second) == ["203.0.113.5"]
    assert [q for q in dns.zone.queries if q == ("public.test", "A")] == [("public.test", "A")]
    ttl = int(second.split(";; ANSWER SECTION:\n")[1].split()[1])
    assert 50 <= ttl < 60
    assert "PUBLIC.test." in second  # the question as the client spelled it


def test_dnslib_client_over_udp_and_tcp(resolver):
    for tcp in (False, True):
        reply = DNSRecord.parse(DNSRecord.question("web.test", "A").send(
            "127.0.0.1", resolver.dns_port, tcp=tcp, timeout=5))
        assert [str(rr.rdata) for rr in reply.rr] == ["127.0.0.1"]


def test_every_query_is_an_audit_event(resolver):
    dig(resolver, "-t", "AAAA", "web.test")
    events = resolver.wait_for_events(lambda e: e["event"] == "dns" and e["qtype"] == "AAAA"
                                      and e["host"] == "web.test")
    event = events[0]
    assert (event["account"], event["uid"], event["decision"], event["rule"], event["mode"]) == (
        "tester", UID, "allow", f"{resolver.policy_file}:6", "enforce")
    assert event["user"] == pwd.getpwuid(UID).pw_name


def test_tunnelling_is_flagged(resolver):
    label = "mzxw6ytboi2gs3lfn5xhk4tjon2wk3dpnzsxe2lopmqgc3tf"
    dig(resolver, "-t", "TXT", f"{label}.tunnel.test")
    (event,) = resolver.wait_for_events(lambda e: e["host"] == f"{label}.tunnel.test")
    assert event["reason"].endswith("suspected tunnelling: long_label, high_entropy")


def raw_udp(port: int, packet: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


QUERY = DNSRecord.question("web.test").pack()


@pytest.mark.parametrize("packet, rcode", [
    (QUERY[:2] + b"\x01\x00\x00\x02" + QUERY[6:] + QUERY[12:], RCODE.FORMERR),  # 2 questions
    (QUERY[:2] + b"\x29\x00" + QUERY[4:], RCODE.NOTIMP),  # UPDATE
    (QUERY[:-2] + b"\x00\x03", RCODE.REFUSED),  # class CH
    (QUERY[:-6], RCODE.FORMERR),  # truncated
    (QUERY[:12] + b"\xc0\x0c\x00\x01\x00\x01", RCODE.FORMERR),  # compression loop
])
def test_bad_packets_get_the_rfc_rcode(resolver, packet, rcode):
    reply = raw_udp(resolver.dns_port, packet)
    assert reply is not None and reply[:2] == packet[:2]
    assert reply[3] & 0x0F == rcode


def test_too_short_packets_get_no_answer_and_the_server_keeps_answering(resolver):
    assert raw_udp(resolver.dns_port, b"\x12\x34\x01", timeout=0.5) is None
    assert answers(dig(resolver, "web.test")) == ["127.0.0.1"]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=600),
    st.tuples(st.integers(0, len(QUERY) - 1), st.binary(min_size=1, max_size=8)).map(
        lambda edit: QUERY[:edit[0]] + edit[1] + QUERY[edit[0] + len(edit[1]):]),
))
def test_fuzzed_packets_never_stop_the_server(resolver, packet):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(packet, ("127.0.0.1", resolver.dns_port))


def test_after_fuzzing_normal_queries_still_work(resolver):
    with socket.create_connection(("127.0.0.1", resolver.dns_port)) as s:
        s.sendall(b"\x00\x05junk!" + b"\xff" * 64)  # garbage over TCP too
    assert answers(dig(resolver, "+tcp", "web.test")) == ["127.0.0.1"]
    assert answers(dig(resolver, "web.test")) == ["127.0.0.1"]
    assert resolver.process.poll() is None
    assert "Traceback" not in resolver.log()


def test_two_local_users_get_different_answers(cli, tmp_path, dns, two_users):
    users = two_users
    accounts = "".join(f"""  {name}:
    match: {{unix_users: [{name}]}}
    allow:
      - host: {host}
      - cidr: 127.0.0.1/32
""" for name, host in zip(users, ["web.test", "other.test"], strict=True))
    running = RunningProxy(cli, tmp_path, f"version: 1\naccounts:\n{accounts}",
                           "--upstream-dns", dns.address)
    try:
        a, b = users
        assert answers(dig(running, "web.test", user=a)) == ["127.0.0.1"]
        assert status(dig(running, "other.test", user=a)) == "NXDOMAIN"
        assert answers(dig(running, "other.test", user=b)) == ["127.0.0.1"]
        assert "account egress-test-b" in dig(running, "web.test", user=b)
    finally:
        running.stop()


class _Upstream:
    """A UDP 'DNS server' that answers with garbage, or never."""

    def __init__(self, garbage: bool) -> None:
        import threading

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.garbage = garbage
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                data, addr = self.socket.recvfrom(4096)
            except OSError:
                return
            if self.garbage:
                self.socket.sendto(data[:2] + b"\x81\x80\x00\x01\x00\x05garbage", addr)


@pytest.mark.parametrize("kind", ["down", "silent", "garbage"])
def test_a_broken_upstream_gives_servfail_within_the_timeout(cli, tmp_path, kind):
    upstream = None
    if kind == "down":
        address = "127.0.0.1:1"
    else:
        upstream = _Upstream(garbage=kind == "garbage")
        address = f"127.0.0.1:{upstream.port}"
    running = RunningProxy(cli, tmp_path, policy(), "--upstream-dns", address)
    try:
        started = time.monotonic()
        output = dig(running, "web.test")
        assert status(output) == "SERVFAIL"
        assert time.monotonic() - started < 4.5
        (event,) = running.wait_for_events(lambda e: e["host"] == "web.test")
        assert "upstream failed: no DNS server answered" in event["reason"]
    finally:
        running.stop()
        if upstream is not None:
            upstream.socket.close()


def test_qtype_names_in_events(resolver):
    dig(resolver, "-t", "MX", "web.test")
    assert resolver.wait_for_events(lambda e: e["qtype"] == "MX" and e["host"] == "web.test")


# Issue 13 rows 10-12: what is forwarded is what was decided, and only the question's name
# chain comes back. The upstream here records every question byte for byte and adds records
# that no client should get.

HOSTILE_RECORDS = {
    "xn--zca.tunnel.test": ["203.0.113.5"], "ss.tunnel.test": ["203.0.113.6"],
    "web.test": ["203.0.113.7"], "bailiwick.test": ["203.0.113.8"], "chain.test": [],
    "final.test": ["203.0.113.9"], "nodata.test": [],
    "127.0.0.2": ["203.0.113.66"], "2130706434": ["203.0.113.66"], "127.1": ["203.0.113.66"],
    "0x7f000002": ["203.0.113.66"], "127.0.0.1": ["203.0.113.66"],
}
HOSTILE_EXTRAS = {
    "bailiwick.test": [
        "answer evil.test. 60 A 203.0.113.66",
        "answer www.bailiwick.test. 60 A 203.0.113.67",
        "authority bailiwick.test. 60 NS ns.evil.test.",
        "authority evil.test. 60 SOA ns.evil.test. host.evil.test. 1 2 3 4 30",
        "additional ns.evil.test. 60 A 203.0.113.68",
    ],
    "chain.test": [
        "answer chain.test. 60 CNAME target.test.",
        "answer target.test. 60 CNAME final.test.",
        "answer unrelated.test. 60 A 203.0.113.69",
        "answer final.test. 60 A 203.0.113.9",
        "answer unrelated.test. 60 CNAME final.test.",
        "authority test. 60 NS ns.evil.test.",
    ],
    "nodata.test": [
        "authority evil.test. 60 SOA ns.evil.test. host.evil.test. 1 2 3 4 30",
        "authority nodata.test. 60 SOA ns.nodata.test. host.nodata.test. 1 2 3 4 30",
        "authority nodata.test. 60 NS ns.evil.test.",
        "additional ns.evil.test. 60 A 203.0.113.68",
    ],
}


@pytest.fixture(scope="module")
def hostile(cli, tmp_path_factory):
    """A learning account (so that nothing is held back by `no rule matched`) with a cidr
    rule for loopback, in front of the hostile upstream."""
    upstream = dnsserver.TestDNS(dnsserver.Zone(HOSTILE_RECORDS, HOSTILE_EXTRAS))
    running = RunningProxy(cli, tmp_path_factory.mktemp("hostile"), f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    mode: learn
    allow:
      - host: "*.tunnel.test"
      - host: web.test
      - cidr: 127.0.0.0/8
""", "--upstream-dns", upstream.address)
    yield running, upstream.zone
    running.stop()
    upstream.stop()


def query_packet(labels: list[bytes], qtype: int = 1) -> bytes:
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + name + struct.pack(
        "!HH", qtype, 1)


def test_the_name_forwarded_upstream_is_byte_for_byte_the_name_decided(hostile):
    """Row 10: a Latin-1 `ß` label was decided as xn--zca and forwarded as `ss` (dnslib's
    IDNA 2003); a label holding a dot was decided as two labels. Both are refused now, and a
    name in capitals is forwarded as decided, in lower case."""
    running, zone = hostile
    for labels in ([b"\xdf", b"tunnel", b"test"], [b"x.web", b"tunnel", b"test"],
                   [b"\xc3\x9f", b"tunnel", b"test"]):
        reply = raw_udp(running.dns_port, query_packet(labels))
        assert reply is not None and reply[3] & 0x0F == RCODE.NXDOMAIN, labels
    assert answers(dig(running, "XN--ZCA.Tunnel.TEST")) == ["203.0.113.5"]
    def tunnel_events() -> list[dict[str, object]]:
        return [e for e in running.events() if e["event"] == "dns" and "tunnel" in e["host"]]

    wait_until(lambda: len(tunnel_events()) >= 4)  # lines reach the file in batches
    assert {e["host"]: e["decision"] for e in tunnel_events()} == {
        "\\223.tunnel.test": "deny", "x\\046web.tunnel.test": "deny",
        "\\195\\159.tunnel.test": "deny", "xn--zca.tunnel.test": "allow"}
    asked = [labels for labels in zone.wire_names if labels[-2:] == (b"tunnel", b"test")]
    assert asked == [(b"xn--zca", b"tunnel", b"test")]


@pytest.mark.parametrize("name", ["127.0.0.2", "2130706434", "0x7f000002", "127.1",
                                  "127.0.0.1", "0x7F000002."])
def test_ip_shaped_names_are_never_forwarded(hostile, name):
    """Row 11: whatever a cidr rule or learning mode allows, an IP address is no name to ask
    anyone about."""
    running, zone = hostile
    output = dig(running, name)
    assert status(output) == "NXDOMAIN" and answers(output) == []
    assert "is an IP address, not a name: it is never looked up upstream" in output
    assert not any(asked == name.lower().rstrip(".") for asked, _ in zone.queries)


def sections(output: str) -> dict[str, list[str]]:
    """dig's answer, authority and additional sections as `owner TYPE data` lines."""
    found: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        heading = re.match(r";; (\w+) SECTION:", line)
        if heading:
            current = found.setdefault(heading.group(1), [])
        elif not line.strip() or line.startswith(";"):
            current = None if not line.strip() else current
        elif current is not None:
            owner, _ttl, _class, rtype, *data = line.split()
            current.append(" ".join([owner, rtype, *data]))
    found.pop("QUESTION", None)
    return found


def test_records_outside_the_name_chain_are_stripped(hostile):
    """Row 12: only the question's name and its CNAME targets come back; no NS, no glue."""
    running, _ = hostile
    output = dig(running, "bailiwick.test")
    assert sections(output) == {"ANSWER": ["bailiwick.test. A 203.0.113.8"]}
    (event,) = running.wait_for_events(lambda e: e["host"] == "bailiwick.test")
    assert event["reason"].endswith("removed records outside the question's name chain: "
                                    "evil.test A, www.bailiwick.test A")


def test_a_cname_chain_is_kept_and_nothing_beside_it(hostile):
    """Also when answered from the cache to a question in other letter case: the names in
    the answer were once packed with compression pointers that missed the question."""
    running, _ = hostile
    for asked in ["chain.test", "CHAIN.Test", "chain.test"]:
        output = dig(running, "+tcp", asked)
        assert [line.lower() for line in sections(output)["ANSWER"]] == [
            "chain.test. cname target.test.", "target.test. cname final.test.",
            "final.test. a 203.0.113.9"], output
        assert sections(output).keys() == {"ANSWER"}


def test_a_negative_answer_keeps_only_its_zones_soa(hostile):
    running, _ = hostile
    output = dig(running, "nodata.test")
    assert status(output) == "NOERROR"
    assert sections(output) == {"AUTHORITY": [
        "nodata.test. SOA ns.nodata.test. host.nodata.test. 1 2 3 4 30"]}
