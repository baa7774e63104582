"""deploy/rsyslog and deploy/logrotate with the real tools: an rsyslogd running the shipped
configuration tails a running agent-egress's audit log and forwards it over TCP to a second
rsyslogd (the central server, imtcp on loopback); logrotate, with the shipped configuration under
Debian's defaults, rotates the log twice while traffic flows. Every audit event arrives exactly
once, intact, and none lands in the devbox's own syslog."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import DNSRecord
from support.proxy import Process, RunningProxy, wait_until

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).parents[2] / "deploy"
SHIPPED_LOG = "/var/log/agent-egress/audit.jsonl"
SIGNAL_COMMAND = "systemctl kill --kill-whom=main --signal=USR1 agent-egress.service"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert path, f"{name} is not installed; scripts/bootstrap --test installs it"
    return path


def replace_once(text: str, old: str, new: str) -> str:
    """Adapts a shipped file for the test; fails when the shipped file no longer says `old`."""
    assert text.count(old) == 1, f"expected {old!r} once in the shipped file"
    return text.replace(old, new)


class Rsyslogd(Process):
    """rsyslogd in the foreground with its own configuration, pid file and work directory."""

    def __init__(self, directory: Path, config: str) -> None:
        directory.mkdir()
        self.directory = directory
        (directory / "rsyslog.conf").write_text(config)
        check = subprocess.run([tool("rsyslogd"), "-N1", "-f", str(directory / "rsyslog.conf")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        super().__init__([tool("rsyslogd"), "-n", "-f", str(directory / "rsyslog.conf"),
                          "-i", str(directory / "rsyslogd.pid")])


def central_server(directory: Path) -> tuple[Rsyslogd, int, Path]:
    """The log server: imtcp on an ephemeral loopback port, each message's text on a line."""
    received = directory / "received.log"
    server = Rsyslogd(directory, f"""
global(workDirectory="{directory}" maxMessageSize="64k")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="{directory}/port")
template(name="text" type="string" string="%msg%\\n")
action(type="omfile" file="{received}" template="text")
""")
    port_file = directory / "port"
    assert wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 15), \
        server.log()
    return server, int(port_file.read_text()), received


def devbox_rsyslogd(directory: Path, audit_log: Path, port: int) -> Rsyslogd:
    """rsyslog as Debian sets it up (work directory, drop-ins, everything to syslog) with the
    shipped drop-in pointed at this test's audit log and log server."""
    conf = (DEPLOY / "rsyslog" / "agent-egress.conf").read_text()
    conf = replace_once(conf, f'file="{SHIPPED_LOG}"', f'file="{audit_log}"')
    conf = replace_once(conf, 'target="logs.example.test"', 'target="127.0.0.1"')
    conf = replace_once(conf, 'port="514"', f'port="{port}"')
    (directory / "rsyslog.d").mkdir(parents=True)
    (directory / "rsyslog.d" / "agent-egress.conf").write_text(conf)
    return Rsyslogd(directory / "daemon", f"""
$WorkDirectory {directory}
$IncludeConfig {directory}/rsyslog.d/*.conf
*.* {directory}/syslog
""")


def logrotate_config(directory: Path, audit_log: Path) -> Path:
    """Debian's /etc/logrotate.conf (whose `create` the shipped file must override) including
    the shipped file pointed at this test's audit log."""
    shipped = (DEPLOY / "logrotate" / "agent-egress").read_text()
    assert SIGNAL_COMMAND in shipped
    (directory / "logrotate.d").mkdir()
    (directory / "logrotate.d" / "agent-egress").write_text(
        replace_once(shipped, f"{SHIPPED_LOG} {{", f"{audit_log} {{"))
    main = directory / "logrotate.conf"
    main.write_text(f"weekly\nrotate 4\ncreate\ninclude {directory}/logrotate.d\n")
    return main


def fake_systemctl(directory: Path, proxy: RunningProxy) -> Path:
    """A `systemctl` that knows one service, the test's agent-egress, and logs its calls."""
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(f"""#!/bin/sh
echo "systemctl $*" >> {directory}/systemctl.calls
case "$*" in
  "--quiet is-active agent-egress.service") exit 0 ;;
  "kill --kill-whom=main --signal=USR1 agent-egress.service")
    exec kill -USR1 {proxy.process.pid} ;;
esac
exit 1
""")
    script.chmod(0o755)
    return bin_dir


def policy() -> str:
    return f"""version: 1
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: web.test
"""


@pytest.fixture
def agent_egress(cli, tmp_path, dns) -> Iterator[RunningProxy]:
    (tmp_path / "agent-egress").mkdir()
    running = RunningProxy(cli, tmp_path / "agent-egress", policy(),
                           "--upstream-dns", dns.address)
    yield running
    running.stop()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.stop()


def query(proxy: RunningProxy, name: str) -> None:
    reply = DNSRecord.parse(DNSRecord.question(name).send("127.0.0.1", proxy.dns_port,
                                                          timeout=5))
    assert reply.header.rcode == 3, reply  # NXDOMAIN: denied, one audit event


def audit_lines(audit_log: Path) -> list[str]:
    """Every line agent-egress wrote, in the current file and the rotated ones."""
    lines = []
    for path in sorted(audit_log.parent.glob(audit_log.name + "*")):
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        lines += data.decode().splitlines()
    return lines


def test_every_audit_event_is_shipped_once_across_rotations(agent_egress, tmp_path, processes,
                                                            web):
    server, port, received = central_server(tmp_path / "server")
    processes.append(server)
    devbox = tmp_path / "devbox"
    processes.append(devbox_rsyslogd(devbox, agent_egress.audit_log, port))
    rotate_config = logrotate_config(tmp_path, agent_egress.audit_log)
    env = {**os.environ, "PATH": f"{fake_systemctl(tmp_path, agent_egress)}:{os.environ['PATH']}"}

    def arrived() -> list[str]:
        return received.read_text().splitlines() if received.exists() else []

    query(agent_egress, "first.denied.test")
    assert wait_until(lambda: arrived(), 15), server.log()

    names = [f"q{i}.denied.test" for i in range(600)]
    stop = threading.Event()

    def traffic() -> None:
        for i, name in enumerate(names):
            if stop.is_set():
                return
            query(agent_egress, name)
            if i % 150 == 0:  # requests too, with a 20 KiB path
                url = f"http://denied.test:{web.port}/{i}" + "x" * 20000
                subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "10", "-x",
                                agent_egress.url, url], capture_output=True, timeout=20)
            time.sleep(0.004)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        for _ in range(2):  # while the traffic flows
            time.sleep(1)
            done = subprocess.run([tool("logrotate"), "--force", "--state",
                                   str(tmp_path / "logrotate.state"), str(rotate_config)],
                                  capture_output=True, text=True, timeout=30, env=env)
            assert done.returncode == 0, done.stdout + done.stderr
            assert sender.is_alive(), "the traffic ended before the rotation"
    except BaseException:
        stop.set()
        raise
    finally:
        sender.join(60)

    log = agent_egress.audit_log
    rotated = [log.with_name(log.name + ".1"), log.with_name(log.name + ".2.gz")]
    assert all(path.exists() and path.stat().st_size for path in rotated), \
        sorted(p.name for p in log.parent.iterdir())
    assert (tmp_path / "systemctl.calls").read_text().splitlines() == [
        "systemctl --quiet is-active agent-egress.service", SIGNAL_COMMAND] * 2

    def dns_events(lines: list[str]) -> Counter[str]:
        return Counter(e["host"] for e in map(json.loads, lines) if e["event"] == "dns")

    everything = Counter(["first.denied.test", *names])
    assert wait_until(lambda: dns_events(audit_lines(log)) == everything, 15)
    assert wait_until(lambda: len(arrived()) >= len(audit_lines(log)), 30), \
        (len(arrived()), len(audit_lines(log)), server.log())
    time.sleep(2)  # anything read twice would come now
    written = audit_lines(log)
    shipped = arrived()
    assert Counter(shipped) == Counter(written)
    assert dns_events(shipped) == everything
    assert {e["event"] for e in map(json.loads, shipped)} >= {"dns", "request"}
    assert max(map(len, shipped)) > 20000  # a long line arrives whole, as one message
    syslog = devbox / "syslog"
    assert not syslog.exists() or "agent-egress" not in syslog.read_text()
