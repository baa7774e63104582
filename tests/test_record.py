"""The record an operator reads (issue 14): who did it (`ancestry`), which rule (`rule_id`,
stable across edits), which operation (`op`), what the denial suggests, connections closed
when their rule ends, and inspected TLS a client refuses. Through the real proxy and commands,
with real clients."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from support.origins import Origin, git_handler, git_repository
from support.proxy import RunningProxy, wait_until

from agent_egress.auditevent import KEYS

pytestmark = pytest.mark.e2e

UID = os.getuid()
SYSTEM_PYTHON = "/usr/bin/python3"


def run(cli, *args):
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=120)


# 2. ancestry

CONNECTS = r"""
import os, socket, sys
print(os.getpid(), os.getppid(), flush=True)
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
    s.sendall(f"CONNECT {sys.argv[2]}:443 HTTP/1.1\r\n\r\n".encode())
    assert s.recv(65536).startswith(b"HTTP/1.1 403")
"""


def test_ancestry_names_the_client_and_its_parents_up_to_another_user(cli, tmp_path, dns):
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow: []
""", "--upstream-dns", dns.address)
    try:
        script = tmp_path / "client.py"
        script.write_text(CONNECTS)
        host = f"ancestry-{os.getpid()}.test"
        # `; true` keeps bash from exec'ing the client in its own place
        done = subprocess.run(["bash", "-c", f"{sys.executable} {script} {proxy.port} {host}; "
                               "true"], capture_output=True, text=True, timeout=60, check=True)
        pid, bash_pid = (int(x) for x in done.stdout.split())
        [event] = proxy.wait_for_events(lambda e: e["host"] == host)
        chain = event["ancestry"]
        python = os.path.basename(os.path.realpath(sys.executable))
        assert chain[:3] == [f"{python}[{pid}]", f"bash[{bash_pid}]",
                             f"{python}[{os.getpid()}]"], chain
        assert 3 <= len(chain) <= 8
        for entry in chain[2:]:  # every one still running is this user's
            owner = os.stat(f"/proc/{entry.rsplit('[', 1)[1][:-1]}").st_uid
            assert owner == UID, entry
    finally:
        proxy.stop()


def test_ancestry_stops_at_the_first_process_of_another_user(cli, tmp_path, dns, two_users):
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run a client as another user")
    user = pwd.getpwnam(two_users[0])
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
accounts:
  agent:
    match: {{uids: [{user.pw_uid}]}}
    allow: []
""", "--upstream-dns", dns.address)
    try:
        host = f"other-user-{os.getpid()}.test"
        # the system's Python, the script on its standard input: the test's own Python and
        # files may be where the other user cannot go
        done = subprocess.run(["runuser", "-u", user.pw_name, "--", "bash", "-c",
                               f"{SYSTEM_PYTHON} - {proxy.port} {host}; true"], input=CONNECTS,
                              capture_output=True, text=True, timeout=60, check=True)
        assert done.stdout, done.stderr
        pid, bash_pid = (int(x) for x in done.stdout.split())
        [event] = proxy.wait_for_events(lambda e: e["host"] == host)
    finally:
        proxy.stop()
    python = os.path.basename(os.path.realpath(SYSTEM_PYTHON))
    # runuser, root's, is where the agent user's chain ends
    assert event["ancestry"] == [f"{python}[{pid}]", f"bash[{bash_pid}]"], event
    assert event["uid"] == user.pw_uid


# 4. stable rule ids

def test_rule_ids_keep_rules_in_use_off_the_stale_list_after_learn_apply(cli, tmp_path, web,
                                                                          dns):
    text = f"""version: 1
accounts:
  learner:
    match: {{uids: [{UID + 1}]}}
    mode: learn
    allow: []
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: web.test
        ports: [{web.port}]
      - id: the-mirror
        host: index.test
        ports: [{web.port}]
      - cidr: 127.0.0.1/32
        ports: [{web.port}]
      - host: unused.test
"""
    proxy = RunningProxy(cli, tmp_path, text, "--upstream-dns", dns.address)
    try:
        for host in ("web.test", "index.test"):
            subprocess.run(["curl", "-sS", "-x", proxy.url, f"http://{host}:{web.port}/x"],
                           capture_output=True, timeout=30, check=True)
        events = proxy.wait_for_events(lambda e: e["host"] == "index.test")
    finally:
        proxy.stop()
    web_event = next(e for e in proxy.events() if e["host"] == "web.test")
    assert web_event["rule_id"].startswith("r-") and events[0]["rule_id"] == "the-mirror"
    # what the learner account did (another user): three new rules above tester's
    base = dict.fromkeys(KEYS)
    learned = [json.dumps({**base, "ts": events[0]["ts"], "event": "connect",
                           "account": "learner", "host": f"{n}.learned.test", "port": 443,
                           "decision": "would_deny", "mode": "learn",
                           "reason": f"no rule matched for {n}.learned.test:443"})
               for n in ("a", "b")]
    log = tmp_path / "all.jsonl"
    log.write_text(proxy.audit_log.read_text() + "\n".join(learned) + "\n")
    applied = run(cli, "learn", "--policy", str(proxy.policy_file), "--apply", str(log))
    assert "# applied 2 rules" in applied.stdout, applied.stdout + applied.stderr
    assert proxy.policy_file.read_text().index("learned.test") < \
        proxy.policy_file.read_text().index("web.test")
    stale = run(cli, "learn", "--policy", str(proxy.policy_file), "--stale", "1h", str(log))
    lines = [line for line in stale.stdout.splitlines() if "# stale" in line]
    assert any("(host unused.test ports 80,443)" in line for line in lines), stale.stdout
    assert not any("web.test" in line or "index.test" in line for line in lines), stale.stdout
    # the cidr rule decided no event, but let the allowed names' address through: in use
    assert not any("cidr 127.0.0.1/32" in line for line in lines), stale.stdout


# 5 and 9. op: git fetch and push, LFS, publish; replay and learn use it

def git(env, *args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def git_env(proxy, home):
    return {"PATH": os.environ["PATH"], "HOME": str(home), "http_proxy": proxy.url,
            "GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.test", "GIT_COMMITTER_EMAIL": "t@example.test",
            "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}


@pytest.fixture
def own_git_origin(tmp_path):
    """A git origin of this test's own: pushes here change nobody else's repository."""
    origin = Origin(git_handler(git_repository(tmp_path / "origin")))
    yield origin
    origin.stop()


def test_a_denied_push_is_recorded_as_one_and_replay_does_not_call_it_newly_allowed(
        cli, tmp_path, dns, own_git_origin):
    port = own_git_origin.port
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: git.test
        ports: [{port}]
        access: read-only
      - cidr: 127.0.0.1/32
        ports: [{port}]
""", "--upstream-dns", dns.address)
    try:
        env = git_env(proxy, tmp_path)
        url = f"http://git.test:{port}/repo.git"
        assert git(env, "clone", url, "clone", cwd=tmp_path).returncode == 0
        (tmp_path / "clone" / "NEW").write_text("x\n")
        git(env, "add", "NEW", cwd=tmp_path / "clone")
        git(env, "commit", "-qm", "x", cwd=tmp_path / "clone")
        pushed = git(env, "push", "origin", "main", cwd=tmp_path / "clone")
        assert pushed.returncode != 0
        rule = f"{proxy.policy_file}:6"
        # 9: the denial names the read-only rule and suggests nothing that widens writes
        assert f"remote: reason:      refused by read-only rule {rule} (host git.test ports " \
               f"{port} access read-only): git.test:{port} GET /repo.git/info/refs is a git " \
               "push (git-receive-pack)" in pushed.stderr, pushed.stderr
        assert "host: git.test" not in pushed.stderr
        events = proxy.wait_for_events(lambda e: e["op"] == "git-push")
    finally:
        proxy.stop()
    fetches = [e for e in proxy.events() if e["op"] == "git-fetch"]
    assert {(e["method"], e["path"]) for e in fetches} >= {
        ("GET", "/repo.git/info/refs"), ("POST", "/repo.git/git-upload-pack")}
    assert all(e["decision"] == "allow" and e["rule_id"].startswith("r-") for e in fetches)
    [push] = events
    assert (push["decision"], push["path"], push["rule"], push["rule_id"]) == (
        "deny", "/repo.git/info/refs", rule, fetches[0]["rule_id"])
    # replaying the policy that denied the push: nothing changes
    same = run(cli, "replay", "--policy", str(proxy.policy_file), str(proxy.audit_log))
    assert same.returncode == 0, same.stdout
    assert same.stdout.startswith("0 events would newly be denied and 0 newly allowed")
    # a candidate without read-only: the push is newly allowed, and said to be a push
    wider = tmp_path / "wider.yaml"
    wider.write_text(proxy.policy_file.read_text().replace("        access: read-only\n", ""))
    changed = run(cli, "replay", "--policy", str(wider), str(proxy.audit_log))
    assert f"newly allowed:  git.test:{port} GET /repo.git/info/refs (git-push)" in \
        changed.stdout, changed.stdout


def test_learn_proposes_read_only_where_an_account_only_fetched_and_flags_writes(
        cli, tmp_path, dns, own_git_origin, web):
    port = own_git_origin.port
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    mode: learn
    allow:
      - cidr: 127.0.0.1/32
        ports: [{port}, {web.port}]
""", "--upstream-dns", dns.address)
    try:
        env = git_env(proxy, tmp_path)
        url = f"http://git.test:{port}/repo.git"
        assert git(env, "clone", url, "clone", cwd=tmp_path).returncode == 0
        proxy.wait_for_events(lambda e: e["op"] == "git-fetch")
        fetched_only = tmp_path / "fetched.jsonl"
        fetched_only.write_text(proxy.audit_log.read_text())
        learned = run(cli, "learn", "--policy", str(proxy.policy_file), str(fetched_only))
        assert f"- {{host: git.test, ports: [{port}], access: read-only}}" in learned.stdout, \
            learned.stdout
        # the same account pushes (learning mode lets it through): never proposed quietly
        (tmp_path / "clone" / "NEW").write_text("x\n")
        git(env, "add", "NEW", cwd=tmp_path / "clone")
        git(env, "commit", "-qm", "x", cwd=tmp_path / "clone")
        assert git(env, "push", "origin", "main", cwd=tmp_path / "clone").returncode == 0
        # LFS batch and package publishing, as clients send them
        base = f"http://web.test:{web.port}"
        for args in (["-X", "POST", "-H", "Content-Type: application/vnd.git-lfs+json",
                      "--data", '{"operation": "upload", "objects": []}',
                      f"{base}/r.git/info/lfs/objects/batch"],
                     ["-X", "PUT", "--data", "{}", f"{base}/@scope%2fpkg"]):
            subprocess.run(["curl", "-sS", "-x", proxy.url, *args], capture_output=True,
                           timeout=30, check=True)
        proxy.wait_for_events(lambda e: e["op"] == "publish")
    finally:
        proxy.stop()
    ops = {(e["host"], e["op"]) for e in proxy.events() if e["op"]}
    assert ops >= {("git.test", "git-fetch"), ("git.test", "git-push"),
                   ("web.test", "lfs-upload"), ("web.test", "publish")}, ops
    learned = run(cli, "learn", "--policy", str(proxy.policy_file), "--apply",
                  str(proxy.audit_log))
    assert "git.test: WRITES: git-push seen" in learned.stdout, learned.stdout
    assert "web.test: WRITES: lfs-upload, publish seen" in learned.stdout, learned.stdout
    assert "git.test" not in proxy.policy_file.read_text()
    assert "web.test" not in proxy.policy_file.read_text()


def test_check_names_the_read_only_rule_and_hints_a_path_rule_for_a_path(cli, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("""version: 1
accounts:
  codex:
    match: {uids: [1001]}
    allow:
      - preset: github
        access: read-only
      - host: api.example.test
        ports: [443]
        methods: [GET]
        paths: ["/v1/*"]
""")
    push = run(cli, "check", "--policy", str(policy), "--account", "codex", "--json",
               "--method", "POST", "https://github.com/o/r.git/git-receive-pack")
    decided = json.loads(push.stdout)
    assert (push.returncode, decided["rule"]) == (1, f"{policy}:6")
    assert decided["reason"].startswith(f"refused by read-only rule {policy}:6 (host "
                                        "github.com ports 22,443 access read-only")
    assert "host: github.com" not in decided["hint"] and "nothing to add" in decided["hint"]
    path = run(cli, "check", "--policy", str(policy), "--account", "codex",
               "https://api.example.test/v2/items")
    assert path.returncode == 1
    assert "next      to allow this path only, add {host: api.example.test, ports: [443], " \
           'methods: [GET], paths: ["/v2/items"]} to accounts.codex.allow' in path.stdout, \
        path.stdout
    assert "{host: api.example.test, ports: [443]}" not in path.stdout


# 7. connections closed when their rule ends

KEEP_ALIVE = r"""
import socket, ssl, sys, time
proxy, host, port, ca, seconds = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4],
                                  float(sys.argv[5]))
idle = sys.argv[6] == "idle"  # one request, then wait for the tunnel to end
raw = socket.create_connection(("127.0.0.1", proxy))
raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += raw.recv(1)
assert head.startswith(b"HTTP/1.1 200"), head
tls = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname=host)
reader = tls.makefile("rb")
print("open", time.time(), flush=True)
start = time.time()
n = 0
try:
    while time.time() - start < seconds:
        n += 1
        tls.sendall(f"GET /{n} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        status = reader.readline()
        if not status:
            break
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        reader.read(length)
        print("served", status.split()[1].decode(), time.time(), flush=True)
        if idle:
            tls.settimeout(seconds)
            reader.readline()
            break
        time.sleep(0.2)
except OSError as e:
    print("error", e, flush=True)
print("closed", time.time(), flush=True)
"""


def keep_alive(tmp_path, proxy, host, port, ca, seconds, idle=False):
    """A client keeping one CONNECT tunnel open, sending a request every 0.2 s (or one, then
    waiting); it prints when the tunnel closed."""
    script = tmp_path / "keepalive.py"
    script.write_text(KEEP_ALIVE)
    return subprocess.Popen([sys.executable, str(script), str(proxy.port), host, str(port),
                             str(ca), str(seconds), "idle" if idle else "busy"],
                            stdout=subprocess.PIPE, text=True)


def closed_at(client) -> tuple[float, list[str]]:
    out, _ = client.communicate(timeout=60)
    lines = out.splitlines()
    assert lines and lines[-1].startswith("closed "), (client.returncode, lines)
    return float(lines[-1].split()[1]), lines


def test_a_tunnel_kept_alive_past_its_rule_s_expiry_is_closed_with_an_event(
        cli, tmp_path, dns, secure, test_ca):
    # time enough for the proxy to start (slow on a loaded machine) before the rule expires
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=10)
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: secure.test
        ports: [{secure.port}]
        expires: {expires.isoformat().replace("+00:00", "Z")}
      - cidr: 127.0.0.1/32
        ports: [{secure.port}]
""", "--upstream-dns", dns.address)
    try:
        assert time.time() < expires.timestamp() - 2, "the proxy took too long to start"
        client = keep_alive(tmp_path, proxy, "secure.test", secure.port, test_ca.ca_file, 20)
        closed, lines = closed_at(client)
        assert any(line.startswith("served 200") for line in lines), lines
        assert expires.timestamp() <= closed <= expires.timestamp() + 2, (expires, lines)
        [event] = proxy.wait_for_events(lambda e: e["host"] == "secure.test")
    finally:
        proxy.stop()
    assert event["decision"] == "deny" and event["event"] == "connect"
    assert event["reason"].startswith(f"closed while open, as rule {proxy.policy_file}:6 "
                                      "expired: no rule matched for secure.test:"), event
    assert event["rule_id"].startswith("r-") and event["bytes_down"] > 0


def test_an_inspected_tunnel_whose_rule_a_reload_withdraws_is_closed_with_an_event(
        cli, tmp_path, dns, secure, test_ca):
    text = f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: inspect.test
        ports: [{secure.port}]
        methods: [GET]
      - cidr: 127.0.0.1/32
        ports: [{secure.port}]
"""
    proxy = RunningProxy(cli, tmp_path, text, "--upstream-dns", dns.address,
                         "--upstream-ca", str(test_ca.ca_file))
    try:
        proxy_ca = run(cli, "ca", "--state-dir", str(proxy.directory / "state")).stdout.strip()
        # idle: a request after the reload would be denied by itself (and its 403 end the
        # connection); this is about the tunnel
        client = keep_alive(tmp_path, proxy, "inspect.test", secure.port, proxy_ca, 15,
                            idle=True)
        assert wait_until(lambda: any(e["host"] == "inspect.test" for e in proxy.events()), 10)
        proxy.policy_file.write_text(text.replace("host: inspect.test", "host: web.test"))
        changed = time.time()
        closed, lines = closed_at(client)
        assert any(line.startswith("served 200") for line in lines), lines
        assert closed - changed <= 3, (changed, lines)
        events = proxy.wait_for_events(lambda e: e["event"] == "connect")
    finally:
        proxy.stop()
    [event] = events
    assert event["decision"] == "deny"
    assert event["reason"].startswith("closed while open, as the policy changed (now "), event
    assert "which this tunnel (not inspected)" not in event["reason"]


# 10. inspected HTTPS that the client refuses

def test_a_client_refusing_the_proxy_s_ca_is_recorded_with_what_to_install(cli, tmp_path, dns,
                                                                            secure, test_ca):
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: inspect.test
        ports: [{secure.port}]
        paths: ["/v1/*"]
      - cidr: 127.0.0.1/32
        ports: [{secure.port}]
""", "--upstream-dns", dns.address, "--upstream-ca", str(test_ca.ca_file))
    try:
        done = subprocess.run(["curl", "-sS", "-x", proxy.url, "--cacert", str(test_ca.ca_file),
                               f"https://inspect.test:{secure.port}/v1/x"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode != 0
        [event] = proxy.wait_for_events(lambda e: e["host"] == "inspect.test")
    finally:
        proxy.stop()
    assert (event["event"], event["decision"]) == ("connect", "deny")
    assert event["reason"].startswith(f"inspected HTTPS to inspect.test:{secure.port}: the "
                                      "client broke off the TLS handshake ("), event
    assert "`agent-egress ca`" in event["reason"] and "`agent-egress env`" in event["reason"]
    assert "CURL_CA_BUNDLE" in event["reason"]
    assert event["exe"] is None or event["exe"].endswith("/curl")


def test_learn_collapses_siblings_only_with_their_own_access(cli, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("""version: 1
accounts:
  codex:
    match: {uids: [1001]}
    mode: learn
    allow: []
""")
    base = dict.fromkeys(KEYS)

    def request(host, method, path, op):
        return json.dumps({**base, "ts": "2026-11-25T10:00:00.000Z", "event": "request",
                           "account": "codex", "host": host, "port": 443, "method": method,
                           "path": path, "op": op, "decision": "would_deny", "mode": "learn",
                           "reason": f"no rule matched for {host}:443 {method} {path}"})

    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join(
        [request(f"{n}.git.example.test", "GET", "/r.git/info/refs", "git-fetch")
         for n in "abc"]
        + [request("d.git.example.test", "GET", "/page", None),
           request("e.git.example.test", "POST", "/r.git/git-upload-pack", "git-fetch"),
           request("e.git.example.test", "POST", "/api/items", None)]) + "\n")
    done = run(cli, "learn", "--policy", str(policy), str(log))
    assert "- {host: *.git.example.test, ports: [443], access: read-only}" in done.stdout, \
        done.stdout
    assert "covers a.git.example.test, b.git.example.test, c.git.example.test" in done.stdout
    # a plain GET: no operation recognised, so no access narrowing is claimed for it
    assert "- {host: d.git.example.test, ports: [443]}" in done.stdout
    # a fetch and a write that is no recognised operation: not read-only
    assert "- {host: e.git.example.test, ports: [443]}" in done.stdout
