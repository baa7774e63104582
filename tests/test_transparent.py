"""Transparent mode on a devbox: nftables applied, an unprivileged agent account running real
clients (curl, git, dig, pip), and the far side on addresses of its own. Every test runs in two
shapes: `routed`, a devbox as they are (the proxy's namespace reaches the far side through a
veth pair and its default routes), and `local`, where the far side's addresses are local to the
proxy's namespace. The agent's traffic goes through agent-egress whether it asks to or not, and
every way around it fails."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import netns
from support.netns_servers import (
    FOREIGN,
    GIT,
    INDEX,
    METADATA,
    NAMESERVER,
    ORIGIN,
    ORIGIN6,
    PRIVATE,
    SSH,
)
from support.proxy import Process, RunningProxy

ROOT = Path(__file__).parents[1]
AGENT = "egress-test-agent"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
PROBE_PYTHON = "/usr/bin/python3"  # the agent account cannot read the project's interpreter
FAR_TOKEN = "far-side-token-6e2a91c4"  # the proxy's, never the agent's

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.getuid() != 0 or not shutil.which("nft"),
                                 reason="network namespaces and nftables need root")]


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)


@dataclass(frozen=True)
class Devbox:
    inside: str  # the namespace of the proxy and the agent account
    outside: str  # the namespace of the far side (the same one, `local`)
    address: str  # the devbox's own non-loopback address


@pytest.fixture(scope="module", params=["routed", "local"])
def devbox(request: pytest.FixtureRequest) -> Iterator[Devbox]:
    name = f"ae-{request.param}-{os.getpid()}"
    if request.param == "routed":
        with netns.routed(name) as routed:
            yield Devbox(routed.devbox, routed.outside, netns.DEVBOX_ADDRESS)
    else:
        with netns.namespace(name) as namespace:
            yield Devbox(namespace, namespace, ORIGIN)


@pytest.fixture(scope="module")
def agent() -> pwd.struct_passwd:
    return netns.system_user(AGENT)


@pytest.fixture(scope="module")
def far_side(devbox) -> Iterator[Path]:
    """The servers; yields their CA certificate, where the agent account can read it."""
    directory = Path(tempfile.mkdtemp(prefix="agent-egress-far-side-"))
    directory.chmod(0o755)
    servers = Process(["ip", "netns", "exec", devbox.outside, PYTHON,
                       str(ROOT / "tests" / "support" / "netns_servers.py"), str(directory)])
    try:
        servers.wait_for("ready")
        (directory / "test-ca.pem").chmod(0o644)
        yield directory / "test-ca.pem"
    finally:
        servers.stop()
        shutil.rmtree(directory)


@pytest.fixture(scope="module")
def proxy(cli, devbox, agent, far_side, tmp_path_factory) -> Iterator[RunningProxy]:
    directory = tmp_path_factory.mktemp("transparent")
    policy = f"""version: 1
credentials:
  far-token:
    env: TEST_FAR_TOKEN
accounts:
  agent:
    match: {{uids: [{agent.pw_uid}]}}
    allow:
      - host: inspect.test           # before the next rule, which would match first
        ports: [443]
        paths: ["/headers/*"]
        credential: far-token
      - host: web.test
      - host: secure.test
        ports: [443]
      - host: inspect.test           # inspected: the agent must trust the proxy's CA
        ports: [443]
        methods: [GET, HEAD]
      - host: ssh.test
        ports: [22]
      - host: mirror.test
        ports: [443]
      - host: lure.test
        ports: [22]
      - host: git.test
        ports: [443]
      - host: index.test
        ports: [443]
      - host: dual.test
      - host: v6only.test
      - host: metadata.test          # allowed by name, but it resolves to a metadata address
      - host: intranet.test          # and this one to a private address
        ports: [80, 5432]
    deny:
      - host: denied.test
"""
    running = RunningProxy(
        cli, directory, policy, "--upstream-dns", NAMESERVER, "--upstream-ca", str(far_side),
        env={"TEST_FAR_TOKEN": FAR_TOKEN}, prefix=("ip", "netns", "exec", devbox.inside),
        listen=("--proxy", "127.0.0.1:8080", "--transparent", "127.0.0.1:8081", "--dns",
                "127.0.0.1:5353", "--metrics", "127.0.0.1:9464"))
    try:
        running.wait_for("transparent proxy listening on 127.0.0.1:8081")
        rules = sh(cli, "nftables", "--policy", str(running.policy_file)).stdout
        subprocess.run(["ip", "netns", "exec", devbox.inside, "nft", "-f", "-"], input=rules,
                       text=True, check=True, capture_output=True)
        yield running
    finally:
        running.stop()


def as_agent(devbox: Devbox, agent: pwd.struct_passwd, *command: str, timeout: float = 60,
             env: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`command` as the agent account, with an environment of its own (nothing of the
    test's: no proxy variables, no CA bundles) plus `env` (NAME=VALUE)."""
    return subprocess.run(
        ["ip", "netns", "exec", devbox.inside, "setpriv", f"--reuid={agent.pw_uid}",
         f"--regid={agent.pw_gid}", "--clear-groups", "--", "env", "-i",
         "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/nonexistent", "LANG=C.UTF-8", *env,
         *command],
        capture_output=True, text=True, timeout=timeout)


def as_root(namespace: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True,
                          text=True, timeout=60)


def curl(devbox, agent, *args):
    return as_agent(devbox, agent, "curl", "-sS", "--max-time", "10", *args)


def events_since(proxy: RunningProxy, earlier: int, predicate, timeout: float = 10):
    """Tunnels are written when they close, by the audit thread: waits for a match."""
    deadline = time.monotonic() + timeout
    while not (found := [e for e in proxy.events()[earlier:] if predicate(e)]) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_allowed_http_and_https_pass_through_the_transparent_listener(devbox, agent, proxy,
                                                                      far_side):
    earlier = len(proxy.events())
    plain = curl(devbox, agent, "http://web.test/page")
    assert plain.stdout == "hello from web.test GET /page\n", plain.stderr
    secure = curl(devbox, agent, "--cacert", str(far_side), "https://secure.test/s")
    assert secure.stdout == "hello from secure.test GET /s\n", secure.stderr
    assert events_since(proxy, earlier, lambda e: e["host"] == "secure.test" and
                        e["event"] == "connect")
    events = [e for e in proxy.events()[earlier:] if e["host"] in ("web.test", "secure.test")]
    assert {(e["host"], e["event"], e["account"], e["decision"], e["ip"], e["uid"])
            for e in events} == {
        ("web.test", "dns", "agent", "allow", None, agent.pw_uid),
        ("secure.test", "dns", "agent", "allow", None, agent.pw_uid),
        ("web.test", "request", "agent", "allow", ORIGIN, agent.pw_uid),
        ("secure.test", "connect", "agent", "allow", ORIGIN, agent.pw_uid)}
    assert {e["exe"] for e in events if e["event"] != "dns"} == {shutil.which("curl")}


def test_fifty_kept_alive_requests_through_the_transparent_listener(cli, devbox, agent, proxy,
                                                                     far_side, agent_home):
    """Plain HTTP and inspected HTTPS, 50 requests on one connection each: every one is served
    (an upstream connection whose address was pinned used to be reused by none, and the sixth
    request waited for one of mitmproxy's 5 connections per address)."""
    plain = curl(devbox, agent, *(f"http://web.test/kept{i}" for i in range(50)))
    assert plain.stdout.count("hello from web.test GET /kept") == 50, plain.stderr
    bundle = agent_home / "ca-bundle.pem"
    proxy_ca = Path(sh(cli, "ca", "--state-dir", str(proxy.directory / "state")).stdout.strip())
    bundle.write_text(proxy_ca.read_text())
    bundle.chmod(0o644)
    inspected = as_agent(devbox, agent, "curl", "-sS", "--max-time", "30", "--cacert",
                         str(bundle), *(f"https://inspect.test/kept{i}" for i in range(50)))
    assert inspected.stdout.count("hello from inspect.test GET /kept") == 50, inspected.stderr


def test_a_credential_is_injected_through_the_transparent_listener(cli, devbox, agent, proxy,
                                                                  agent_home):
    """The far side receives the proxy's header in place of the agent's dummy (its /headers/
    path answers with the header lines it received)."""
    bundle = agent_home / "proxy-ca.pem"
    proxy_ca = Path(sh(cli, "ca", "--state-dir", str(proxy.directory / "state")).stdout.strip())
    bundle.write_text(proxy_ca.read_text())
    bundle.chmod(0o644)
    earlier = len(proxy.events())
    seen = curl(devbox, agent, "--cacert", str(bundle), "-H", "Authorization: Bearer dummy",
                "-H", "authorization: Basic c29tZW9uZTpkdW1teQ==", "https://inspect.test/headers/a")
    lines = seen.stdout.splitlines()
    assert [line.split(": ", 1)[1] for line in lines
            if line.lower().startswith("authorization:")] == [f"Bearer {FAR_TOKEN}"], \
        seen.stdout + seen.stderr
    (event,) = events_since(proxy, earlier, lambda e: e["path"] == "/headers/a")
    assert (event["decision"], event["credential"], event["uid"]) == (
        "allow", "far-token", agent.pw_uid)
    assert not event["client"].startswith("127.0.0.1:")  # the transparent listener took it
    other = curl(devbox, agent, "--cacert", str(bundle), "https://inspect.test/elsewhere")
    assert other.stdout == "hello from inspect.test GET /elsewhere\n", other.stderr


@pytest.mark.parametrize("where", ["plain header", "plain query", "inspected query",
                                   "inspected body"])
def test_the_tripwire_through_the_transparent_listener(cli, devbox, agent, proxy, agent_home,
                                                       where):
    bundle = agent_home / "proxy-ca.pem"
    proxy_ca = Path(sh(cli, "ca", "--state-dir", str(proxy.directory / "state")).stdout.strip())
    bundle.write_text(proxy_ca.read_text())
    bundle.chmod(0o644)
    path = f"/headers/{where.replace(' ', '-')}"
    args = {
        "plain header": ["-H", f"X-Copied: {FAR_TOKEN}", f"http://web.test{path}"],
        "plain query": [f"http://web.test{path}?k={FAR_TOKEN.encode().hex()}"],
        "inspected query": ["--cacert", str(bundle), f"https://inspect.test{path}?k={FAR_TOKEN}"],
        "inspected body": ["--cacert", str(bundle), "-X", "GET", "--data-binary",
                           f"token={FAR_TOKEN}", f"https://inspect.test{path}"],
    }[where]
    earlier = len(proxy.events())
    refused = curl(devbox, agent, "-i", *args)
    assert refused.stdout.split(" ", 2)[:2] in (["HTTP/1.1", "403"], ["HTTP/2", "403"]), \
        refused.stdout + refused.stderr
    assert "carries credential far-token" in refused.stdout
    assert "X-Copied" not in refused.stdout  # the far side's echo never came
    (event,) = events_since(proxy, earlier, lambda e: e["path"] == path)
    assert (event["decision"], event["credential"], event["reason"]) == (
        "deny", "far-token", "carries credential far-token")


@pytest.fixture
def agent_home() -> Iterator[Path]:
    """A directory the agent account may write (pytest's own are root's only)."""
    work = Path(tempfile.mkdtemp(prefix="agent-egress-home-"))
    work.chmod(0o777)
    yield work
    shutil.rmtree(work)


def test_git_clones_and_pip_installs_by_name(devbox, agent, proxy, far_side, agent_home):
    work = agent_home
    env = (f"HOME={work}", f"GIT_SSL_CAINFO={far_side}")
    cloned = as_agent(devbox, agent, "git", "clone", "-q", "https://git.test/repo.git",
                      str(work / "repo"), env=env)
    assert cloned.returncode == 0, cloned.stderr
    assert (work / "repo" / "README").read_text() == "hello\n"
    installed = as_agent(devbox, agent, PROBE_PYTHON, "-m", "pip", "install", "-q",
                         "--no-cache-dir", "--disable-pip-version-check", "--target",
                         str(work / "site"), "--index-url", "https://index.test/simple/",
                         "--cert", str(far_side), "egress-probe", env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "installed through agent-egress" in (work / "site" / "egress_probe.py").read_text()
    connects = events_since(proxy, 0, lambda e: e["event"] == "connect" and
                            e["host"] in ("git.test", "index.test"))
    assert {(e["host"], e["ip"], e["decision"], e["uid"]) for e in connects} == {
        ("git.test", GIT, "allow", agent.pw_uid), ("index.test", INDEX, "allow", agent.pw_uid)}


def test_clients_work_in_the_login_environment_of_the_rollout_guide(cli, devbox, agent, proxy,
                                                                    far_side, agent_home):
    """The environment the guide has `agent-egress env` write sends the clients to the explicit
    listener (the events name a loopback client), and its CA bundle lets them verify both
    passed-through HTTPS (the far side's CA, added here, stands in for the public ones) and
    inspected HTTPS."""
    bundle = agent_home / "ca-bundle.pem"
    profile = agent_home / "profile.sh"
    profile.write_text(sh(cli, "env", "--state-dir", str(proxy.directory / "state"),
                          "--ca-bundle", str(bundle)).stdout)
    with bundle.open("a") as written:
        written.write(far_side.read_text())
    for path in (bundle, profile):
        path.chmod(0o644)

    def login(*command: str) -> subprocess.CompletedProcess[str]:
        return as_agent(devbox, agent, "sh", "-c", '. "$0" && exec "$@"', str(profile),
                        *command, env=(f"HOME={agent_home}",))

    earlier = len(proxy.events())
    secure = login("curl", "-sS", "--max-time", "10", "https://secure.test/env")
    assert secure.stdout == "hello from secure.test GET /env\n", secure.stderr
    inspected = login("curl", "-sS", "--max-time", "10", "https://inspect.test/look")
    assert inspected.stdout == "hello from inspect.test GET /look\n", inspected.stderr
    posted = login("curl", "-sS", "--max-time", "10", "-d", "x", "https://inspect.test/look")
    assert "reason:" in posted.stdout and "POST" in posted.stdout, posted.stdout
    cloned = login("git", "clone", "-q", "https://git.test/repo.git", str(agent_home / "repo"))
    assert cloned.returncode == 0, cloned.stderr
    installed = login(PROBE_PYTHON, "-m", "pip", "install", "-q", "--no-cache-dir",
                      "--disable-pip-version-check", "--target", str(agent_home / "site"),
                      "--index-url", "https://index.test/simple/", "egress-probe")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert login("dig", "+short", "ssh.test").stdout.split() == [SSH]
    raw = login(PROBE_PYTHON, "-c", ssh_probe(SSH))  # no proxy variables for raw TCP
    assert raw.stdout.strip() == "b'echo: SSH-2.0-probe\\r\\n'", raw.stderr
    events = events_since(proxy, earlier, lambda e: e["event"] == "connect" and
                          e["host"] == "index.test")
    assert events and events[0]["client"].startswith("127.0.0.1:")
    requests = [e for e in proxy.events()[earlier:] if e["host"] == "inspect.test"
                and e["event"] == "request"]
    assert {(e["method"], e["decision"], e["client"].split(":")[0]) for e in requests} == {
        ("GET", "allow", "127.0.0.1"), ("POST", "deny", "127.0.0.1")}


def test_a_denied_host_is_blocked(devbox, agent, proxy):
    unresolved = curl(devbox, agent, "http://denied.test/")
    assert "Could not resolve host: denied.test" in unresolved.stderr
    addressed = curl(devbox, agent, "--resolve", f"denied.test:80:{ORIGIN}",
                     "http://denied.test/")
    assert "reason:      denied by rule: host denied.test" in addressed.stdout


def test_connecting_to_an_address_directly_fails(devbox, agent, proxy, far_side):
    plain = curl(devbox, agent, f"http://{ORIGIN}/")
    assert f"no rule matched for {ORIGIN}:80" in plain.stdout
    secure = curl(devbox, agent, "-k", f"https://{ORIGIN}/")  # no SNI
    assert secure.returncode != 0 and "hello" not in secure.stdout


@pytest.mark.parametrize("name, address, kind", [("metadata.test", METADATA,
                                                  "link-local (cloud metadata)"),
                                                 ("intranet.test", PRIVATE, "private")])
def test_metadata_and_private_addresses_are_refused_by_address_and_by_name(
        devbox, agent, proxy, name, address, kind):
    by_address = curl(devbox, agent, f"http://{address}/latest/meta-data/")
    assert f"no rule matched for {address}:80 GET /latest/meta-data/" in by_address.stdout
    unresolved = curl(devbox, agent, f"http://{name}/")  # the resolver keeps it from the agent
    assert f"Could not resolve host: {name}" in unresolved.stderr
    addressed = curl(devbox, agent, "--resolve", f"{name}:80:{address}", f"http://{name}/")
    assert (f"{name} resolves to {address}, which is {kind}; only a cidr rule can allow an "
            "internal address") in addressed.stdout
    root = as_root(devbox.inside, "curl", "-sS", "--max-time", "10", f"http://{address}/")
    assert root.stdout == f"hello from {address} GET /\n", root.stderr  # the server is there


def test_an_allowed_sni_sent_to_a_foreign_address_fails(devbox, agent, proxy, far_side):
    earlier = len(proxy.events())
    done = curl(devbox, agent, "--cacert", str(far_side), "--resolve",
                f"secure.test:443:{FOREIGN}", "https://secure.test/")
    assert done.returncode != 0
    (event,) = events_since(proxy, earlier, lambda e: "does not resolve to" in
                            (e["reason"] or ""))
    assert event["reason"] == (f"secure.test does not resolve to {FOREIGN}, where the "
                               "connection goes (spoofed name?)")


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_asking_another_dns_server_reaches_agent_egress_instead(devbox, agent, proxy,
                                                                transport):
    denied = as_agent(devbox, agent, "dig", "+time=3", "+tries=1", transport,
                      f"@{NAMESERVER}", "other.test")
    assert "status: NXDOMAIN" in denied.stdout
    assert "EDE: 15 (Blocked): (agent-egress: account agent: no rule matched for other.test)" \
        in denied.stdout
    allowed = as_agent(devbox, agent, "dig", "+short", "+time=3", "+tries=1", transport,
                       f"@{FOREIGN}", "web.test")
    assert allowed.stdout.split() == [ORIGIN]
    over_ipv6 = as_agent(devbox, agent, "dig", "+time=3", "+tries=1", transport,
                         f"@{ORIGIN6}", "other.test")
    assert "ANSWER SECTION" not in over_ipv6.stdout and "status:" not in over_ipv6.stdout
    root = as_root(devbox.inside, "dig", "+short", "+time=3", "+tries=1", transport,
                   f"@{ORIGIN6}", "other.test")
    assert root.stdout.split() == [FOREIGN]  # that server answers anyone else


def test_udp_quic_and_ipv6_fail(devbox, agent, proxy):
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
             "try:\n"
             f"    s.sendto(b'quic', ('{ORIGIN}', 443))\n"
             "    print(s.recv(100))\n"
             "except OSError as e:\n    print('refused', e)\n")
    udp = as_agent(devbox, agent, PROBE_PYTHON, "-c", probe)
    assert udp.stdout.startswith("refused"), udp.stdout + udp.stderr
    root = as_root(devbox.inside, PYTHON, "-c", probe)
    assert root.stdout.strip() == "b'echo: quic'"  # the server is there; only the agent is cut
    for target in (f"http://[{ORIGIN6}]/", f"https://[{ORIGIN6}]/", "http://v6only.test/"):
        ipv6 = curl(devbox, agent, "-gk", target)
        assert ipv6.returncode != 0 and "hello" not in ipv6.stdout, target
    assert as_root(devbox.inside, "curl", "-sSg", "--max-time", "10",
                   f"http://[{ORIGIN6}]/").stdout.startswith("hello")
    # A name with both addresses: the IPv6 attempt is refused at once, IPv4 goes through
    dual = curl(devbox, agent, "http://dual.test/both")
    assert dual.stdout == "hello from dual.test GET /both\n", dual.stderr


ICMP_PROBE = """
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.settimeout(2)
try:
    s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 1) + b"probe", ("{address}", 0))
    print("reply", s.recv(100)[0])
except OSError as e:
    print("refused", e)
"""


def test_icmp_fails(devbox, agent, proxy):
    """Even where unprivileged ICMP sockets are allowed (ping_group_range)."""
    opened = as_root(devbox.inside, PYTHON, "-c", "open('/proc/sys/net/ipv4/ping_group_range', "
                     "'w').write('0 2147483647')")
    assert opened.returncode == 0, opened.stderr
    probe = ICMP_PROBE.format(address=ORIGIN)
    assert as_agent(devbox, agent, PROBE_PYTHON, "-c", probe).stdout.startswith("refused")
    assert as_root(devbox.inside, PROBE_PYTHON, "-c", probe).stdout.strip() == "reply 0"


def ssh_probe(address: str, port: int = 22) -> str:
    family = "AF_INET6" if ":" in address else "AF_INET"
    return ("import socket\n"
            f"s = socket.socket(socket.{family}); s.settimeout(5)\n"
            "try:\n"
            f"    s.connect(('{address}', {port}))\n"
            "    s.sendall(b'SSH-2.0-probe\\r\\n')\n"
            "    print(s.recv(100))\n"
            "except OSError as e:\n    print('refused', e)\n")


def test_raw_tcp_reaches_only_addresses_resolved_for_an_allowed_name(devbox, agent, proxy):
    earlier = len(proxy.events())
    resolved = as_agent(devbox, agent, "dig", "+short", "ssh.test")
    assert resolved.stdout.split() == [SSH]
    allowed = as_agent(devbox, agent, PROBE_PYTHON, "-c", ssh_probe(SSH))
    assert allowed.stdout.strip() == "b'echo: SSH-2.0-probe\\r\\n'", allowed.stderr
    (event,) = events_since(proxy, earlier, lambda e: e["host"] == "ssh.test" and
                            e["event"] == "connect")
    assert (event["ip"], event["port"], event["decision"]) == (SSH, 22, "allow")
    for address, port in ((FOREIGN, 22), (ORIGIN6, 22), (PRIVATE, 5432)):
        refused = as_agent(devbox, agent, PROBE_PYTHON, "-c", ssh_probe(address, port))
        assert "echo" not in refused.stdout, (address, port)
        reached = as_root(devbox.inside, PYTHON, "-c", ssh_probe(address, port))
        assert "echo" in reached.stdout, (address, port)  # the server is there
    # an allowed name's port, but the name resolves to a private address
    as_agent(devbox, agent, "dig", "+short", "intranet.test")
    private = as_agent(devbox, agent, PROBE_PYTHON, "-c", ssh_probe(PRIVATE, 5432))
    assert "echo" not in private.stdout


def test_raw_tcp_to_an_address_that_two_allowed_names_share(devbox, agent, proxy):
    """Issue 13 row 13: mirror.test (allowed on 443 only) shares ssh.test's address; once
    it was resolved after ssh.test, raw TCP on 22 used to be judged as mirror.test's alone."""
    for name in ("ssh.test", "mirror.test"):
        assert as_agent(devbox, agent, "dig", "+short", name).stdout.split() == [SSH]
    allowed = as_agent(devbox, agent, PROBE_PYTHON, "-c", ssh_probe(SSH))
    assert allowed.stdout.strip() == "b'echo: SSH-2.0-probe\\r\\n'", allowed.stderr


def test_raw_tcp_never_reaches_an_address_from_outside_the_answers_name_chain(devbox, agent,
                                                                             proxy):
    """Issue 13 row 12: lure.test's server adds `other.test A` (the foreign address) to its
    answer. The client must not get it, and the proxy must not take it as lure.test's."""
    resolved = as_agent(devbox, agent, "dig", "+short", "lure.test")
    assert resolved.stdout.split() == [SSH]
    foreign = as_agent(devbox, agent, PROBE_PYTHON, "-c", ssh_probe(FOREIGN))
    assert "echo" not in foreign.stdout
    events = proxy.wait_for_events(lambda e: e["event"] == "connect" and e["port"] == 22
                                   and e["host"] == FOREIGN)
    assert events and all(e["decision"] == "deny" and "for no allowed name" in e["reason"]
                          for e in events)


def test_the_explicit_listener_is_reachable_on_loopback_only(devbox, agent, proxy):
    through = curl(devbox, agent, "-x", "http://127.0.0.1:8080", "http://web.test/explicit")
    assert through.stdout == "hello from web.test GET /explicit\n", through.stderr
    internal = curl(devbox, agent, "-x", "http://127.0.0.1:8080", f"http://{METADATA}/")
    assert "hello" not in internal.stdout
    for address in (devbox.address, FOREIGN):  # the proxy's port elsewhere: the transparent
        elsewhere = curl(devbox, agent, "-x", f"http://{address}:8080",  # listener, refusing
                         "http://web.test/elsewhere")
        assert "hello" not in elsewhere.stdout, address


def test_a_listener_on_a_public_address_is_unreachable_and_counted(devbox, agent, proxy):
    server = ("import socket, time\n"
              "s = socket.socket(); s.bind(('0.0.0.0', 7000)); s.listen()\n"
              "print('listening', flush=True); time.sleep(30)\n")
    listening = subprocess.Popen(
        ["ip", "netns", "exec", devbox.inside, "setpriv", f"--reuid={agent.pw_uid}",
         f"--regid={agent.pw_gid}", "--clear-groups", "--", PROBE_PYTHON, "-c", server],
        stdout=subprocess.PIPE, text=True)
    try:
        assert listening.stdout is not None and listening.stdout.readline() == "listening\n"
        probe = ("import socket\ntry:\n"
                 f"    s = socket.create_connection(('{devbox.address}', 7000), timeout=3)\n"
                 "    s.sendall(b'x'); print('open', s.recv(10))\n"
                 "except OSError as e:\n    print('closed', e)\n")
        other = as_root(devbox.outside, PYTHON, "-c", probe)
        assert other.stdout.startswith("closed"), other.stdout
        metrics = subprocess.run(["ip", "netns", "exec", devbox.inside, "curl", "-sS",
                                  "http://127.0.0.1:9464/metrics"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
        assert 'agent_egress_exposed_listeners{account="agent"} 1.0' in metrics
    finally:
        listening.kill()
        listening.wait()
        assert listening.stdout is not None
        listening.stdout.close()


CLASHING_PORT = 47123
HOLD = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{address}", {port}))
s.connect(("127.0.0.1", 8081))
print("held", flush=True)
sys.stdin.read()
"""


def test_a_client_port_changed_by_nat_is_attributed_exactly(devbox, agent, proxy, far_side):
    """When the redirected addresses would clash with another connection's, NAT gives the
    client another port; conntrack's original tuple still names the client's own socket,
    so the account, the uid and the very process are known."""
    earlier = len(proxy.events())
    holder = subprocess.Popen(
        ["ip", "netns", "exec", devbox.inside, PYTHON, "-c",
         HOLD.format(address=devbox.address, port=CLASHING_PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        probe = (  # the agent's connection, from the port the held one already uses
            "import os, socket, ssl\n"
            "print(os.getpid())\n"
            "s = socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('{devbox.address}', {CLASHING_PORT}))\n"
            f"s.connect(('{ORIGIN}', 443))\n"
            f"t = ssl.create_default_context(cafile='{far_side}').wrap_socket("
            "s, server_hostname='secure.test')\n"
            "t.sendall(b'GET /nat HTTP/1.1\\r\\nHost: secure.test\\r\\nConnection: close"
            "\\r\\n\\r\\n')\n"
            "answer = b''\n"
            "while chunk := t.recv(4096):\n    answer += chunk\n"
            "print(answer.decode().split('\\r\\n\\r\\n')[-1], end='')\n")
        done = as_agent(devbox, agent, PROBE_PYTHON, "-c", probe)
        pid, answer = done.stdout.split("\n", 1)
        assert answer == "hello from secure.test GET /nat\n", done.stderr
    finally:
        holder.communicate("", timeout=10)
    (event,) = events_since(proxy, earlier, lambda e: e["event"] == "connect" and
                            e["host"] == "secure.test")
    assert event["client"] != f"{devbox.address}:{CLASHING_PORT}"  # NAT did change the port
    assert (event["account"], event["uid"], event["decision"], event["pid"]) == (
        "agent", agent.pw_uid, "allow", int(pid))


def test_with_the_proxy_stopped_traffic_fails_closed(devbox, agent, proxy):
    proxy.stop()
    done = curl(devbox, agent, "http://web.test/after-stop")
    assert done.returncode != 0 and "hello" not in done.stdout
