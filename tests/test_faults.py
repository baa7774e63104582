"""Faults the proxy must survive, and fail closed under: a full disk under the audit log, being
killed, upstream DNS down, slow or answering garbage, an origin resetting mid-transfer, the
policy file deleted or garbled, and SIGTERM under load."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.dnsserver import FaultyDNS
from support.origins import ResettingOrigin
from support.proxy import RunningProxy, wait_until


def policy(port: int) -> str:
    return f"""version: 1
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: web.test
        ports: [{port}]
      - cidr: 127.0.0.1/32
        ports: [{port}]
"""


def fetch(proxy: RunningProxy, url: str) -> str:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "-x", proxy.url, url],
                          capture_output=True, text=True, timeout=30).stdout


def fetch_through_tunnel(proxy: RunningProxy, url: str) -> str:
    """GET `url` inside a CONNECT tunnel: the tunnel's line is written when it closes. The
    answer, then the status lines curl saw (a refused CONNECT's reason is only there)."""
    done = subprocess.run(["curl", "-sS", "-v", "--max-time", "10", "-p", "-x", proxy.url, url],
                          capture_output=True, text=True, timeout=30)
    return done.stdout + "".join(line for line in done.stderr.splitlines(keepends=True)
                                 if line.startswith("< HTTP/"))


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("unshare"),
                    reason="a private tmpfs needs root and unshare")
@pytest.mark.parametrize("on_failure", ["deny", "allow"])
def test_a_full_audit_disk(cli, tmp_path, dns, web, on_failure):
    disk = tmp_path / "disk"
    disk.mkdir()
    # a 64 KiB tmpfs in a mount namespace of the proxy's own: some 80 events fill it
    proxy = RunningProxy(
        cli, tmp_path, policy(web.port), "--upstream-dns", dns.address,
        "--on-audit-failure", on_failure, "--audit-log", str(disk / "audit.jsonl"),
        prefix=("unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mount -t tmpfs -o size=64k tmpfs {disk} && exec \"$@\"", "sh"))
    try:
        # plain requests and tunnels in turn, then a burst of both at once
        answers = [(fetch_through_tunnel if i % 2 else fetch)(
            proxy, f"http://web.test:{web.port}/full-{i}") for i in range(80)]
        with ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(lambda i: (fetch_through_tunnel if i % 2 else fetch)(
                proxy, f"http://web.test:{web.port}/burst-{i}"), range(40)))
        refused = [a for a in answers if "the audit log cannot be written" in a]
        with urllib.request.urlopen(proxy.metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        errors = next(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("agent_egress_audit_write_errors_total"))
        assert errors > 0
        # the resolver follows the same rule: no DNS, and nothing forwarded, while unrecorded
        asked = len(dns.zone.queries)
        lookup = subprocess.run(["dig", "@127.0.0.1", "-p", str(proxy.dns_port), "+time=5",
                                 "+tries=1", "web.test"],
                                capture_output=True, text=True, timeout=30).stdout
        if on_failure == "deny":
            # every request that reached the origin, and every tunnel it went through, has
            # its line (a tunnel's is written as it closes): the file is read in the proxy's
            # mount namespace
            log = Path(f"/proc/{proxy.process.pid}/root") / str(disk / "audit.jsonl")[1:]
            reached = {path for _, _, path in web.requests if path.startswith(("/full-",
                                                                               "/burst-"))}
            tunnelled = {p for p in reached if int(p.rsplit("-", 1)[1]) % 2}

            def lines() -> list[str]:
                return log.read_text().splitlines()

            def recorded() -> tuple[set[str], int]:
                events = [json.loads(line) for line in lines() if line.endswith("}")]
                allowed = [e for e in events if e["decision"] == "allow"]
                return ({e["path"] for e in allowed if e["event"] == "request"},
                        sum(e["event"] == "connect" for e in allowed))

            wait_until(lambda: recorded()[1] >= len(tunnelled))
            paths, tunnels = recorded()
            assert reached and reached <= paths, reached - paths
            assert tunnels >= len(tunnelled)  # some tunnels had no room for a request
            assert answers[0].startswith("hello") and refused
            before = answers[:answers.index(refused[0])]
            assert all(a.startswith("hello") for a in before), \
                [(i, a) for i, a in enumerate(before) if not a.startswith("hello")]
            # and every refusal says why: a tunnel is refused before its 200, not cut off after
            unexplained = [(i, a) for i, a in enumerate(answers + burst) if not
                           a.startswith("hello") and "the audit log cannot be written" not in a]
            assert not unexplained, unexplained
            # once the room reserved for lines is used up, nothing passes
            assert not any(a.startswith("hello") for a in answers[-10:] + burst)
            assert "NXDOMAIN" in lookup and "the audit log cannot be written" in lookup
            assert len(dns.zone.queries) == asked
            for line in lines():  # and nothing was cut short when the disk filled
                json.loads(line)
        else:
            assert all(a.startswith("hello") for a in answers + burst) and not refused
            assert "NXDOMAIN" not in lookup
        assert proxy.process.poll() is None
    finally:
        proxy.stop()


def test_killed_and_restarted_the_log_stays_valid_json_lines(cli, tmp_path, dns, web):
    proxy = RunningProxy(cli, tmp_path, policy(web.port), "--upstream-dns", dns.address)
    for i in range(20):
        fetch(proxy, f"http://web.test:{web.port}/before-{i}")
    proxy.signal(signal.SIGKILL)
    proxy.stop()
    again = RunningProxy(cli, tmp_path, None, "--upstream-dns", dns.address, "--policy",
                         str(tmp_path / "policy.yaml"))
    try:
        fetch(again, f"http://web.test:{web.port}/after")
        assert again.wait_for_events(lambda e: e["path"] == "/after")
    finally:
        again.stop()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line parses
    assert {"/after"} <= {e["path"] for e in events}


# Upstream DNS down, slow or answering garbage

@pytest.fixture(scope="module")
def faulty_dns():
    server = FaultyDNS()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def behind_faulty_dns(cli, tmp_path_factory, faulty_dns, web, secure):
    ports = f"[{web.port}, {secure.port}]"
    running = RunningProxy(cli, tmp_path_factory.mktemp("faulty-dns"), f"""version: 1
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: "*.faults.test"
        ports: {ports}
      - cidr: 127.0.0.1/32
        ports: {ports}
""", "--upstream-dns", faulty_dns.address)
    yield running
    running.stop()


_names = itertools.count()


def fresh_name() -> str:
    """A name neither cache (the proxy's nor the resolver's) has seen."""
    return f"n{next(_names)}.faults.test"


def through_proxy(proxy: RunningProxy, url: str) -> tuple[str, str, str]:
    """curl's (status of the CONNECT or of the request, body, error) for `url`."""
    done = subprocess.run(["curl", "-sSv", "-k", "--max-time", "20", "-x", proxy.url, "-w",
                           "\n%{http_connect} %{http_code}", url],
                          capture_output=True, text=True, timeout=30)
    body, _, codes = done.stdout.rpartition("\n")
    connect_code, request_code = codes.split()
    return connect_code if url.startswith("https:") else request_code, body, done.stderr


def dig_resolver(proxy: RunningProxy, name: str) -> str:
    return subprocess.run(["dig", "@127.0.0.1", "-p", str(proxy.dns_port), "+time=10",
                           "+tries=1", name], capture_output=True, text=True, timeout=30).stdout


@pytest.mark.parametrize("fault", FaultyDNS.FAULTS)
def test_upstream_dns_fault_fails_clearly_and_recovers(behind_faulty_dns, faulty_dns, web,
                                                       secure, fault):
    proxy = behind_faulty_dns
    faulty_dns.set_fault(fault)
    try:
        plain, tunnel, queried = fresh_name(), fresh_name(), fresh_name()
        with ThreadPoolExecutor(3) as clients:  # each waits out the resolver's timeout
            plain_answer = clients.submit(through_proxy, proxy,
                                          f"http://{plain}:{web.port}/dns-fault")
            tunnel_answer = clients.submit(through_proxy, proxy,
                                           f"https://{tunnel}:{secure.port}/dns-fault")
            dig_answer = clients.submit(dig_resolver, proxy, queried)
        status, body, _ = plain_answer.result()
        assert status == "502" and "no DNS server answered" in body
        status, _, error = tunnel_answer.result()
        assert status == "502"
        assert "< HTTP/1.1 502 Bad Gateway (agent-egress): no DNS server answered" in error
        answer = dig_answer.result()
        assert "status: SERVFAIL" in answer
        assert "EDE: 22 (No Reachable Authority)" in answer
        for name in (plain, tunnel):
            (event,) = proxy.wait_for_events(lambda e, name=name: e["host"] == name)
            assert event["decision"] == "deny"
            assert "no DNS server answered" in event["reason"]
        (event,) = proxy.wait_for_events(lambda e: e["host"] == queried)
        assert "upstream failed: no DNS server answered" in event["reason"]
        assert proxy.process.poll() is None
    finally:
        faulty_dns.set_fault(None)
    status, body, _ = through_proxy(proxy, f"http://{fresh_name()}:{web.port}/recovered")
    assert (status, body.split()[0]) == ("200", "hello")
    status, body, _ = through_proxy(proxy, f"https://{fresh_name()}:{secure.port}/recovered")
    assert (status, body.split()[0]) == ("200", "hello")
    assert "status: NOERROR" in dig_resolver(proxy, fresh_name())


# An origin resetting the connection mid-transfer

@pytest.mark.parametrize("scheme, framing", [("http", "length"), ("http", "chunked"),
                                             ("https", "length")])
def test_an_origin_reset_mid_body_is_a_failed_transfer(cli, tmp_path, dns, web, test_ca,
                                                       scheme, framing):
    sent = 5000
    origin = ResettingOrigin(framing, sent,
                             test_ca.server_context() if scheme == "https" else None)
    host = "secure.test" if scheme == "https" else "web.test"
    proxy = RunningProxy(cli, tmp_path, policy(web.port) + f"""\
      - host: {host}
        ports: [{origin.port}]
      - cidr: 127.0.0.1/32
        ports: [{origin.port}]
""", "--upstream-dns", dns.address)
    try:
        done = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert",
                               str(test_ca.ca_file), "-x", proxy.url, "-o", "-", "-w",
                               "%{http_code}", f"{scheme}://{host}:{origin.port}/reset"],
                              capture_output=True, timeout=30)
        # curl: 18 "transfer closed with bytes remaining", 56 "failure receiving data"
        assert done.returncode in (18, 56), done.stderr
        assert done.stdout == b"x" * sent + b"200"  # what came, nothing pretending to be more
        if scheme == "http":
            (event,) = proxy.wait_for_events(lambda e: e["path"] == "/reset")
            assert event["bytes_down"] == sent
        else:
            (event,) = proxy.wait_for_events(lambda e: e["port"] == origin.port)
            assert event["event"] == "connect"
            assert sent < event["bytes_down"] < 2 * sent  # TLS records around the body
        assert event["decision"] == "allow"
        assert fetch(proxy, f"http://web.test:{web.port}/after-reset").startswith("hello")
    finally:
        proxy.stop()
        origin.stop()


# The policy file deleted or garbled while the proxy runs

def reload_errors(proxy: RunningProxy) -> float:
    with urllib.request.urlopen(proxy.metrics_url, timeout=10) as response:
        metrics = response.read().decode()
    return next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith('agent_egress_policy_reloads_total{result="error"}'))


def test_a_deleted_or_garbled_policy_keeps_the_last_good_one(cli, tmp_path, dns, web):
    good = policy(web.port)
    proxy = RunningProxy(cli, tmp_path, good, "--upstream-dns", dns.address)
    allowed, other = f"http://web.test:{web.port}/kept", f"http://other.test:{web.port}/kept"
    path = proxy.policy_file
    try:
        assert fetch(proxy, allowed).startswith("hello")
        assert "no rule matched" in fetch(proxy, other)
        bad_files = [
            (lambda: path.unlink(), r":1:1: cannot read the policy: No such file"),
            (lambda: path.write_bytes(b"\x00\x9c\xff garbage"), r":1:1: binary data"),
            (lambda: path.write_text(good[:good.index("ports: [") + 8]),  # cut mid-write
             r":\d+:\d+: invalid YAML"),
        ]
        for number, (spoil, error) in enumerate(bad_files, 1):
            spoil()
            assert wait_until(lambda n=number: proxy.log().count("policy reload refused") == n)
            assert re.search(re.escape(str(path)) + error, proxy.log())
            assert reload_errors(proxy) == number
            # the last good policy still decides: neither everything denied nor opened up
            assert fetch(proxy, allowed).startswith("hello")
            assert "no rule matched" in fetch(proxy, other)
        widened = good + f"      - host: other.test\n        ports: [{web.port}]\n"
        temporary = path.with_suffix(".new")
        temporary.write_text(widened)
        os.replace(temporary, path)  # as editors and `learn --apply` write it
        assert wait_until(lambda: fetch(proxy, other).startswith("hello"))
        path.write_text(good)  # in place, as `cat >` does
        assert wait_until(lambda: "no rule matched" in fetch(proxy, other))
        assert reload_errors(proxy) == len(bad_files)
    finally:
        proxy.stop()


# SIGTERM under load

def test_sigterm_under_load_exits_cleanly_with_every_answer_audited(cli, tmp_path, dns, web):
    proxy = RunningProxy(cli, tmp_path, policy(web.port), "--upstream-dns", dns.address)
    numbers = itertools.count()
    answered: list[str] = []  # paths the proxy gave a whole response for

    def load(keep_alive: bool) -> BaseException:
        """Sends requests until the proxy goes away; returns how it went away."""
        connection = None
        while True:
            path = f"/load/{next(numbers)}"
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
                connection.request("GET", f"http://web.test:{web.port}{path}")
                response = connection.getresponse()
                response.read()
                answered.append(path)
                if not keep_alive or response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as e:
                if connection is not None:
                    connection.close()
                return e

    try:
        with ThreadPoolExecutor(100) as clients:
            ended = [clients.submit(load, i % 2 == 0) for i in range(100)]
            assert wait_until(lambda: len(answered) >= 500, timeout=30)
            proxy.signal(signal.SIGTERM)
            assert proxy.process.wait(20) == 0
            endings = [future.result(30) for future in ended]
    finally:
        proxy.stop()
    # closed by the proxy or refused once it was gone: none waited out its timeout
    assert not [e for e in endings if isinstance(e, TimeoutError)]
    lines = proxy.audit_log.read_text().splitlines()
    audited = {json.loads(line)["path"] for line in lines}  # every line parses
    assert set(answered) <= audited


def test_audit_room_promised_to_requests_handed_to_mitmproxy_goes_back(cli, tmp_path, dns,
                                                                        web):
    """With a credential configured, a request with a body is decided on the request fast
    path, then handed to mitmproxy (which scans the body before sending any of it) and
    decided again: the room promised to it the first time must not stay promised, or the
    reservation ahead of the audit log grows by 8 KiB a request."""
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
credentials:
  tripwire:
    env: AE_TEST_ROOM_SECRET
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: web.test
        ports: [{web.port}]
      - cidr: 127.0.0.1/32
        ports: [{web.port}]
""", "--upstream-dns", dns.address, env={"AE_TEST_ROOM_SECRET": "s3cr3t-never-sent"})
    try:
        for i in range(400):  # a new connection each: each goes through the fast path first
            connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            connection.request("POST", f"http://web.test:{web.port}/room-{i}", body=b"x" * 10,
                               headers={"Host": f"web.test:{web.port}"})
            connection.getresponse().read()
            connection.close()
        assert wait_until(lambda: len(proxy.events()) >= 400)
        time.sleep(1)  # the writer reserves ahead after its batches
        allocated = proxy.audit_log.stat().st_blocks * 512
        assert allocated < 5 * 1024 * 1024, allocated  # the 4 MiB slack, no 3 MiB promised
    finally:
        proxy.stop()
