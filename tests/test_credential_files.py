"""A secret file that a real governed user can read without owning it, through a group it is in
(its own or a supplementary one) or an access ACL: `validate` and start-up refuse it, and a
running proxy's reload refuses it, keeping the secret it holds (needs root: the users, groups
and ACLs are real, and the test shows the user can indeed read the file)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from support.origins import Origin
from support.proxy import RunningProxy, wait_until

OLD, NEW = "file-secret-old-5c1e9a", "file-secret-new-7b3d2f"
GROUP = "egress-test-secrets"


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned directory every user may enter, so that a user the file's mode or ACL lets
    read it really can (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="credfiles-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def agent(two_users: list[str]) -> pwd.struct_passwd:
    return pwd.getpwnam(two_users[0])


@pytest.fixture(scope="module")
def secret_group(two_users: list[str]) -> grp.struct_group:
    """A group the agent's user is in besides its own."""
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
    subprocess.run(["usermod", "-a", "-G", GROUP, two_users[0]], check=True)
    return grp.getgrnam(GROUP)


def primary_group(path: Path, agent: pwd.struct_passwd, group: grp.struct_group) -> str:
    os.chown(path, 0, agent.pw_gid)
    path.chmod(0o640)
    return (f"{path} is readable by group {grp.getgrgid(agent.pw_gid).gr_name}, which uid "
            f"{agent.pw_uid} of account tester is in: that account could read it")


def supplementary_group(path: Path, agent: pwd.struct_passwd, group: grp.struct_group) -> str:
    os.chown(path, 0, group.gr_gid)
    path.chmod(0o640)
    return (f"{path} is readable by group {group.gr_name}, which uid {agent.pw_uid} of account "
            "tester is in: that account could read it")


def user_acl(path: Path, agent: pwd.struct_passwd, group: grp.struct_group) -> str:
    subprocess.run(["setfacl", "-m", f"u:{agent.pw_uid}:r", str(path)], check=True)
    return f"{path} is readable by uid {agent.pw_uid} of account tester through its access ACL"


def group_acl(path: Path, agent: pwd.struct_passwd, group: grp.struct_group) -> str:
    subprocess.run(["setfacl", "-m", f"g:{group.gr_gid}:r", str(path)], check=True)
    return f"{path} is readable by uid {agent.pw_uid} of account tester through its access ACL"


WAYS = [primary_group, supplementary_group, user_acl, group_acl]
Opening = Callable[[Path, pwd.struct_passwd, grp.struct_group], str]


def secret_at(base: Path, value: str) -> Path:
    path = base / "credentials" / "api"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.parent.chmod(0o755)  # the directory hides nothing: the file's own access decides
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def policy_text(secret: Path, agent: pwd.struct_passwd, port: int) -> str:
    return f"""version: 1
credentials:
  api-token:
    file: {secret}
accounts:
  tester:
    match: {{uids: [{os.getuid()}, {agent.pw_uid}]}}
    allow:
      - host: secure.test
        ports: [{port}]
        credential: api-token
      - cidr: 127.0.0.1/32
        ports: [{port}]
"""


def readable_by(agent: pwd.struct_passwd, path: Path) -> str:
    """The file's content as the agent's user reads it (with its real groups)."""
    return subprocess.run(["setpriv", f"--reuid={agent.pw_uid}", f"--regid={agent.pw_gid}",
                           "--init-groups", "cat", str(path)], capture_output=True, text=True,
                          timeout=30).stdout


@pytest.mark.e2e
@pytest.mark.skipif(not shutil.which("setfacl"), reason="needs setfacl (the acl package)")
@pytest.mark.parametrize("opening", WAYS, ids=lambda f: f.__name__)
def test_validate_and_start_up_refuse_a_secret_a_governed_user_can_read(
        cli, base, agent, secret_group, tmp_path, opening: Opening):
    secret = secret_at(base, OLD)
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(secret, agent, 8443))
    done = subprocess.run([cli, "validate", str(policy)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert readable_by(agent, secret) == ""

    reason = opening(secret, agent, secret_group)
    assert readable_by(agent, secret) == OLD + "\n"  # the check is about a real reader
    done = subprocess.run([cli, "validate", str(policy)], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (
        2, f"{policy}:4:11: credential api-token: refused: {reason}\n")
    started = subprocess.run([cli, "run", "--policy", str(policy), "--proxy", "127.0.0.1:0",
                              "--dns", "off", "--metrics", "off", "--state-dir",
                              str(tmp_path / "state")], capture_output=True, text=True,
                             timeout=60)
    assert started.returncode == 2
    assert f"credential api-token: refused: {reason}" in started.stderr
    for output in (done.stdout, done.stderr, started.stdout, started.stderr):
        assert OLD not in output


@pytest.mark.e2e
@pytest.mark.skipif(not shutil.which("setfacl"), reason="needs setfacl (the acl package)")
@pytest.mark.parametrize("opening", [supplementary_group, user_acl],
                         ids=lambda f: f.__name__)
def test_a_reload_refuses_a_secret_a_governed_user_can_read_and_keeps_the_old(
        cli, base, agent, secret_group, tmp_path, dns, opening: Opening):
    seen: list[str | None] = []

    def record(request: BaseHTTPRequestHandler) -> None:
        seen.append(request.headers.get("Authorization"))
        _ok(request)

    origin = Origin(record)
    secret = secret_at(base, OLD)
    proxy = RunningProxy(cli, tmp_path, policy_text(secret, agent, origin.port),
                         "--upstream-dns", dns.address)
    url = f"http://secure.test:{origin.port}/v1/items"
    try:
        assert fetch(proxy, url) == "ok\n"
        assert seen[-1] == f"Bearer {OLD}"
        reason = opening(secret, agent, secret_group)
        # the mode or ACL change alone (ctime) is seen by the watcher: refused, logged
        refused = f"policy reload refused, keeping policy {proxy_digest(proxy)} in force:"
        assert wait_until(lambda: refused in proxy.log() and reason in proxy.log())
        secret.write_text(NEW + "\n")  # a rotation into the readable file: refused too
        proxy.signal(signal.SIGHUP)
        assert wait_until(lambda: proxy.log().count(refused) >= 2)
        assert "policy reloaded" not in proxy.log()
        assert fetch(proxy, url) == "ok\n"
        assert seen[-1] == f"Bearer {OLD}"  # the secret read before stays in force
    finally:
        proxy.stop()
        origin.stop()
    assert OLD not in proxy.log() and NEW not in proxy.log()


def proxy_digest(proxy: RunningProxy) -> str:
    return proxy.wait_for(r"policy \S+ \((\w+)").group(1)


def fetch(proxy: RunningProxy, url: str) -> str:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "-x", proxy.url, url],
                          capture_output=True, text=True, timeout=30).stdout


def _ok(request: BaseHTTPRequestHandler) -> None:
    request.send_response(200)
    request.send_header("Content-Length", "3")
    request.end_headers()
    request.wfile.write(b"ok\n")
