"""deploy/systemd: the units pass `systemd-analyze verify`; their `systemd-analyze security`
exposure, and every setting it still counts, are what deploy/README.md says and explains; and
the sandbox fits the programs: the proxy (under load, with workers, reloads and log reopening)
and nft make only system calls, and open only socket families, that their unit allows, and the
proxy names other users' processes with exactly the capabilities its unit grants."""

from __future__ import annotations

import functools
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from dnslib import DNSRecord
from support.proxy import RunningProxy

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).parents[2] / "deploy"
UNITS = DEPLOY / "systemd"
PROXY_UNIT = UNITS / "agent-egress.service"
NFT_UNIT = UNITS / "agent-egress-nftables.service"


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is not installed; scripts/bootstrap --test installs it"
    return path


def settings(unit: Path) -> list[tuple[str, str]]:
    """The unit's `Key=Value` lines in order, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", unit.read_text())
    return [tuple(line.split("=", 1)) for line in text.splitlines()  # type: ignore[misc]
            if "=" in line and not line.startswith(("#", ";"))]


def values(unit: Path, key: str) -> list[str]:
    return [value for name, value in settings(unit) if name == key]


@pytest.fixture
def units(cli, tmp_path) -> list[Path]:
    """The units, their ExecStart pointed at this checkout's command (verify checks that the
    program exists)."""
    copies = []
    for unit in sorted(UNITS.glob("*.service")):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/usr/local/bin/agent-egress", cli))
        copies.append(copy)
    assert [u.name for u in copies] == ["agent-egress-nftables.service", "agent-egress.service"]
    return copies


def test_units_verify(units):
    done = subprocess.run([systemd_analyze(), "verify", *map(str, units)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # warnings too


def test_a_broken_unit_does_not_verify(units):
    broken = units[1].read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe")
    units[1].write_text(broken)
    done = subprocess.run([systemd_analyze(), "verify", str(units[1])], capture_output=True,
                          text=True, timeout=60)
    assert "Failed to parse boolean value, ignoring: maybe" in done.stderr


def exposure(unit: Path) -> tuple[str, list[str]]:
    """`systemd-analyze security`'s overall score and the settings it counts as open."""
    done = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager",
                           str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert score, done.stdout
    open_settings = [line.split()[1] for line in done.stdout.splitlines()
                     if line.startswith("✗")]
    return score.group(1), open_settings


def test_exposure_is_written_down_and_explained(units):
    readme = (DEPLOY / "README.md").read_text()
    for unit in units:
        score, open_settings = exposure(unit)
        assert f"| `{unit.name}` | {score} |" in readme, (unit.name, score)
        section = readme.split(f"### {unit.name}", 1)[1].split("\n### ", 1)[0]
        unexplained = [s for s in open_settings if f"`{s}`" not in section]
        assert unexplained == [], f"{unit.name}: explain these in deploy/README.md"


CAPABILITIES = "CAP_DAC_READ_SEARCH CAP_SYS_PTRACE CAP_NET_ADMIN"


def test_the_proxy_unit_is_hardened():
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"), ("PrivateDevices", "yes"),
                       ("User", "agent-egress"), ("Restart", "on-failure"),
                       ("MemoryDenyWriteExecute", "yes"), ("SystemCallArchitectures", "native"),
                       ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX AF_NETLINK"),
                       ("CapabilityBoundingSet", CAPABILITIES),
                       ("AmbientCapabilities", CAPABILITIES)]:
        assert values(PROXY_UNIT, key) == [value], key
    assert values(PROXY_UNIT, "SystemCallFilter")[0] == "@system-service"
    assert "ProtectProc" not in dict(settings(PROXY_UNIT))  # it would hide the agents


# The sandbox against what the programs really do


@functools.cache
def syscall_set(name: str) -> frozenset[str]:
    """The system calls of a systemd set, nested sets expanded."""
    listing = subprocess.run([systemd_analyze(), "syscall-filter", name], capture_output=True,
                             text=True, check=True, timeout=30).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            calls |= syscall_set(entry) if entry.startswith("@") else {entry}
    return frozenset(calls)


def allowed_syscalls(unit: Path) -> set[str]:
    """SystemCallFilter= as systemd reads it: the first line an allow list, then `~` lines
    taking sets away."""
    lines = values(unit, "SystemCallFilter")
    assert lines and not lines[0].startswith("~"), "an allow list first"
    allowed: set[str] = set()
    for line in lines:
        deny = line.startswith("~")
        names = set().union(*(syscall_set(n) if n.startswith("@") else {n}
                              for n in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def traced(trace: Path) -> tuple[set[str], set[str]]:
    """System calls (from strace's summary) and socket families a trace shows."""
    text = trace.read_text()
    calls = {line.split()[-1] for line in text.splitlines()
             if re.match(r"\s*\d+\.\d+\s+\d", line) and line.split()[-1] != "total"}
    families = set(re.findall(r"\bsocket(?:pair)?\((AF_\w+)", text))
    return calls, families


def test_the_syscall_filter_is_read_as_systemd_reads_it():
    assert "ptrace" not in allowed_syscalls(PROXY_UNIT)
    assert "setrlimit" not in allowed_syscalls(PROXY_UNIT)
    assert {"read", "connect", "sendmsg", "clone3"} <= allowed_syscalls(PROXY_UNIT)


def test_the_proxy_stays_inside_its_units_sandbox(cli, tmp_path, dns, web, secure, test_ca):
    strace = shutil.which("strace")
    assert strace, "strace is not installed; scripts/bootstrap --test installs it"
    trace = tmp_path / "trace"
    (tmp_path / "agent-egress").mkdir()
    proxy = RunningProxy(cli, tmp_path / "agent-egress", f"""version: 1
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: web.test
        ports: [{web.port}]
      - host: secure.test
        ports: [{secure.port}]
      - cidr: 127.0.0.1/32
        ports: [{web.port}, {secure.port}]
""", "--upstream-dns", dns.address, "--workers", "2",
                         prefix=(strace, "-f", "-qq", "-C", "-o", str(trace)))
    try:
        for _ in range(3):
            for url in (f"http://web.test:{web.port}/", f"http://other.test:{web.port}/",
                        f"https://secure.test:{secure.port}/"):
                subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "10",
                                "--cacert", str(test_ca.ca_file), "-x", proxy.url, url],
                               capture_output=True, timeout=20)
            for name in ("web.test", "other.test"):
                DNSRecord.question(name).send("127.0.0.1", proxy.dns_port, timeout=5)
        urllib.request.urlopen(proxy.metrics_url, timeout=10).read()
        (traced_pid,) = map(int, Path(f"/proc/{proxy.process.pid}/task/{proxy.process.pid}"
                                      "/children").read_text().split())
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            os.kill(traced_pid, sig)
        time.sleep(1)  # the reload and the reopen happen while traced
        os.kill(traced_pid, signal.SIGTERM)
        assert proxy.process.wait(30) == 0, proxy.log()
    finally:
        proxy.stop()
    events = proxy.events()
    assert {(e["host"], e["decision"]) for e in events if e["event"] != "dns"} >= {
        ("web.test", "allow"), ("other.test", "deny"), ("secure.test", "allow")}
    calls, families = traced(trace)
    assert len(calls) > 30 and {"accept4", "sendmsg", "clone3"} & calls, calls
    assert calls - allowed_syscalls(PROXY_UNIT) == set()
    assert families <= set(values(PROXY_UNIT, "RestrictAddressFamilies")[0].split())
    assert "AF_NETLINK" in families  # sock_diag: which uid is the client


def test_nft_stays_inside_its_units_sandbox(tmp_path):
    strace, unshare, nft = (shutil.which(n) for n in ("strace", "unshare", "nft"))
    assert strace and unshare and nft, "scripts/bootstrap --test installs strace and nftables"
    ruleset = DEPLOY / "nftables" / "agent-egress.nft"
    trace = tmp_path / "trace"
    # ExecStart then ExecStop, in a network namespace of its own: the host's stays untouched
    script = f"{nft} -f {ruleset} && {nft} list tables && {nft} delete table inet agent_egress"
    done = subprocess.run([unshare, "--net", strace, "-f", "-qq", "-C", "-o", str(trace),
                           "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "table inet agent_egress" in done.stdout
    calls, families = traced(trace)
    assert {"sendmsg", "recvmsg"} <= calls
    assert calls - allowed_syscalls(NFT_UNIT) == set()
    assert families - {"AF_UNIX"} <= set(values(NFT_UNIT, "RestrictAddressFamilies")[0].split())
    assert values(NFT_UNIT, "CapabilityBoundingSet") == ["CAP_NET_ADMIN"]


# Capabilities: what naming another user's process takes


def caps(names: list[str]) -> str:
    """setpriv's spelling: all dropped, then these added."""
    return ",".join(["-all", *(f"+{n.removeprefix('CAP_').lower()}" for n in names)])


@pytest.mark.parametrize("granted", ["unit", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "none"])
def test_the_units_capabilities_name_other_users_processes(cli, tmp_path, dns, web, two_users,
                                                           granted):
    """The proxy runs with only the capabilities given (as root without root's privileges:
    uid 0 gains none at exec, so it is any other user to the client's /proc), a client as
    another user; only the unit's full set names the client's process."""
    client = pwd.getpwnam(two_users[1])
    unit_caps = values(PROXY_UNIT, "AmbientCapabilities")[0].split()
    assert values(PROXY_UNIT, "CapabilityBoundingSet")[0].split() == unit_caps
    given = caps({"unit": unit_caps, "none": []}.get(granted, [granted]))
    setpriv, curl = shutil.which("setpriv"), shutil.which("curl")
    assert setpriv and curl
    prefix = (setpriv, "--securebits=+noroot,+noroot_locked,+no_setuid_fixup",
              f"--inh-caps={given}", f"--ambient-caps={given}", f"--bounding-set={given}",
              "--no-new-privs")
    (tmp_path / "agent-egress").mkdir()
    proxy = RunningProxy(cli, tmp_path / "agent-egress", f"""version: 1
accounts:
  agent:
    match: {{uids: [{client.pw_uid}]}}
    allow:
      - host: web.test
        ports: [{web.port}]
      - cidr: 127.0.0.1/32
        ports: [{web.port}]
""", "--upstream-dns", dns.address, prefix=prefix)
    try:
        status = Path(f"/proc/{proxy.process.pid}/status").read_text()
        effective = int(re.search(r"CapEff:\s+(\w+)", status).group(1), 16)  # type: ignore[union-attr]
        assert bin(effective).count("1") == len(given.split(",")) - 1, status
        done = subprocess.run([setpriv, f"--reuid={client.pw_uid}", f"--regid={client.pw_gid}",
                               "--clear-groups", curl, "-sS", "--max-time", "10", "-x",
                               proxy.url, f"http://web.test:{web.port}/"],
                              capture_output=True, text=True, timeout=20)
        assert done.stdout.startswith("hello"), done.stdout + done.stderr + proxy.log()
        (event,) = proxy.wait_for_events(lambda e: e["event"] == "request")
    finally:
        proxy.stop()
    assert (event["account"], event["uid"]) == ("agent", client.pw_uid)
    if granted == "unit":
        assert event["exe"] == os.path.realpath(curl) and event["pid"], event
        assert "web.test" in event["cmdline"]
    else:
        assert (event["pid"], event["exe"]) == (None, None), event
