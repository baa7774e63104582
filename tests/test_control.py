"""Asking a human, end to end: the real proxy with its control socket, real clients (pip, curl,
dig and agent-egress itself) run as two Unix accounts, an agent's and an operator's (a member
of the --operators group by a supplementary group), against origins and a name server on
loopback.

The project's interpreter lives under /root, which the test accounts cannot traverse: their
`agent-egress` commands run with CAP_DAC_READ_SEARCH as an ambient capability, which lets them
read it and changes nothing else. The control socket knows callers by uid and groups
(SO_PEERCRED, SO_PEERGROUPS), which stay theirs. pip is the system's (/usr/bin/python3).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from support import netns
from support.origins import Origin
from support.proxy import RunningProxy, wait_until

AGENT = "egress-ask-agent"
OPERATOR = "egress-ask-op"
OPERATORS = "egress-ask-ops"
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.getuid() != 0, reason="creating users needs root")]


@pytest.fixture(scope="module")
def accounts() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    agent, operator = netns.system_user(AGENT), netns.system_user(OPERATOR)
    try:
        grp.getgrnam(OPERATORS)
    except KeyError:
        subprocess.run(["groupadd", "--system", OPERATORS], check=True)
    subprocess.run(["usermod", "-a", "-G", OPERATORS, OPERATOR], check=True)
    return agent, operator


@pytest.fixture
def public(test_ca) -> Iterator[Path]:
    """A directory both accounts reach (pytest's are root's only): the control socket, the
    agent's home, the test CA."""
    directory = Path(tempfile.mkdtemp(prefix="agent-egress-ask-"))
    directory.chmod(0o755)
    home = directory / "home"
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    shutil.copy(test_ca.ca_file, directory / "ca.pem")
    (directory / "ca.pem").chmod(0o644)
    yield directory
    shutil.rmtree(directory)


def as_user(user: str, public: Path, *command: str, cli: str | None = None,
            env: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`command` as `user` with its own groups and an environment of its own; `cli`: the
    command is agent-egress (see the module's docstring)."""
    return subprocess.run(_argv(user, public, command, cli, env), capture_output=True,
                          text=True, timeout=timeout)


def spawn_as_user(user: str, public: Path, *command: str) -> subprocess.Popen[str]:
    return subprocess.Popen(_argv(user, public, command, None, ()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _argv(user: str, public: Path, command: tuple[str, ...], cli: str | None,
          env: tuple[str, ...]) -> list[str]:
    caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"] if cli else []
    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
            "--init-groups", *caps, "--", "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin",
            f"HOME={public / 'home'}", "LANG=C.UTF-8",
            f"AGENT_EGRESS_CONTROL={public / 'control.sock'}", *env,
            *([cli] if cli else []), *command]


def start(cli: str, tmp_path: Path, public: Path, dns, policy: str, *args: str) -> RunningProxy:
    return RunningProxy(cli, tmp_path, policy, "--upstream-dns", dns.address, "--control",
                        str(public / "control.sock"), "--operators", OPERATORS, *args)


def pip_install(public: Path, proxy: RunningProxy,
                index_port: int) -> subprocess.CompletedProcess[str]:
    done = as_user(AGENT, public, SYSTEM_PYTHON, "-m", "pip", "install", "--no-deps",
                   "--no-cache-dir", "--disable-pip-version-check", "--target",
                   str(public / "home" / "site"), "--index-url",
                   f"http://index.test:{index_port}/simple/", "--trusted-host", "index.test",
                   "--proxy", proxy.url, "--retries", "0", "--timeout", "20", "egress-probe",
                   env=("PIP_CONFIG_FILE=/dev/null",), timeout=120)
    return done


def one_line_error(done: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("agent-egress: "), done.stderr
    assert text in done.stderr, done.stderr


def test_a_refused_pip_install_is_asked_for_approved_and_ends_by_itself(
        cli, tmp_path, public, accounts, dns, web, package_index):
    policy = f"""version: 1
accounts:
  agent:
    match: {{unix_users: [{AGENT}]}}
    allow:
      - cidr: 127.0.0.1/32   # the origins listen on loopback; their names need rules still
        ports: [{package_index.port}, {web.port}]
"""
    proxy = start(cli, tmp_path, public, dns, policy)
    try:
        refused = pip_install(public, proxy, package_index.port)
        assert refused.returncode != 0, refused.stdout
        assert not (public / "home" / "site").exists()

        why = as_user(AGENT, public, "why", cli=cli)
        assert why.returncode == 0, why.stderr
        assert f"index.test:{package_index.port}" in why.stdout
        assert f"no rule matched for index.test:{package_index.port}" in why.stdout
        ask = re.search(r"^  ask +(agent-egress request .*)$", why.stdout, re.M)
        assert ask, why.stdout
        assert ask.group(1) == (f"agent-egress request index.test:{package_index.port} "
                                "--reason 'WHY YOU NEED IT'")
        listed = json.loads(as_user(AGENT, public, "why", "--json", cli=cli).stdout)
        assert listed[0]["host"] == "index.test" and listed[0]["exe"]

        request = shlex.split(ask.group(1).replace("WHY YOU NEED IT", "install egress-probe"))
        opened = as_user(AGENT, public, *request[1:], "--for", "1h", cli=cli)
        assert opened.returncode == 0, opened.stderr
        request_id = opened.stdout.split()[0]
        assert re.fullmatch(r"[0-9a-f]{8}", request_id) and " opened: " in opened.stdout
        joined = as_user(AGENT, public, "request", f"index.test:{package_index.port}", cli=cli)
        assert joined.stdout.startswith(f"{request_id} joined: ")

        # the agent may not look at the queue, nor approve its own request
        one_line_error(as_user(AGENT, public, "pending", cli=cli), 1, "only an operator")
        one_line_error(as_user(AGENT, public, "approve", request_id, cli=cli), 1,
                       f"{AGENT} is not root nor in group {OPERATORS}")

        pending = as_user(OPERATOR, public, "pending", cli=cli)
        assert pending.returncode == 0, pending.stderr
        assert f"{request_id}  account agent  index.test:{package_index.port}" in pending.stdout
        assert "reason    install egress-probe" in pending.stdout
        assert "  attempt   " in pending.stdout and "no rule matched" in pending.stdout
        (entry,) = json.loads(as_user(OPERATOR, public, "pending", "--json", cli=cli).stdout)
        assert {k: entry[k] for k in ("id", "account", "host", "port", "path", "reason",
                                      "state")} == {
            "id": request_id, "account": "agent", "host": "index.test",
            "port": package_index.port, "path": None, "reason": "install egress-probe",
            "state": "pending"}
        assert entry["attempts"] and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
                                                  entry["opened"])

        approved = as_user(OPERATOR, public, "approve", request_id, "--for", "10m", cli=cli)
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout.startswith(f"{request_id} approved: account agent may reach "
                                          f"index.test:{package_index.port} until ")
        text = proxy.policy_file.read_text()
        assert re.search(rf"# approved by {OPERATOR} at \S+Z \(request {request_id}\): "
                         rf"install egress-probe\n +- host: index\.test\n +ports: "
                         rf"\[{package_index.port}\]\n +expires: '\S+Z'\n", text), text
        assert "# the origins listen on loopback" in text

        installed = pip_install(public, proxy, package_index.port)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert list((public / "home" / "site").glob("egress_probe*"))
        assert proxy.wait_for_events(lambda e: e["host"] == "index.test"
                                     and e["decision"] == "allow")
        one_line_error(as_user(OPERATOR, public, "approve", request_id, cli=cli), 2,
                       f"access request {request_id} is approved by {OPERATOR}")

        # a grant ends by itself
        def curl() -> subprocess.CompletedProcess[str]:
            return as_user(AGENT, public, "curl", "-sS", "--max-time", "20", "-x", proxy.url,
                           f"http://web.test:{web.port}/grant")

        assert "agent-egress denied this connection" in curl().stdout
        short = as_user(AGENT, public, "request", f"web.test:{web.port}", cli=cli)
        short_id = short.stdout.split()[0]
        assert as_user(OPERATOR, public, "approve", short_id, "--for", "3s",
                       cli=cli).returncode == 0
        assert curl().stdout == f"hello from web.test:{web.port} GET /grant\n"
        time.sleep(3.5)
        ended = curl().stdout
        assert "agent-egress denied this connection" in ended and "expired" in ended
    finally:
        proxy.stop()


class Receiver:
    """A --notify endpoint on loopback that fails the first POST, so that a retry is seen."""

    def __init__(self) -> None:
        self.received: list[dict[str, object]] = []
        self.attempts = 0
        self.lock = threading.Lock()
        self.origin = Origin(self.handle)

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        with self.lock:
            self.attempts += 1
            failing = self.attempts == 1
            if not failing:
                self.received.append(json.loads(body))
        request.send_response(503 if failing else 204)
        request.send_header("Content-Length", "0")
        request.end_headers()


def test_ask_mode_holds_the_connection_until_the_operator_answers(
        cli, tmp_path, public, accounts, dns, web, secure):
    policy = f"""version: 1
accounts:
  agent:
    match: {{unix_users: [{AGENT}]}}
    mode: ask
    ask_timeout: 40s
    allow:
      - cidr: 127.0.0.1/32
        ports: [{web.port}, {secure.port}]
"""
    receiver = Receiver()
    proxy = start(cli, tmp_path, public, dns, policy, "--notify",
                  f"http://127.0.0.1:{receiver.origin.port}/hook/secret-token")
    try:
        tls = spawn_as_user(AGENT, public, "curl", "-sS", "--max-time", "60", "-x", proxy.url,
                            "--cacert", str(public / "ca.pem"),
                            f"https://secure.test:{secure.port}/a")
        plain = spawn_as_user(AGENT, public, "curl", "-sS", "--max-time", "60", "-x", proxy.url,
                              f"http://web.test:{web.port}/b")
        refused = spawn_as_user(AGENT, public, "curl", "-sS", "--max-time", "60", "-x",
                                proxy.url, f"http://other.test:{web.port}/c")

        def waiting() -> dict[str, str]:
            listed = json.loads(as_user(OPERATOR, public, "pending", "--json", cli=cli).stdout)
            return {r["host"]: r["id"] for r in listed if r["held"]}

        assert wait_until(lambda: len(waiting()) == 3, timeout=30), waiting()
        held = waiting()
        assert all(p.poll() is None for p in (tls, plain, refused))  # still waiting
        for host in ("secure.test", "web.test"):
            done = as_user(OPERATOR, public, "approve", held[host], cli=cli)
            assert done.returncode == 0, done.stderr
        done = as_user(OPERATOR, public, "reject", held["other.test"], "--reason",
                       "not for this project", cli=cli)
        assert done.returncode == 0, done.stderr

        assert tls.communicate(timeout=30)[0] == f"hello from secure.test:{secure.port} GET /a\n"
        assert plain.communicate(timeout=30)[0] == f"hello from web.test:{web.port} GET /b\n"
        assert tls.returncode == plain.returncode == 0
        body = refused.communicate(timeout=30)[0]
        assert f"access request {held['other.test']} was rejected by {OPERATOR}: not for this " \
               "project" in body
        for host, stage in (("secure.test", "connect"), ("web.test", "request")):
            (event,) = proxy.wait_for_events(lambda e, h=host, s=stage: e["host"] == h
                                             and e["event"] == s and e["decision"] == "allow")
            assert event["approval"] == held[host] and event["uid"] == accounts[0].pw_uid

        # DNS is answered at once, and opens the request
        dig = as_user(AGENT, public, "dig", "+tries=1", "+time=5", "-p", str(proxy.dns_port),
                      "@127.0.0.1", "dns-only.test")
        assert "status: NXDOMAIN" in dig.stdout
        named = re.search(r"access request ([0-9a-f]{8}) is pending", dig.stdout)
        assert named, dig.stdout
        listed = json.loads(as_user(OPERATOR, public, "pending", "--json", cli=cli).stdout)
        assert [(r["id"], r["host"], r["port"]) for r in listed] == [
            (named.group(1), "dns-only.test", None)]

        assert wait_until(lambda: len(receiver.received) == 4, timeout=30), receiver.received
        notices = {n["host"]: n for n in receiver.received}
        assert notices["web.test"] == {
            "id": held["web.test"], "account": "agent", "host": "web.test", "port": web.port,
            "path": "/b", "reason": "", "approve": f"agent-egress approve {held['web.test']}"}
        assert receiver.attempts == 5  # the first failed and was sent again

        metrics = urllib.request.urlopen(proxy.metrics_url, timeout=10).read().decode()
        for state, count in (("approved", 2), ("rejected", 1), ("pending", 1), ("expired", 0)):
            assert f'agent_egress_access_requests{{account="agent",state="{state}"}} ' \
                   f'{count}.0' in metrics
    finally:
        proxy.stop()
        receiver.origin.stop()


def test_bad_input_gets_one_line_and_exit_2(cli, tmp_path, public, accounts, dns):
    policy = f"""version: 1
accounts:
  agent:
    match: {{unix_users: [{AGENT}]}}
"""
    proxy = start(cli, tmp_path, public, dns, policy, "--request-lifetime", "2s")
    control = ("--control", str(public / "control.sock"))
    try:
        def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run([cli, *args], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, **(env or {})})

        one_line_error(run("approve", "0badc0de", *control), 2, "no access request '0badc0de' "
                       "(unknown id")
        one_line_error(run("reject", "0badc0de", *control), 2, "unknown id")
        opened = as_user(AGENT, public, "request", "new.test", "--reason", "r", cli=cli)
        request_id = opened.stdout.split()[0]
        time.sleep(2.5)
        one_line_error(run("approve", request_id, *control), 2,
                       f"access request {request_id} is expired")
        one_line_error(run("reject", request_id, *control), 2, "is expired")
        for target in ("foo bar", "http://", "ftp://x.test/", "a/b", "x.test:99999"):
            one_line_error(run("request", target, *control), 2, "")
        one_line_error(run("why", "--since", "0", *control), 2, "--since")
        one_line_error(run("approve", request_id, "--for", "soon", *control), 2, "--for")
        one_line_error(run("request", "x.test", "--for", "0m", *control), 2, "--for")
        missing = str(tmp_path / "nothing" / "control.sock")
        for command in (("why",), ("request", "x.test"), ("pending",), ("approve", "0badc0de"),
                        ("reject", "0badc0de")):
            one_line_error(run(*command, "--control", missing), 2,
                           f"cannot reach the proxy's control socket {missing}")
            one_line_error(run(*command, env={"AGENT_EGRESS_CONTROL": missing}), 2,
                           f"control socket {missing}")
        assert as_user(AGENT, public, "why", cli=cli).returncode == 0  # still serving
    finally:
        proxy.stop()


@pytest.mark.parametrize("flags, message", [
    (("--control", "/proc/version/control.sock"), "--control /proc/version/control.sock: "),
    (("--operators", "no-such-group-here"), "--operators no-such-group-here: no such group"),
    (("--notify", "ftp://hooks.test/x"), "expected an http:// or https:// URL"),
    (("--request-lifetime", "0s"), "is no time at all"),
])
def test_run_refuses_a_control_flag_it_cannot_use(cli, tmp_path, flags, message):
    done = subprocess.run([cli, "run", "--proxy", "127.0.0.1:0", "--dns", "off", "--metrics",
                           "off", "--state-dir", str(tmp_path / "state"), "--audit-log",
                           str(tmp_path / "audit.jsonl"), *flags], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
