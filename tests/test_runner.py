"""`agent-egress run` as an operator uses it: start-up checks, identity, signals, reload."""

from __future__ import annotations

import gc
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import bcrypt
import pytest
from support.proxy import Process, RunningProxy, wait_until

from agent_egress.runner import settle_heap

ROOT = Path(__file__).parents[1]


def allow_policy(match: str, *hosts: str, port: int, extra: str = "") -> str:
    rules = "".join(f"      - host: {h}\n        ports: [{port}]\n" for h in hosts)
    return (f"version: 1\naccounts:\n  tester:\n    match: {match}\n    allow:\n{rules}"
            f"      - cidr: 127.0.0.1/32\n        ports: [{port}]\n{extra}")


def curl(url, proxy, *args, user=None):
    return subprocess.run(["curl", "-sS", "--max-time", "20", "-x", proxy, *args, url],
                          capture_output=True, text=True, timeout=30, user=user)


@pytest.fixture
def start(cli, tmp_path, dns):
    started = []

    def run(policy, *args, env=None):
        proxy = RunningProxy(cli, tmp_path, policy, "--upstream-dns", dns.address, *args, env=env)
        started.append(proxy)
        return proxy

    yield run
    for proxy in started:
        proxy.stop()


def test_proxy_auth_good_bad_and_missing(start, web, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode())
    proxy = start(allow_policy("{proxy_users: [alice]}", "web.test", port=web.port),
                  "--proxy-auth", str(htpasswd))
    url = f"http://web.test:{web.port}/auth"
    good = curl(url, proxy.url, "--proxy-user", "alice:wonderland")
    assert good.stdout == f"hello from web.test:{web.port} GET /auth\n"
    bad = curl(url, proxy.url, "-o", "/dev/null", "-w", "%{http_code}", "--proxy-user",
               "alice:guess")
    missing = curl(url, proxy.url, "-o", "/dev/null", "-w", "%{http_code}")
    assert (bad.stdout, missing.stdout) == ("407", "407")
    tunnel = curl(f"https://web.test:{web.port}/", proxy.url, "--proxy-user", "alice:guess")
    assert "response 407" in tunnel.stderr
    reasons = [e["reason"] for e in proxy.wait_for_events(lambda e: e["decision"] == "deny")]
    assert "proxy authentication failed" in reasons
    assert "proxy authentication required" in reasons
    assert "wonderland" not in proxy.audit_log.read_text() + proxy.log()
    assert "guess" not in proxy.audit_log.read_text() + proxy.log()


def test_two_local_users_get_their_own_policies(start, web, two_users):
    a, b = two_users
    policy = f"""version: 1
accounts:
  agent-a:
    match: {{unix_users: [{a}]}}
    allow:
      - host: web.test
        ports: [{web.port}]
      - cidr: 127.0.0.1/32
        ports: [{web.port}]
  agent-b:
    match: {{unix_users: [{b}]}}
    allow:
      - host: other.test
        ports: [{web.port}]
      - cidr: 127.0.0.1/32
        ports: [{web.port}]
"""
    proxy = start(policy)
    web_url, other_url = f"http://web.test:{web.port}/", f"http://other.test:{web.port}/"
    assert curl(web_url, proxy.url, user=a).stdout.startswith("hello from web.test")
    assert "account:     agent-a" in curl(other_url, proxy.url, user=a).stdout
    assert curl(other_url, proxy.url, user=b).stdout.startswith("hello from other.test")
    assert "account:     agent-b" in curl(web_url, proxy.url, user=b).stdout
    root = curl(web_url, proxy.url)  # matches no account, and there is no default
    assert "no account matches uid 0, unix user root" in root.stdout
    events = proxy.wait_for_events(lambda e: e["user"] in (a, b))
    assert {(e["user"], e["account"], e["host"], e["decision"]) for e in events} == {
        (a, "agent-a", "web.test", "allow"), (a, "agent-a", "other.test", "deny"),
        (b, "agent-b", "other.test", "allow"), (b, "agent-b", "web.test", "deny")}
    assert {e["uid"] for e in events} == {pwd.getpwnam(a).pw_uid, pwd.getpwnam(b).pw_uid}


def replace_file(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def test_reload_refuses_a_broken_policy_and_applies_a_good_one(start, web):
    proxy = start(allow_policy(f"{{uids: [{os.getuid()}]}}", "web.test", port=web.port))
    url = f"http://web.test:{web.port}/reload"
    assert curl(url, proxy.url).stdout.startswith("hello")
    replace_file(proxy.policy_file, "version: 1\naccounts:\n  tester: [not, a, mapping]\n")
    assert wait_until(lambda: "policy reload refused" in proxy.log())
    assert f"{proxy.policy_file}:3:11: account tester: expected a mapping" in proxy.log()
    proxy.signal(signal.SIGHUP)
    assert wait_until(lambda: proxy.log().count("policy reload refused") >= 2)
    assert curl(url, proxy.url).stdout.startswith("hello")  # the old policy is in force
    replace_file(proxy.policy_file,
                 allow_policy(f"{{uids: [{os.getuid()}]}}", "other.test", port=web.port))
    assert wait_until(lambda: "no rule matched" in curl(url, proxy.url).stdout)


def test_sigterm_stops_cleanly_with_every_event_written(start, web):
    proxy = start(allow_policy(f"{{uids: [{os.getuid()}]}}", "web.test", port=web.port))
    for i in range(20):
        curl(f"http://web.test:{web.port}/n{i}", proxy.url)
    assert proxy.stop() == 0
    paths = {e["path"] for e in proxy.events()}
    assert {f"/n{i}" for i in range(20)} <= paths


def test_sigusr1_reopens_the_audit_log(start, web):
    proxy = start(allow_policy(f"{{uids: [{os.getuid()}]}}", "web.test", port=web.port))
    curl(f"http://web.test:{web.port}/before", proxy.url)
    assert wait_until(lambda: proxy.audit_log.exists() and "/before" in proxy.audit_log.read_text())
    rotated = proxy.audit_log.with_suffix(".1")
    os.rename(proxy.audit_log, rotated)
    proxy.signal(signal.SIGUSR1)
    proxy.wait_for(f"INFO agent_egress.runner: audit log reopened \\(SIGUSR1\\): "
                   f"{re.escape(str(proxy.audit_log))}\n")
    curl(f"http://web.test:{web.port}/after", proxy.url)
    assert wait_until(lambda: proxy.audit_log.exists() and "/after" in proxy.audit_log.read_text())
    assert "/after" not in rotated.read_text()


def test_state_is_owner_only(start, web, cli):
    proxy = start(allow_policy(f"{{uids: [{os.getuid()}]}}", "web.test", port=web.port))
    curl(f"http://web.test:{web.port}/", proxy.url)
    state = proxy.directory / "state"

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(state) == 0o711 and mode(state / "mitmproxy") == 0o700
    assert mode(state / "mitmproxy" / "mitmproxy-ca.pem") == 0o600
    assert wait_until(lambda: proxy.audit_log.exists())
    assert mode(proxy.audit_log) == 0o600
    printed = subprocess.run([cli, "ca", "--state-dir", str(state)], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert printed == str(state / "mitmproxy" / "mitmproxy-ca-cert.pem")
    assert "PRIVATE KEY" not in Path(printed).read_text()


def test_non_loopback_listener_needs_proxy_auth(cli, tmp_path):
    done = subprocess.run([cli, "run", "--proxy", "0.0.0.0:0", "--dns", "off", "--metrics",
                           "off", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "agent-egress: refusing to listen on 0.0.0.0, which is not loopback, without "
        "--proxy-auth: anyone who reaches it would use this machine's egress")


def test_a_port_in_use_is_a_clear_error(cli, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([cli, "run", "--proxy", f"127.0.0.1:{port}", "--dns", "off",
                               "--metrics", "off", "--state-dir", str(tmp_path), "--audit-log",
                               "-"],
                              capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (2, f"agent-egress: --proxy 127.0.0.1:{port}: "
                                                 "address in use (use --proxy ADDR or off)\n")


@pytest.mark.parametrize("flag, udp", [("--dns", False), ("--dns", True), ("--metrics", False),
                                       ("--transparent", False)])
def test_each_listener_in_use_is_one_line_naming_its_flag(cli, tmp_path, flag, udp):
    with socket.socket(type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        args = {"--proxy": "127.0.0.1:0", "--dns": "off", "--metrics": "off",
                flag: f"127.0.0.1:{port}"}
        done = subprocess.run([cli, "run", *(x for kv in args.items() for x in kv),
                               "--state-dir", str(tmp_path), "--audit-log", "-"],
                              capture_output=True, text=True, timeout=30)
    off = "" if flag == "--transparent" else " or off"
    assert (done.returncode, done.stderr) == (2, f"agent-egress: {flag} 127.0.0.1:{port}: "
                                                 f"address in use (use {flag} ADDR{off})\n")


def test_a_second_instance_on_the_same_state_or_audit_log_is_refused(start, cli, tmp_path,
                                                                     web):
    first = start(allow_policy(f"{{uids: [{os.getuid()}]}}", "web.test", port=web.port))
    pid = first.process.pid
    for state, audit in ((first.directory / "state", tmp_path / "other.jsonl"),
                         (tmp_path / "other-state", first.audit_log)):
        done = subprocess.run([cli, "run", "--proxy", "127.0.0.1:0", "--dns", "off",
                               "--metrics", "off", "--state-dir", str(state), "--audit-log",
                               str(audit)], capture_output=True, text=True, timeout=30)
        what = f"state directory {state}" if state == first.directory / "state" \
            else f"audit log {audit}"
        assert (done.returncode, done.stderr) == (
            2, f"agent-egress: another agent-egress (pid {pid}) runs with the {what}; stop it "
               "first, or give this one its own --state-dir and --audit-log\n")
    # the first one goes on serving, and once it stops the lock is free again
    assert curl(f"http://web.test:{web.port}/still", first.url).stdout.startswith("hello")
    first.stop()
    again = start(allow_policy(f"{{uids: [{os.getuid()}]}}", "web.test", port=web.port))
    assert again.port


def test_an_unanswering_upstream_dns_is_warned_about_at_start(cli, tmp_path):
    with socket.socket(type=socket.SOCK_DGRAM) as silent:  # takes queries, never answers
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        proxy = RunningProxy(cli, tmp_path, None, "--upstream-dns", f"127.0.0.1:{port}")
        try:
            proxy.wait_for(f"WARNING agent_egress.runner: --upstream-dns 127.0.0.1:{port} does "
                           "not answer")
        finally:
            proxy.stop()


def test_an_answering_upstream_dns_is_not_warned_about(start):
    proxy = start(None)
    time.sleep(2.5)  # longer than the probe waits
    assert "does not answer" not in proxy.log()


def test_embedded_default_policy_learns_but_keeps_internal_addresses_closed(start, web):
    proxy = start(None)
    assert "policy embedded default policy" in proxy.log()
    done = curl(f"http://web.test:{web.port}/", proxy.url)
    assert "web.test resolves to 127.0.0.1, which is loopback" in done.stdout
    # there is no file to add the rule to: the hint says how to get one
    assert "the embedded default policy has no file to edit: `agent-egress init policy.yaml` " \
           "writes it to one; then run with --policy policy.yaml" in done.stdout
    (event,) = proxy.wait_for_events(lambda e: e["host"] == "web.test")
    assert (event["account"], event["mode"], event["decision"]) == ("default", "learn", "deny")


def test_addon_loads_standalone_in_mitmdump(tmp_path, dns, web):
    policy = tmp_path / "policy.yaml"
    policy.write_text(allow_policy(f"{{uids: [{os.getuid()}]}}", "web.test", port=web.port))
    script = ROOT / "addons" / "script.py"
    mitmdump = Process(
        [str(ROOT / ".venv" / "bin" / "mitmdump"), "-s", str(script),
         "--mode", "regular@127.0.0.1:0",
         "--set", f"confdir={tmp_path / 'conf'}", "--set", "connection_strategy=lazy",
         "--set", f"agent_egress_policy={policy}",
         "--set", f"agent_egress_audit_log={tmp_path / 'audit.jsonl'}",
         "--set", f"agent_egress_upstream_dns={dns.address}"])
    try:
        port = mitmdump.wait_for(r"proxy listening at 127\.0\.0\.1:(\d+)").group(1)
        proxy = f"http://127.0.0.1:{port}"
        allowed = curl(f"http://web.test:{web.port}/standalone", proxy)
        assert allowed.stdout == f"hello from web.test:{web.port} GET /standalone\n"
        denied = curl(f"http://other.test:{web.port}/", proxy)
        assert f"reason:      no rule matched for other.test:{web.port} GET /" in denied.stdout
    finally:
        mitmdump.stop()
    assert wait_until(lambda: "other.test" in (tmp_path / "audit.jsonl").read_text())


def test_a_policy_the_governed_account_could_rewrite_is_refused(cli, tmp_path, two_users):
    user = pwd.getpwnam(two_users[0])
    policy = tmp_path / "policy.yaml"
    policy.write_text(allow_policy(f"{{uids: [{user.pw_uid}]}}", "web.test", port=80))
    os.chown(policy, user.pw_uid, user.pw_gid)
    done = subprocess.run([cli, "run", "--policy", str(policy), "--proxy", "127.0.0.1:0",
                           "--dns", "off", "--metrics", "off", "--state-dir",
                           str(tmp_path / "state")], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr.strip()) == (
        2, f"agent-egress: {policy} belongs to uid {user.pw_uid}, which account tester "
           "governs: that account could rewrite it")
    os.chown(policy, 0, 0)
    policy.chmod(0o646)
    done = subprocess.run([cli, "run", "--policy", str(policy), "--proxy", "127.0.0.1:0",
                           "--dns", "off", "--metrics", "off", "--state-dir",
                           str(tmp_path / "state")], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr.strip()) == (
        2, f"agent-egress: {policy} is writable by every user, governed accounts included")


def test_the_event_loop_is_uvloop_where_installed():
    from agent_egress.runner import event_loop

    assert event_loop("auto") == "uvloop"  # installed with the test extra
    assert event_loop("uvloop") == "uvloop"
    assert event_loop("asyncio") == "asyncio"


def test_once_serving_start_ups_objects_leave_the_collectors_sight():
    """Without it a full collection walked mitmproxy and the policy: a 48 ms pause of every
    connection (runner.settle_heap)."""
    try:
        settle_heap()
        assert gc.get_freeze_count() > 10_000  # this test process's modules, at least
    finally:
        gc.unfreeze()
