"""The resolver end to end: `agent-egress run` answering dig (UDP and TCP) and a dnslib client,
forwarding to the tests' authoritative server, which records every query it receives."""

from __future__ import annotations

import os
import pwd
import re
import socket
import subprocess
import time

import pytest
from dnslib import RCODE, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.proxy import RunningProxy

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
