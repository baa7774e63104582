"""Transparent mode on a devbox, in a network namespace of the test's own: nftables applied,
an unprivileged agent account, and the test's servers on documentation addresses that exist
only inside the namespace. The agent's traffic goes through agent-egress whether it asks to or
not, and every way around it fails."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import netns
from support.netns_servers import FOREIGN, NAMESERVER, ORIGIN, SSH
from support.proxy import Process, RunningProxy

ROOT = Path(__file__).parents[1]
AGENT = "egress-test-agent"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
PROBE_PYTHON = "/usr/bin/python3"  # the agent account cannot read the project's interpreter

pytestmark = pytest.mark.skipif(os.getuid() != 0 or not shutil.which("nft"),
                                reason="network namespaces and nftables need root")


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    with netns.namespace(f"ae-test-{os.getpid()}") as name:
        yield name


@pytest.fixture(scope="module")
def agent() -> pwd.struct_passwd:
    return netns.system_user(AGENT)


@pytest.fixture(scope="module")
def far_side(namespace) -> Iterator[Path]:
    """The servers; yields their CA certificate, where the agent account can read it."""
    directory = Path(tempfile.mkdtemp(prefix="agent-egress-far-side-"))
    directory.chmod(0o755)
    servers = Process(["ip", "netns", "exec", namespace, PYTHON,
                       str(ROOT / "tests" / "support" / "netns_servers.py"), str(directory)])
    try:
        servers.wait_for("ready")
        (directory / "test-ca.pem").chmod(0o644)
        yield directory / "test-ca.pem"
    finally:
        servers.stop()
        shutil.rmtree(directory)


@pytest.fixture(scope="module")
def proxy(cli, namespace, agent, far_side, tmp_path_factory) -> Iterator[RunningProxy]:
    directory = tmp_path_factory.mktemp("transparent")
    policy = f"""version: 1
accounts:
  agent:
    match: {{uids: [{agent.pw_uid}]}}
    allow:
      - host: web.test
      - host: secure.test
        ports: [443]
      - host: ssh.test
        ports: [22]
      - host: mirror.test
        ports: [443]
      - host: lure.test
        ports: [22]
    deny:
      - host: denied.test
"""
    running = RunningProxy(
        cli, directory, policy, "--upstream-dns", NAMESERVER, "--upstream-ca", str(far_side),
        prefix=("ip", "netns", "exec", namespace),
        listen=("--proxy", "127.0.0.1:8080", "--transparent", "127.0.0.1:8081", "--dns",
                "127.0.0.1:5353", "--metrics", "127.0.0.1:9464"))
    try:
        running.wait_for("transparent proxy listening on 127.0.0.1:8081")
        rules = sh(cli, "nftables", "--policy", str(running.policy_file)).stdout
        subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=rules,
                       text=True, check=True, capture_output=True)
        yield running
    finally:
        running.stop()


def as_agent(namespace: str, agent: pwd.struct_passwd, *command: str,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, "setpriv", f"--reuid={agent.pw_uid}",
         f"--regid={agent.pw_gid}", "--clear-groups", "--", *command],
        capture_output=True, text=True, timeout=timeout)


def curl(namespace, agent, *args):
    return as_agent(namespace, agent, "curl", "-sS", "--max-time", "10", *args)


def test_allowed_http_and_https_pass_through_the_transparent_listener(namespace, agent, proxy,
                                                                      far_side):
    plain = curl(namespace, agent, "http://web.test/page")
    assert plain.stdout == "hello from web.test GET /page\n", plain.stderr
    secure = curl(namespace, agent, "--cacert", str(far_side), "https://secure.test/s")
    assert secure.stdout == "hello from secure.test GET /s\n", secure.stderr
    assert proxy.wait_for_events(lambda e: e["host"] == "secure.test" and e["event"] ==
                                 "connect")  # written when the connection closes
    events = [e for e in proxy.events() if e["host"] in ("web.test", "secure.test")
              and e["event"] != "dns"]
    assert {(e["host"], e["event"], e["account"], e["decision"], e["ip"]) for e in events} == {
        ("web.test", "request", "agent", "allow", ORIGIN),
        ("secure.test", "connect", "agent", "allow", ORIGIN)}


def test_a_denied_host_is_blocked(namespace, agent, proxy):
    unresolved = curl(namespace, agent, "http://denied.test/")
    assert "Could not resolve host: denied.test" in unresolved.stderr
    addressed = curl(namespace, agent, "--resolve", f"denied.test:80:{ORIGIN}",
                     "http://denied.test/")
    assert "reason:      denied by rule: host denied.test" in addressed.stdout


def test_connecting_to_an_address_directly_fails(namespace, agent, proxy, far_side):
    plain = curl(namespace, agent, f"http://{ORIGIN}/")
    assert f"no rule matched for {ORIGIN}:80" in plain.stdout
    secure = curl(namespace, agent, "-k", f"https://{ORIGIN}/")  # no SNI
    assert secure.returncode != 0 and "hello" not in secure.stdout


def test_an_allowed_sni_sent_to_a_foreign_address_fails(namespace, agent, proxy, far_side):
    done = curl(namespace, agent, "--cacert", str(far_side), "--resolve",
                f"secure.test:443:{FOREIGN}", "https://secure.test/")
    assert done.returncode != 0
    (event,) = proxy.wait_for_events(lambda e: "does not resolve to" in (e["reason"] or ""))
    assert event["reason"] == (f"secure.test does not resolve to {FOREIGN}, where the "
                               "connection goes (spoofed name?)")


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_asking_another_dns_server_reaches_agent_egress_instead(namespace, agent, proxy,
                                                                transport):
    denied = as_agent(namespace, agent, "dig", "+time=3", "+tries=1", transport,
                      f"@{NAMESERVER}", "other.test")
    assert "status: NXDOMAIN" in denied.stdout
    assert "EDE: 15 (Blocked): (agent-egress: account agent: no rule matched for other.test)" \
        in denied.stdout
    allowed = as_agent(namespace, agent, "dig", "+short", "+time=3", "+tries=1", transport,
                       f"@{FOREIGN}", "web.test")
    assert allowed.stdout.split() == [ORIGIN]


def test_udp_quic_and_ipv6_fail(namespace, agent, proxy):
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
             "try:\n"
             f"    s.sendto(b'quic', ('{ORIGIN}', 443))\n"
             "    print(s.recv(100))\n"
             "except OSError as e:\n    print('refused', e)\n")
    udp = as_agent(namespace, agent, PROBE_PYTHON, "-c", probe)
    assert udp.stdout.startswith("refused"), udp.stdout + udp.stderr
    root = subprocess.run(["ip", "netns", "exec", namespace, PYTHON, "-c", probe],
                          capture_output=True, text=True, timeout=30)
    assert root.stdout.strip() == "b'echo: quic'"  # the server is there; only the agent is cut
    ipv6 = curl(namespace, agent, "-g", "http://[2001:db8::10]/")
    assert ipv6.returncode != 0 and "hello" not in ipv6.stdout


def ssh_probe(address: str) -> str:
    return ("import socket\n"
            f"s = socket.create_connection(('{address}', 22), timeout=5)\n"
            "s.sendall(b'SSH-2.0-probe\\r\\n')\n"
            "try:\n    print(s.recv(100))\nexcept OSError as e:\n    print('refused', e)\n")


def test_raw_tcp_reaches_only_addresses_resolved_for_an_allowed_name(namespace, agent, proxy):
    resolved = as_agent(namespace, agent, "dig", "+short", "ssh.test")
    assert resolved.stdout.split() == [SSH]
    allowed = as_agent(namespace, agent, PROBE_PYTHON, "-c", ssh_probe(SSH))
    assert allowed.stdout.strip() == "b'echo: SSH-2.0-probe\\r\\n'", allowed.stderr
    (event,) = proxy.wait_for_events(lambda e: e["host"] == "ssh.test" and e["event"] ==
                                     "connect")
    assert (event["ip"], event["port"], event["decision"]) == (SSH, 22, "allow")
    foreign = as_agent(namespace, agent, PROBE_PYTHON, "-c", ssh_probe(FOREIGN))
    assert "echo" not in foreign.stdout


def test_raw_tcp_to_an_address_that_two_allowed_names_share(namespace, agent, proxy):
    """Issue 13 row 13: mirror.test (allowed on 443 only) shares ssh.test's address; once
    it was resolved after ssh.test, raw TCP on 22 used to be judged as mirror.test's alone."""
    for name in ("ssh.test", "mirror.test"):
        assert as_agent(namespace, agent, "dig", "+short", name).stdout.split() == [SSH]
    allowed = as_agent(namespace, agent, PROBE_PYTHON, "-c", ssh_probe(SSH))
    assert allowed.stdout.strip() == "b'echo: SSH-2.0-probe\\r\\n'", allowed.stderr


def test_raw_tcp_never_reaches_an_address_from_outside_the_answers_name_chain(namespace, agent,
                                                                             proxy):
    """Issue 13 row 12: lure.test's server adds `other.test A` (the foreign address) to its
    answer. The client must not get it, and the proxy must not take it as lure.test's."""
    resolved = as_agent(namespace, agent, "dig", "+short", "lure.test")
    assert resolved.stdout.split() == [SSH]
    foreign = as_agent(namespace, agent, PROBE_PYTHON, "-c", ssh_probe(FOREIGN))
    assert "echo" not in foreign.stdout
    events = proxy.wait_for_events(lambda e: e["event"] == "connect" and e["port"] == 22
                                   and e["host"] == FOREIGN)
    assert events and all(e["decision"] == "deny" and "for no allowed name" in e["reason"]
                          for e in events)


def test_a_listener_on_a_public_address_is_unreachable_and_counted(namespace, agent, proxy):
    server = ("import socket, time\n"
              "s = socket.socket(); s.bind(('0.0.0.0', 7000)); s.listen()\n"
              "print('listening', flush=True); time.sleep(30)\n")
    listening = subprocess.Popen(
        ["ip", "netns", "exec", namespace, "setpriv", f"--reuid={agent.pw_uid}",
         f"--regid={agent.pw_gid}", "--clear-groups", "--", PROBE_PYTHON, "-c", server],
        stdout=subprocess.PIPE, text=True)
    try:
        assert listening.stdout is not None and listening.stdout.readline() == "listening\n"
        probe = ("import socket\ntry:\n"
                 f"    s = socket.create_connection(('{ORIGIN}', 7000), timeout=3)\n"
                 "    s.sendall(b'x'); print('open', s.recv(10))\n"
                 "except OSError as e:\n    print('closed', e)\n")
        other = subprocess.run(["ip", "netns", "exec", namespace, PYTHON, "-c", probe],
                               capture_output=True, text=True, timeout=30)
        assert other.stdout.startswith("closed"), other.stdout
        metrics = subprocess.run(["ip", "netns", "exec", namespace, "curl", "-sS",
                                  "http://127.0.0.1:9464/metrics"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
        assert 'agent_egress_exposed_listeners{account="agent"} 1.0' in metrics
    finally:
        listening.kill()
        listening.wait()
        assert listening.stdout is not None
        listening.stdout.close()


CLASHING_PORT = 47123
HOLD = f"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{ORIGIN}", {CLASHING_PORT}))
s.connect(("127.0.0.1", 8081))
print("held", flush=True)
sys.stdin.read()
"""


def test_a_client_port_changed_by_nat_is_still_attributed(namespace, agent, proxy, far_side):
    """When the redirected addresses would clash with another connection's, NAT gives the
    client another port, and the exact socket look-up finds nothing: the account is still
    known, as the one uid with connections to that destination."""
    earlier = len(proxy.events())
    holder = subprocess.Popen(["ip", "netns", "exec", namespace, PYTHON, "-c", HOLD],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        probe = (  # the agent's connection, from the port the held one already uses
            "import socket, ssl\n"
            "s = socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('{ORIGIN}', {CLASHING_PORT}))\n"
            f"s.connect(('{ORIGIN}', 443))\n"
            f"t = ssl.create_default_context(cafile='{far_side}').wrap_socket("
            "s, server_hostname='secure.test')\n"
            "t.sendall(b'GET /nat HTTP/1.1\\r\\nHost: secure.test\\r\\nConnection: close"
            "\\r\\n\\r\\n')\n"
            "answer = b''\n"
            "while chunk := t.recv(4096):\n    answer += chunk\n"
            "print(answer.decode().split('\\r\\n\\r\\n')[-1], end='')\n")
        done = as_agent(namespace, agent, PROBE_PYTHON, "-c", probe)
        assert done.stdout == "hello from secure.test GET /nat\n", done.stderr
    finally:
        holder.communicate("", timeout=10)
    deadline = time.monotonic() + 10
    while not (events := [e for e in proxy.events()[earlier:] if e["event"] == "connect"
                          and e["host"] == "secure.test"]) and time.monotonic() < deadline:
        time.sleep(0.05)  # written by the audit thread once the connection has closed
    (event,) = events
    assert event["client"] != f"{ORIGIN}:{CLASHING_PORT}"  # NAT did change the port
    assert (event["account"], event["uid"], event["decision"]) == ("agent", agent.pw_uid,
                                                                   "allow")


def test_with_the_proxy_stopped_traffic_fails_closed(namespace, agent, proxy):
    proxy.stop()
    done = curl(namespace, agent, "http://web.test/after-stop")
    assert done.returncode != 0 and "hello" not in done.stdout
