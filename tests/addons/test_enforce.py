"""The proxy end to end: `agent-egress run` on loopback, driven by curl, git and pip, against
origins and a DNS server that the tests run themselves."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys

import pytest
from support.proxy import RunningProxy, wait_until

UID = os.getuid()
USER = pwd.getpwuid(UID).pw_name


def policy_for(web, secure, git_origin, package_index) -> str:
    ports = f"[{web.port}, {secure.port}, {git_origin.port}, {package_index.port}]"
    return f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: web.test
        ports: [{web.port}]
      - host: secure.test
        ports: [{secure.port}]
      - host: git.test
        ports: [{git_origin.port}]
        access: read-only
      - host: index.test
        ports: [{package_index.port}]
      - host: inspect.test
        ports: [{secure.port}]
        methods: [GET]
        paths: ["/v1/*"]
      - host: metadata.test
        ports: [{web.port}]
      - host: intranet.test
        ports: [{web.port}]
      - cidr: 127.0.0.1/32
        ports: {ports}
    deny:
      - host: denied.test
"""


@pytest.fixture(scope="module")
def proxy(cli, tmp_path_factory, dns, web, secure, git_origin, package_index, test_ca):
    running = RunningProxy(cli, tmp_path_factory.mktemp("proxy"),
                           policy_for(web, secure, git_origin, package_index),
                           "--upstream-dns", dns.address, "--upstream-ca", str(test_ca.ca_file))
    yield running
    running.stop()


def curl(proxy, *args, check=False):
    return subprocess.run(["curl", "-sS", "--max-time", "20", "-x", proxy.url, *args],
                          capture_output=True, text=True, check=check, timeout=30)


def rule_line(proxy, text: str) -> str:
    lines = proxy.policy_file.read_text().splitlines()
    return f"{proxy.policy_file}:{next(n for n, line in enumerate(lines, 1) if text in line)}"


def test_plain_http_allowed_and_audited_key_by_key(proxy, web):
    done = curl(proxy, f"http://web.test:{web.port}/page?token=secret", check=True)
    assert done.stdout == f"hello from web.test:{web.port} GET /page?token=secret\n"
    (event,) = proxy.wait_for_events(lambda e: e["path"] == "/page")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event.pop("ts"))
    assert re.fullmatch(r"127\.0\.0\.1:\d+", event.pop("client"))
    assert re.fullmatch(r"[0-9a-f]{16}", event.pop("policy"))
    assert isinstance(event.pop("duration_ms"), int)
    pid, exe, cmdline = event.pop("pid"), event.pop("exe"), event.pop("cmdline")
    ancestry = event.pop("ancestry")
    if pid is not None:  # best effort: the lookup may lose the race with curl's exit
        assert exe.endswith("/curl") and "token=secret" not in cmdline and "curl" in cmdline
        assert ancestry[0] == f"curl[{pid}]"
    assert re.fullmatch(r"r-[0-9a-f]{12}", event.pop("rule_id"))
    assert event == {
        "event": "request", "account": "tester", "uid": UID, "user": USER, "host": "web.test",
        "port": web.port, "ip": "127.0.0.1", "method": "GET", "path": "/page", "qtype": None,
        "decision": "allow", "rule": rule_line(proxy, "host: web.test"),
        "reason": f"allowed by rule: host web.test ports {web.port}", "mode": "enforce",
        "bytes_up": 0, "bytes_down": len(done.stdout), "op": None,
        "credential": None, "approval": None,
    }
    assert "secret" not in proxy.audit_log.read_text()


CLIENT = """
import socket, sys, time
port, origin, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
time.sleep(1)  # lets the proxy's lookups run: pids are best effort, a request may beat them
for n, sock in enumerate(held):
    sock.sendall(f"GET http://web.test:{origin}/{tag}/{n} HTTP/1.1\\r\\nHost: web.test:{origin}"
                 "\\r\\nConnection: close\\r\\n\\r\\n".encode())
for sock in held:
    while sock.recv(65536):
        pass
sys.stdin.read()  # alive until the test has read the audit log
"""


def test_each_connection_is_attributed_to_the_process_that_opened_it(proxy, web):
    """Two processes of one user, each with 8 connections open at once (at most 16 lookups
    wait, MAX_PENDING_LOOKUPS): one scan of a process's descriptors finds all of its sockets,
    and each event names its own process."""
    clients = {tag: subprocess.Popen([sys.executable, "-c", CLIENT, str(proxy.port),
                                      str(web.port), tag], stdin=subprocess.PIPE)
               for tag in ("first", "second")}
    try:
        wanted = {f"/{tag}/{n}" for tag in clients for n in range(8)}
        assert wait_until(lambda: wanted <= {e["path"] for e in proxy.events()})
        events = [e for e in proxy.events() if e["path"].startswith(("/first/", "/second/"))]
    finally:
        for client in clients.values():
            client.communicate(b"", timeout=10)
    assert len(events) == 16 and {e["decision"] for e in events} == {"allow"}
    attributed = [e for e in events if e["pid"] is not None]
    assert {e["path"].split("/")[1] for e in attributed} == {"first", "second"}
    for event in attributed:
        assert event["pid"] == clients[event["path"].split("/")[1]].pid, event


def test_plain_http_denied_with_the_reason_in_the_body(proxy, web):
    done = curl(proxy, "-i", f"http://other.test:{web.port}/x")
    assert done.stdout.startswith("HTTP/1.1 403 Forbidden by agent-egress: no rule matched")
    body = done.stdout.split("\n\n", 1)[1]
    assert body.splitlines() == [
        "agent-egress denied this connection.",
        "account:     tester",
        f"destination: other.test:{web.port}",
        "rule:        no rule matched",
        f"reason:      no rule matched for other.test:{web.port} GET /x",
        f"next:        to allow it, add {{host: other.test, ports: [{web.port}]}} to "
        "accounts.tester.allow",
        "help:        run `agent-egress why` for your recent denials and the `agent-egress "
        "request` command that asks an operator for access",
    ]
    assert "X-Agent-Egress-Rule: no rule matched" in done.stdout
    assert "X-Agent-Egress-Help: run `agent-egress why`" in done.stdout
    assert done.stdout.splitlines()[0].endswith("(see agent-egress why)")
    assert (f"other.test:{web.port}", "/x") not in {(h, p) for _, h, p in web.requests}


def test_https_passes_through_and_counts_bytes(proxy, secure, test_ca):
    done = curl(proxy, "--cacert", str(test_ca.ca_file), f"https://secure.test:{secure.port}/a",
                check=True)
    assert done.stdout == f"hello from secure.test:{secure.port} GET /a\n"
    (event,) = proxy.wait_for_events(lambda e: e["event"] == "connect"
                                     and e["host"] == "secure.test" and e["bytes_down"])
    assert event["decision"] == "allow" and event["ip"] == "127.0.0.1"
    assert event["bytes_up"] > 200 and event["bytes_down"] > len(done.stdout)


def test_https_connect_denied_names_the_reason(proxy, secure, test_ca):
    done = curl(proxy, "-v", "--cacert", str(test_ca.ca_file),
                f"https://other.test:{secure.port}/")
    assert done.returncode == 56
    assert f"< HTTP/1.1 403 Forbidden by agent-egress: no rule matched for other.test:" \
           f"{secure.port}" in done.stderr
    assert "< X-Agent-Egress-Account: tester" in done.stderr


def test_deny_rule_wins(proxy, web):
    done = curl(proxy, f"http://denied.test:{web.port}/")
    assert "reason:      denied by rule: host denied.test" in done.stdout
    assert f"rule:        {rule_line(proxy, 'host: denied.test')}" in done.stdout


def test_sni_that_differs_from_connect_is_denied(proxy, secure, test_ca):
    before = len(secure.requests)
    done = curl(proxy, "--cacert", str(test_ca.ca_file), "--connect-to",
                f"other.test:{secure.port}:secure.test:{secure.port}",
                f"https://other.test:{secure.port}/fronted")
    assert done.returncode != 0
    (event,) = proxy.wait_for_events(lambda e: "does not match" in (e["reason"] or ""))
    assert event["reason"] == ("TLS SNI other.test does not match the CONNECT host secure.test "
                               "(domain fronting?)")
    assert event["decision"] == "deny"
    assert len(secure.requests) == before


@pytest.mark.parametrize("name, address, kind", [
    ("metadata.test", "169.254.169.254", "link-local (cloud metadata)"),
    ("intranet.test", "10.1.2.3", "private"),
])
def test_allowed_name_resolving_to_an_internal_address_is_refused(proxy, web, name, address,
                                                                   kind):
    done = curl(proxy, f"http://{name}:{web.port}/latest/meta-data")
    assert f"reason:      {name} resolves to {address}, which is {kind}; only a cidr rule can " \
           "allow an internal address" in done.stdout


@pytest.mark.parametrize("spelling", ["127.0.0.3", "2130706435", "0x7f.3", "0177.0.0.3", "127.3",
                                      "[::ffff:127.0.0.3]"])
def test_ip_literal_spellings_need_a_cidr_rule(proxy, web, spelling):
    done = curl(proxy, "--path-as-is", f"http://{spelling}:{web.port}/")
    assert f"reason:      no rule matched for 127.0.0.3:{web.port} GET /" in done.stdout


def test_ip_literal_with_a_cidr_rule_passes(proxy, web):
    done = curl(proxy, f"http://2130706433:{web.port}/lit", check=True)
    assert done.stdout.startswith("hello from ")


def test_inspected_https_checks_method_and_path(proxy, secure, cli):
    proxy_ca = subprocess.run([cli, "ca", "--state-dir", str(proxy.directory / "state")],
                              capture_output=True, text=True, check=True).stdout.strip()
    ok = curl(proxy, "--cacert", proxy_ca, f"https://inspect.test:{secure.port}/v1/items",
              check=True)
    assert ok.stdout == f"hello from inspect.test:{secure.port} GET /v1/items\n"
    denied = curl(proxy, "--cacert", proxy_ca, f"https://inspect.test:{secure.port}/v2/items")
    assert f"reason:      no rule matched for inspect.test:{secure.port} GET /v2/items (rule " \
           f"{rule_line(proxy, 'host: inspect.test')} allows only paths /v1/*, not /v2/items)" \
           in denied.stdout
    # Issue 13 row 2: what an origin could decode into another path is refused, not decided
    for path in ["/v1/../admin", "/v1/..%2Fadmin", "/v1/x/..%2F..%2Fadmin", "/v1/..;/admin",
                 "/v1/..%5Cadmin", "/v1/%252e%252e/admin", "/v1/%c0%ae%c0%ae/admin"]:
        refused = curl(proxy, "--cacert", proxy_ca, "--path-as-is",
                       f"https://inspect.test:{secure.port}{path}")
        assert f"reason:      path {path} " in refused.stdout, (path, refused.stdout)
        assert f"refused, as rule {rule_line(proxy, 'host: inspect.test')} looks at paths" \
               in refused.stdout
        assert "hello from" not in refused.stdout
    posted = curl(proxy, "--cacert", proxy_ca, "-d", "x=1",
                  f"https://inspect.test:{secure.port}/v1/items")
    assert "allows only methods GET, not POST" in posted.stdout


def test_git_clone_and_fetch_pass_push_is_denied(proxy, git_origin, tmp_path, cli):
    proxy_ca = subprocess.run([cli, "ca", "--state-dir", str(proxy.directory / "state")],
                              capture_output=True, text=True, check=True).stdout.strip()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "https_proxy": proxy.url,
           "GIT_SSL_CAINFO": proxy_ca, "GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.test", "GIT_COMMITTER_EMAIL": "t@example.test",
           "GIT_TERMINAL_PROMPT": "0"}
    url = f"https://git.test:{git_origin.port}/repo.git"

    def git(*args, cwd=tmp_path):
        return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=60)

    cloned = git("clone", url, "clone")
    assert cloned.returncode == 0, cloned.stderr
    assert (tmp_path / "clone" / "README").read_text() == "hello\n"
    assert git("fetch", cwd=tmp_path / "clone").returncode == 0
    (tmp_path / "clone" / "NEW").write_text("change\n")
    git("add", "NEW", cwd=tmp_path / "clone")
    git("commit", "-qm", "change", cwd=tmp_path / "clone")
    pushed = git("push", "origin", "main", cwd=tmp_path / "clone")
    assert pushed.returncode != 0
    assert "remote: reason:      refused by read-only rule " in pushed.stderr
    assert "/repo.git/info/refs is a git push (git-receive-pack)" in pushed.stderr
    assert not any("git-receive-pack" in path and method == "POST"
                   for method, _, path in git_origin.requests)


def pip(proxy, index_url, target, trusted):
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--target",
         str(target), "--index-url", index_url, "--trusted-host", trusted, "--proxy", proxy.url,
         "--retries", "1", "--timeout", "10", "egress-probe"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CONFIG_FILE": os.devnull})


def test_pip_installs_from_an_allowed_index(proxy, package_index, tmp_path):
    done = pip(proxy, f"http://index.test:{package_index.port}/simple/", tmp_path / "ok",
               "index.test")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "ok" / "egress_probe.py").exists()


def test_pip_from_a_denied_index_shows_the_reason(proxy, package_index, tmp_path):
    done = pip(proxy, f"https://other.test:{package_index.port}/simple/", tmp_path / "no",
               "other.test")
    assert done.returncode != 0
    assert f"Tunnel connection failed: 403 Forbidden by agent-egress: no rule matched for " \
           f"other.test:{package_index.port}" in done.stdout + done.stderr
    assert not (tmp_path / "no").exists() or not list((tmp_path / "no").iterdir())


def test_many_plain_http_requests_on_one_connection(proxy, web):
    """mitmproxy opens at most 5 upstream connections per client connection and address: a
    keep-alive client must reuse one, not stall on the sixth request."""
    urls = [f"http://web.test:{web.port}/keepalive{i}" for i in range(50)]
    done = curl(proxy, *urls)
    assert done.stdout.splitlines() == [
        f"hello from web.test:{web.port} GET /keepalive{i}" for i in range(50)], done.stderr


def test_a_deny_rule_with_paths_holds_over_https_that_an_allow_rule_passes_through(
        cli, tmp_path, dns, secure, test_ca):
    """Without inspection the tunnel would carry /admin/ unseen: the deny rule makes it
    inspected, and only the requests it names are refused."""
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: secure.test
        ports: [{secure.port}]
      - cidr: 127.0.0.1/32
        ports: [{secure.port}]
    deny:
      - host: secure.test
        paths: ["/admin/*"]
""", "--upstream-dns", dns.address, "--upstream-ca", str(test_ca.ca_file))
    try:
        ca = str(tmp_path / "state" / "mitmproxy" / "mitmproxy-ca-cert.pem")
        ok = curl(proxy, "--cacert", ca, f"https://secure.test:{secure.port}/src", check=True)
        assert ok.stdout == f"hello from secure.test:{secure.port} GET /src\n"
        denied = curl(proxy, "--cacert", ca, f"https://secure.test:{secure.port}/admin/users")
        assert "denied by rule: host secure.test paths /admin/*" in denied.stdout
        assert "hello from" not in denied.stdout
    finally:
        proxy.stop()
