"""filetrust: whether a governed account could have written the policy, on the file as read and
every directory and link on the way; and the running proxy refusing such a policy at reload."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.proxy import RunningProxy, wait_until

from agent_egress.filetrust import read_checked, untrusted_reason


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory under /tmp that every user may enter (pytest's tmp_path is root's alone),
    owned by root."""
    path = Path(tempfile.mkdtemp(prefix="filetrust-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def agent(two_users: list[str]) -> pwd.struct_passwd:
    return pwd.getpwnam(two_users[0])


def governed(agent: pwd.struct_passwd) -> dict[int, str]:
    return {agent.pw_uid: "codex"}


def policy_at(directory: Path, text: str = "version: 1\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "policy.yaml"
    path.write_text(text)
    return path


# The check on its own

def test_a_root_owned_chain_is_trusted_and_read(base, agent):
    path = policy_at(base / "etc")
    assert untrusted_reason(path, governed(agent)) is None
    data, chain = read_checked(path)
    assert data == b"version: 1\n"
    assert [step.path for step in chain.steps][-3:] == [str(base), str(base / "etc"), str(path)]


def test_a_file_the_account_owns(base, agent):
    path = policy_at(base / "etc")
    os.chown(path, agent.pw_uid, agent.pw_gid)
    assert untrusted_reason(path, governed(agent)) == (
        f"{path} belongs to uid {agent.pw_uid}, which account codex governs: that account "
        "could rewrite it")
    assert untrusted_reason(path, {}) is None  # nobody governed: nothing to fear


def test_a_file_everyone_may_write(base, agent):
    path = policy_at(base / "etc")
    path.chmod(0o666)
    assert untrusted_reason(path, governed(agent)) == (
        f"{path} is writable by every user, governed accounts included")


def test_a_file_writable_by_a_group_of_the_account(base, agent):
    path = policy_at(base / "etc")
    os.chown(path, 0, agent.pw_gid)
    path.chmod(0o664)
    assert f"{path} is writable by group" in (untrusted_reason(path, governed(agent)) or "")
    path.chmod(0o644)
    assert untrusted_reason(path, governed(agent)) is None


@pytest.mark.skipif(not shutil.which("setfacl"), reason="needs setfacl (the acl package)")
def test_a_file_an_acl_lets_the_account_write(base, agent):
    path = policy_at(base / "etc")
    subprocess.run(["setfacl", "-m", f"u:{agent.pw_uid}:rw", str(path)], check=True)
    assert "through its access ACL" in (untrusted_reason(path, governed(agent)) or "")


def test_a_directory_above_that_the_account_owns(base, agent):
    path = policy_at(base / "owned" / "etc")
    os.chown(base / "owned", agent.pw_uid, agent.pw_gid)
    assert untrusted_reason(path, governed(agent)) == (
        f"{base / 'owned'} belongs to uid {agent.pw_uid}, which account codex governs: "
        "that account could rewrite it")


def test_a_sticky_directory_everyone_may_write_is_fine_for_entries_it_does_not_own(base, agent):
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    path = policy_at(shared / "etc")
    assert untrusted_reason(path, governed(agent)) is None
    shared.chmod(0o777)  # without the sticky bit anyone may rename etc away
    assert untrusted_reason(path, governed(agent)) == (
        f"{shared} is writable by every user, governed accounts included")


def test_links_are_followed_by_hand_and_their_owners_count(base, agent):
    real = policy_at(base / "real")
    (base / "etc").mkdir()
    link = base / "etc" / "policy.yaml"
    link.symlink_to("../real/./policy.yaml")
    data, chain = read_checked(link)
    assert data == b"version: 1\n"
    assert chain.steps[-1].path == str(real)
    assert untrusted_reason(link, governed(agent)) is None
    os.chown(link, agent.pw_uid, agent.pw_gid, follow_symlinks=False)
    assert untrusted_reason(link, governed(agent)) == (
        f"{link} (a symbolic link) belongs to uid {agent.pw_uid}, which account codex "
        "governs: that account could rewrite it")


def test_a_link_into_a_directory_the_account_owns(base, agent):
    evil = policy_at(base / "evil")
    os.chown(base / "evil", agent.pw_uid, agent.pw_gid)
    link = base / "policy.yaml"
    link.symlink_to(evil)
    assert untrusted_reason(link, governed(agent)) == (
        f"{base / 'evil'} belongs to uid {agent.pw_uid}, which account codex governs: "
        "that account could rewrite it")


def test_a_link_loop_and_a_fifo_are_errors(base):
    (base / "a").symlink_to("b")
    (base / "b").symlink_to("a")
    with pytest.raises(OSError):
        read_checked(base / "a")
    os.mkfifo(base / "fifo")
    with pytest.raises(OSError):
        read_checked(base / "fifo")  # neither blocks nor reads


# The running proxy at reload

def learning_policy(uids: list[int]) -> str:
    """What the account would write: learning mode, so that everything passes."""
    return (f"version: 1\naccounts:\n  tester:\n    match: {{uids: {uids}}}\n    mode: learn\n"
            "    allow: []\n")


def as_account(agent: pwd.struct_passwd, script: str) -> None:
    subprocess.run(["setpriv", f"--reuid={agent.pw_uid}", f"--regid={agent.pw_gid}",
                    "--clear-groups", "sh", "-ec", script], check=True, timeout=30)


def reload_errors(proxy: RunningProxy) -> float:
    with urllib.request.urlopen(proxy.metrics_url, timeout=10) as response:
        metrics = response.read().decode()
    return next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith('agent_egress_policy_reloads_total{result="error"}'))


def fetch(proxy: RunningProxy, url: str) -> str:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "-x", proxy.url, url],
                          capture_output=True, text=True, timeout=30).stdout


def swap_in_a_link(path: Path, base: Path, agent: pwd.struct_passwd, uids: list[int]) -> str:
    """A link to a file in a directory the account owns replaces the policy (as a deploy tool
    following a link would leave it)."""
    evil = base / "evil"
    evil.mkdir()
    os.chown(evil, agent.pw_uid, agent.pw_gid)
    as_account(agent, f"cat > {evil}/policy.yaml <<'EOF'\n{learning_policy(uids)}EOF")
    temporary = path.with_suffix(".link")
    temporary.symlink_to(evil / "policy.yaml")
    os.replace(temporary, path)
    return f"{evil} belongs to uid {agent.pw_uid}, which account tester governs"


def world_writable(path: Path, base: Path, agent: pwd.struct_passwd, uids: list[int]) -> str:
    temporary = path.with_suffix(".new")
    temporary.write_text(learning_policy(uids))
    temporary.chmod(0o666)
    os.replace(temporary, path)
    return f"{path} is writable by every user, governed accounts included"


def directory_replaced(path: Path, base: Path, agent: pwd.struct_passwd, uids: list[int]) -> str:
    """The directory above the policy's directory comes to belong to the account, which moves
    the policy's directory away and makes its own."""
    above = path.parent.parent
    os.chown(above, agent.pw_uid, agent.pw_gid)
    conf = path.parent
    as_account(agent, f"mv {conf} {conf}.old && mkdir {conf} && "
                      f"cat > {path} <<'EOF'\n{learning_policy(uids)}EOF")
    return f"{above} belongs to uid {agent.pw_uid}, which account tester governs"


@pytest.mark.e2e
@pytest.mark.parametrize("tamper", [swap_in_a_link, world_writable, directory_replaced])
def test_a_reload_refuses_a_policy_the_account_could_have_written(cli, tmp_path, dns, web, base,
                                                                  agent, tamper):
    uids = [os.getuid(), agent.pw_uid]  # the proxy's own uid is never held against a file
    path = policy_at(base / "above" / "conf", (
        f"version: 1\naccounts:\n  tester:\n    match: {{uids: {uids}}}\n    allow:\n"
        f"      - host: web.test\n        ports: [{web.port}]\n"
        f"      - cidr: 127.0.0.1/32\n        ports: [{web.port}]\n"))
    proxy = RunningProxy(cli, tmp_path, None, "--upstream-dns", dns.address,
                         "--policy", str(path))
    allowed, denied = f"http://web.test:{web.port}/", f"http://other.test:{web.port}/"
    try:
        assert fetch(proxy, allowed).startswith("hello")
        assert "no rule matched" in fetch(proxy, denied)
        reason = tamper(path, base, agent, uids)
        proxy.signal(signal.SIGHUP)  # the watcher sees the change too
        refused = re.compile(r"policy reload refused, keeping policy \w+ in force: "
                             + re.escape(reason))
        assert wait_until(lambda: refused.search(proxy.log()))
        assert "policy reloaded" not in proxy.log()
        assert reload_errors(proxy) >= 1
        assert "no rule matched" in fetch(proxy, denied)  # learning mode is not in force
        assert fetch(proxy, allowed).startswith("hello")
    finally:
        proxy.stop()


@pytest.mark.e2e
def test_start_up_refuses_a_directory_above_the_policy_that_the_account_owns(cli, tmp_path,
                                                                             base, agent):
    path = policy_at(base / "above" / "conf", learning_policy([agent.pw_uid]))
    os.chown(base / "above", agent.pw_uid, agent.pw_gid)
    done = subprocess.run([cli, "run", "--policy", str(path), "--proxy", "127.0.0.1:0",
                           "--dns", "off", "--metrics", "off", "--state-dir",
                           str(tmp_path / "state")], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr.strip()) == (
        2, f"agent-egress: {base / 'above'} belongs to uid {agent.pw_uid}, which account "
           "tester governs: that account could rewrite it")
