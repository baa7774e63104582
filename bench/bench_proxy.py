"""Benchmark of the proxy on loopback: direct, `agent-egress run`, bare mitmdump and squid.

    .venv/bin/python bench/bench_proxy.py [--quick] [--profile DIR] [--source DIR]

Needs nginx (nginx-light), squid, wrk, hey and curl (`apt-get install -y nginx-light squid wrk
hey`; for (e) and (g) squid-openssl instead of squid), root, and for --profile py-spy in the
venv. Routes: direct; agent-egress run; mitmdump with agent-egress's addon; bare mitmdump
(defaults; agent-egress's options; pass-through; full interception); squid (without a log, the
baseline; in (a) and (f) also with its access log, as agent-egress writes its audit line); squid
ssl-bump.
Scenarios, each route in turn:
  (a) plain HTTP keep-alive GETs of a 6-byte body, 32 connections (wrk): req/s, p50, p99;
  (b) a new CONNECT tunnel, TLS handshake and one GET per request, 32 at once (hey);
  (c) one 200 MB HTTPS download through a passed-through tunnel (curl): MB/s, median of 3;
  (d) plain HTTP GETs of 10 MiB bodies, 8 connections (wrk): the proxy's peak RSS;
  (e) inspected HTTPS keep-alive GETs, 32 connections (hey): a rule with `methods` makes the
      proxy terminate TLS, beside bare mitmdump's full interception; and, on a second
      agent-egress whose policy has a credential, the same rule (tripwire on) and one with
      `credential` (the header injected: what injection costs); squid ssl-bump the baseline.
  (f) plain HTTP keep-alive GETs offered at 2,000 req/s, 20 connections (hey -q): p50, p99;
  (g) new inspected connections: per GET a new connection, CONNECT and TLS handshake with the
      proxy that terminates TLS, 32 at once (hey): agent-egress's `methods` rule, mitmdump's
      full interception, squid ssl-bump; directly, a new TLS connection to nginx per GET.
See bench/README.md for what each figure means. Everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import trustme
from common import CpuWatch, Service, _children, free_port, machine, table
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from mitmproxy import certs

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
HTTP_NAME, TLS_NAME = "web.test", "secure.test"
INSPECT_NAME = "inspect.test"  # the same HTTPS origin, under a rule that inspects
INJECT_NAME = "inject.test"  # and under one that injects a credential
NAMES = {HTTP_NAME, TLS_NAME, INSPECT_NAME, INJECT_NAME}
DUMMY = "Authorization: Bearer dummy-held-by-the-agent"  # what (e)'s client sends
CONNECTIONS = 32
BIG = 10 * 1024 * 1024  # scenario (d)
BULK = 200 * 1000 * 1000  # scenario (c)
MEMORY_CONNECTIONS = 8
OFFERED, OFFERED_CONNECTIONS = 2000, 20  # scenario (e)
TARGET_RATIO, TARGET_RSS_MIB = 0.9, 100
INSPECTED_TARGETS = {"e": 0.5, "g": 1.0}  # x squid ssl-bump: inspected keep-alive, new ones
BUSY = 0.25  # cores used by other processes during a figure that make it taken again
# What the profile summary calls ours: files of this repository (the installed package's
# addons/, dns/ and rules/ are the top-level directories, mapped by the editable install).
OURS = re.compile(r"(agent_egress|/addons|/rules|/dns)/[\w/]+\.py")
ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


@dataclass(frozen=True)
class Settings:
    seconds: int  # per route and scenario, (a), (b) and (d)
    warm_up: int
    downloads: int  # (c), the median is reported


FULL = Settings(seconds=10, warm_up=1, downloads=3)
QUICK = Settings(seconds=3, warm_up=1, downloads=1)


@dataclass(frozen=True)
class Route:
    """How a client reaches the origins: directly or through a proxy, naming them how."""

    label: str
    proxy: Service | None
    port: int  # the proxy's port; 0 for direct
    host: str  # the origin's host as the client gives it (a .test name or 127.0.0.1)
    origin_port: int = 0  # the HTTPS origin's port for this route, if not the usual one

    def target(self, origin_port: int) -> str:
        return f"{self.host}:{origin_port}"


@dataclass
class Result:
    rate: float = 0.0  # requests/s, or MB/s for (c) and (d)
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    rss_before_mib: float | None = None
    rss_peak_mib: float | None = None
    others: float = 0.0  # cores' worth of CPU that other processes used meanwhile
    cpu_us: float | None = None  # the proxy's CPU (its workers' too) per request, microseconds


class Dns:
    """A UDP DNS server on a thread: every name in `names` is 127.0.0.1 (no AAAA), others are
    NXDOMAIN. Each distinct question is answered by dnslib once, then from a cache with the
    query's id patched in, so that it takes as little CPU as possible from the proxy."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.queries = 0
        self._answers: dict[bytes, bytes] = {}
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                query, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            answer = self._answers.get(query[2:])
            if answer is None:
                try:
                    answer = self._answers[query[2:]] = self._answer(query)[2:]
                except Exception:  # noqa: BLE001, S112 (not a query we can parse: no answer)
                    continue
            self.queries += 1
            self._socket.sendto(query[:2] + answer, peer)

    def _answer(self, query: bytes) -> bytes:
        request = DNSRecord.parse(query)
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        if name not in self.names:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=60))
        return bytes(reply.pack())

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._socket.close()


def start_nginx(directory: Path, cert: trustme.LeafCert,
                https_also: str = "") -> tuple[Service, int, int]:
    """nginx, one process, on a plain-HTTP and an HTTPS port (the HTTPS server on
    `https_also`, ADDRESS:PORT, too): `/` is a 6-byte body, `/big` 10 MiB and `/bulk` 200 MB
    (sparse files)."""
    www = directory / "www"
    www.mkdir()
    for name, size in (("big", BIG), ("bulk", BULK)):
        with open(www / name, "wb") as f:
            f.truncate(size)
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    http_port, https_port = free_port(), free_port()
    site = f"""root {www}; location = / {{ return 200 "hello\\n"; }}"""
    also = f"listen {https_also} ssl;" if https_also else ""
    (directory / "nginx.conf").write_text(f"""
        daemon off; master_process off; worker_processes 1;
        pid {directory}/nginx.pid; error_log {directory}/error.log warn;
        events {{ worker_connections 4096; }}
        http {{
            access_log off; sendfile on; tcp_nopush on;
            keepalive_requests 10000000; keepalive_timeout 120s;
            default_type application/octet-stream;
            client_body_temp_path {directory}/body; proxy_temp_path {directory}/proxy;
            fastcgi_temp_path {directory}/fastcgi; uwsgi_temp_path {directory}/uwsgi;
            scgi_temp_path {directory}/scgi;
            server {{ listen 127.0.0.1:{http_port}; {site} }}
            server {{
                listen 127.0.0.1:{https_port} ssl; {also}
                ssl_certificate {directory}/cert.pem; ssl_certificate_key {directory}/key.pem;
                {site}
            }}
        }}
    """)
    nginx = Service("nginx", ["nginx", "-e", f"{directory}/error.log", "-c",
                              f"{directory}/nginx.conf"], directory / "nginx.log")
    return nginx, http_port, https_port


def write_policy(directory: Path, http_port: int, https_port: int) -> Path:
    """The origins' names and their address (loopback, which needs a cidr rule), for this uid."""
    policy = directory / "policy.yaml"
    policy.write_text(f"""version: 1
accounts:
  bench:
    match:
      uids: [{os.getuid()}]
    mode: enforce
    allow:
      - host: {HTTP_NAME}
        ports: [{http_port}]
      - host: {TLS_NAME}
        ports: [{https_port}]
      - host: {INSPECT_NAME}
        ports: [{https_port}]
        methods: [GET]
      - cidr: 127.0.0.1/32
        ports: [{http_port}, {https_port}]
""")
    return policy


def write_credential_policy(directory: Path, https_port: int) -> Path:
    """(e) with credentials: the inspecting rule, and one that injects a secret from a file."""
    secret = directory / "bench-token"
    secret.write_text(os.urandom(20).hex() + "\n")
    secret.chmod(0o600)
    policy = directory / "policy-credentials.yaml"
    policy.write_text(f"""version: 1
credentials:
  bench-token:
    file: {secret}
accounts:
  bench:
    match:
      uids: [{os.getuid()}]
    allow:
      - host: {INSPECT_NAME}
        ports: [{https_port}]
        methods: [GET]
      - host: {INJECT_NAME}
        ports: [{https_port}]
        methods: [GET]
        credential: bench-token
      - cidr: 127.0.0.1/32
        ports: [{https_port}]
""")
    return policy


def _bin(source: Path | None) -> Path:
    """The programs of `source`'s own virtualenv (scripts/bootstrap makes it): the package maps
    `agent_egress.addons`, `.rules` and `.dns` onto top-level directories through its editable
    install, so PYTHONPATH alone would load those from this copy and the rest from `source`."""
    if source is None:
        return BIN
    programs = source.resolve() / ".venv" / "bin"
    if not (programs / "agent-egress").exists():
        raise SystemExit(f"--source {source}: no {programs / 'agent-egress'}; run "
                         f"scripts/bootstrap there first")
    return programs


def make_ca(directory: Path) -> Path:
    """One CA for every route that terminates TLS, made the way agent-egress makes its own
    (mitmproxy's store, RSA 2048; mitmproxy and squid both give their leaf certificates the
    CA's own key): the file holds the key and the certificate."""
    certs.CertStore.from_store(directory, "mitmproxy", 2048)
    return directory / "mitmproxy-ca.pem"


def _install_ca(ca: Path | None, confdir: Path) -> None:
    """Puts `ca` where mitmproxy looks for its CA, before the proxy starts (it keeps it)."""
    if ca is not None:
        confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.copyfile(ca, confdir / ca.name)
        (confdir / ca.name).chmod(0o600)


def start_agent_egress(directory: Path, policy: Path, dns: Dns, source: Path | None,
                       *options: str, env: dict[str, str] | None = None,
                       ca: Path | None = None) -> tuple[Service, int]:
    directory.mkdir()
    _install_ca(ca, directory / "state" / "mitmproxy")
    port = free_port()
    command = [str(_bin(source) / "agent-egress"), "run", "--proxy", f"127.0.0.1:{port}",
               "--dns", "off", "--metrics", "off", "--policy", str(policy),
               "--state-dir", str(directory / "state"), "--audit-log",
               str(directory / "audit.jsonl"), "--upstream-dns", f"127.0.0.1:{dns.port}",
               *options]
    return Service(directory.name, command, directory / "output.log",
                   {**ENV, **(env or {})}), port


def start_mitmdump(directory: Path, *options: str, ca: Path | None = None,
                   programs: Path = BIN) -> tuple[Service, int]:
    directory.mkdir()
    _install_ca(ca, directory)
    port = free_port()
    command = [str(programs / "mitmdump"), "--mode", f"regular@127.0.0.1:{port}", "-q",
               "--set", f"confdir={directory}", *options]
    return Service(directory.name, command, directory / "output.log", ENV), port


def start_mitmdump_addon(directory: Path, policy: Path, dns: Dns,
                         source: Path | None) -> tuple[Service, int]:
    """mitmdump with agent-egress's addon (addons/script.py) and agent-egress's options: the
    difference to `mitmdump lazy` is what the addon costs."""
    script = (source or ROOT) / "addons" / "script.py"
    return start_mitmdump(directory, "-s", str(script), "--set", "connection_strategy=lazy",
                          "--set", "stream_large_bodies=1m",
                          "--set", f"agent_egress_policy={policy}",
                          "--set", f"agent_egress_audit_log={directory / 'audit.jsonl'}",
                          "--set", f"agent_egress_upstream_dns=127.0.0.1:{dns.port}",
                          programs=_bin(source))


def start_squid(directory: Path, port_options: str = "", options: str = "",
                label: str = "squid") -> tuple[Service, int]:
    """squid in the foreground (no worker processes), no cache, loopback clients only."""
    directory.mkdir(exist_ok=True)
    port = free_port()
    (directory / "squid.conf").write_text(f"""
http_port 127.0.0.1:{port}{port_options}
{options}
acl loopback src 127.0.0.1/32
http_access allow loopback
http_access deny all
cache deny all
cache_mem 0 MB
access_log none
cache_log stdio:{directory}/cache.log
pid_filename {directory}/squid.pid
coredump_dir {directory}
pinger_enable off
shutdown_lifetime 0 seconds
via off
""")
    for each in (directory, *directory.rglob("*")):  # squid started as root runs as user proxy
        shutil.chown(each, "proxy", "proxy")
    command = ["squid", "-N", "-f", str(directory / "squid.conf")]
    return Service(label, command, directory / "output.log", ENV), port


def free_https_address() -> str:
    """A loopback address other than 127.0.0.1 whose port 443 is free right now (as root)."""
    for _ in range(20):
        address = f"127.{secrets.randbelow(254) + 1}.{secrets.randbelow(256)}.1"
        with socket.socket() as s:
            try:
                s.bind((address, 443))
            except OSError:
                continue
        return address
    raise RuntimeError("no loopback address with port 443 free")


def start_squid_bump(directory: Path, ca: Path, origin_ca: Path,
                     address: str) -> tuple[Service, int]:
    """squid terminating TLS (ssl-bump, squid-openssl): it reads the client's SNI (`peek` at
    step 1, as mitmproxy reads the ClientHello), then bumps, with a certificate for that name
    signed by `ca` (mitmproxy's CA file, key and certificate; the leaves get the CA's key, as
    mitmproxy's do), generated by security_file_certgen once and cached; the origin verified
    against `origin_ca`. squid 5.7 forwards a bumped request to the host and port of its Host
    header, and hey's Host header is its SNI too, so has no port: squid is given the same
    origin at `address`:443 (its `hosts_file` gives the names that address: squid knows no
    `.test`)."""
    directory.mkdir()
    (directory / "hosts").write_text(f"{address} {' '.join(sorted(NAMES))}\n")
    shutil.copyfile(ca, directory / "ca.pem")
    (directory / "ca.pem").chmod(0o600)
    certgen = _squid_certgen()
    subprocess.run([certgen, "-c", "-s", str(directory / "ssl_db"), "-M", "4MB"], check=True,
                   capture_output=True, env=ENV)
    return start_squid(
        directory,
        f" ssl-bump tls-cert={directory / 'ca.pem'} generate-host-certificates=on"
        " dynamic_cert_mem_cache_size=4MB",
        f"""sslcrtd_program {certgen} -s {directory / 'ssl_db'} -M 4MB
sslcrtd_children 4 startup=1 idle=1
tls_outgoing_options cafile={origin_ca}
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
hosts_file {directory / 'hosts'}""", label="squid ssl-bump")


def _squid_certgen() -> str:
    """squid-openssl's certificate generator (the GnuTLS-built `squid` package has none)."""
    for each in ("/usr/lib/squid/security_file_certgen", "/usr/lib64/squid/security_file_certgen"):
        if os.access(each, os.X_OK):
            return each
    raise SystemExit("security_file_certgen is missing: apt-get install -y squid-openssl "
                     "(it replaces the package squid)")


# Load generators


_WRK_SCRIPT = """
{setup}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    summary.bytes, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def wrk(route: Route, origin_port: int, path: str, connections: int, seconds: float,
        work: Path, unit: str = "req") -> Result:
    """Keep-alive GETs of `path` on the plain-HTTP origin; rate in requests/s or MB/s."""
    target = route.target(origin_port)
    if route.proxy is None:
        url, setup = f"http://127.0.0.1:{origin_port}{path}", ""
    else:
        url, setup = f"http://127.0.0.1:{route.port}/", f'wrk.path = "http://{target}{path}"'
    script = work / "wrk.lua"
    script.write_text(_WRK_SCRIPT.format(setup=setup + f'\nwrk.headers["Host"] = "{target}"'))
    out = subprocess.run(["wrk", "-t", str(min(2, connections)), "-c", str(connections),
                          "-d", f"{seconds}s", "--timeout", "2s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60, env=ENV)
    match = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out.stdout)
    if match is None:
        raise RuntimeError(f"wrk: {out.stdout}{out.stderr}")
    requests, duration_us, size, p50, p99, errors = map(int, match.groups())
    rate = (requests if unit == "req" else size / 1e6) / (duration_us / 1e6)
    return Result(rate, p50 / 1000, p99 / 1000, errors)


def hey_tunnels(route: Route, origin_port: int, seconds: float) -> Result:
    """A new connection per GET of `/` on the HTTPS origin: through a proxy, a new CONNECT
    tunnel and TLS handshake each time."""
    # hey's SNI is its Host header, and it has no --resolve: directly, and through the proxies
    # that are given addresses, the URL has the address and -host the name.
    command = ["hey", "-z", f"{seconds}s", "-c", str(CONNECTIONS), "-disable-keepalive",
               "-t", "10", "-host", TLS_NAME]
    if route.proxy is not None:
        command += ["-x", f"http://127.0.0.1:{route.port}"]
    host = TLS_NAME if route.proxy is not None and route.host == TLS_NAME else "127.0.0.1"
    out = subprocess.run([*command, f"https://{host}:{origin_port}/"], capture_output=True,
                         text=True, timeout=seconds + 60, env=ENV)
    return _hey_result(out)


def _hey_result(out: subprocess.CompletedProcess[str]) -> Result:
    text = out.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rate is None:
        raise RuntimeError(f"hey: {text}{out.stderr}")
    p50 = re.search(r"50% in ([\d.]+) secs", text)
    p99 = re.search(r"99% in ([\d.]+) secs", text)
    statuses = Counter({int(code): int(n) for code, n in
                        re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)})
    errors = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s+(?!\d+ responses)", text, re.M))
    return Result(float(rate.group(1)), float(p50.group(1)) * 1000 if p50 else None,
                  float(p99.group(1)) * 1000 if p99 else None,
                  errors + sum(n for code, n in statuses.items() if code != 200))


def hey_inspected(route: Route, origin_port: int, seconds: float,
                  keep_alive: bool = True) -> Result:
    """GETs of `/` on the HTTPS origin through a proxy that terminates TLS (hey does not
    verify certificates, so the proxy's own CA needs no installing): kept alive, or with
    `keep_alive=False` a new connection, CONNECT and TLS handshake (with the proxy) per GET.
    Directly (no proxy), the same GETs to nginx."""
    named = route.proxy is not None and route.host in (INSPECT_NAME, INJECT_NAME)
    host = route.host if named else "127.0.0.1"
    origin_port = route.origin_port or origin_port
    # hey's SNI is its Host header (the name without the port, or it sends the port in the SNI)
    command = ["hey", "-z", f"{seconds}s", "-c", str(CONNECTIONS), "-t", "10",
               "-host", route.host if named else INSPECT_NAME, "-H", DUMMY]
    command += [] if keep_alive else ["-disable-keepalive"]
    command += ["-x", f"http://127.0.0.1:{route.port}"] if route.proxy is not None else []
    out = subprocess.run([*command, f"https://{host}:{origin_port}/"], capture_output=True,
                         text=True, timeout=seconds + 60, env=ENV)
    return _hey_result(out)


def hey_offered(route: Route, origin_port: int, seconds: float) -> Result:
    """Keep-alive GETs of `/` on the plain-HTTP origin offered at OFFERED req/s in all (hey
    paces each of its connections): the latency a steady load sees, not the peak rate."""
    command = ["hey", "-z", f"{seconds}s", "-c", str(OFFERED_CONNECTIONS), "-q",
               str(OFFERED // OFFERED_CONNECTIONS), "-t", "10"]
    if route.proxy is None:
        url = f"http://127.0.0.1:{origin_port}/"
    else:
        command += ["-x", f"http://127.0.0.1:{route.port}"]
        url = f"http://{route.target(origin_port)}/"
    return _hey_result(subprocess.run([*command, url], capture_output=True, text=True,
                                      timeout=seconds + 60, env=ENV))


def curl_bulk(route: Route, origin_port: int, downloads: int) -> Result:
    """MB/s of one download of `/bulk` from the HTTPS origin, median of `downloads`."""
    command = ["curl", "-sS", "-k", "-o", "/dev/null", "-w", "%{http_code} %{size_download} "
               "%{speed_download}", "--max-time", "120"]
    if route.proxy is None:
        command += ["--resolve", f"{TLS_NAME}:{origin_port}:127.0.0.1"]
        url = f"https://{TLS_NAME}:{origin_port}/bulk"
    else:
        command += ["-x", f"http://127.0.0.1:{route.port}"]
        url = f"https://{route.target(origin_port)}/bulk"
    speeds, errors = [], 0
    for _ in range(downloads):
        out = subprocess.run([*command, url], capture_output=True, text=True, timeout=180,
                             env=ENV)
        code, size, speed = (out.stdout.split() + ["0", "0", "0"])[:3]
        if code != "200" or int(size) != BULK:
            errors += 1
        speeds.append(float(speed) / 1e6)
    return Result(statistics.median(speeds), errors=errors)


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) of `pid` and its children (proxy workers) so far."""
    total = 0.0
    for each in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_rss(route: Route, http_port: int, seconds: float, work: Path) -> Result:
    """Serves 10 MiB bodies over MEMORY_CONNECTIONS connections; the proxy's RSS before (after
    the warm-up) and its peak RSS during (VmHWM, reset first through /proc/PID/clear_refs)."""
    assert route.proxy is not None
    pid = route.proxy.pid
    before = _status_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    result = wrk(route, http_port, "/big", MEMORY_CONNECTIONS, seconds, work, unit="MB")
    result.rss_before_mib, result.rss_peak_mib = before / 1024, _status_kib(pid, "VmHWM") / 1024
    result.p50_ms = result.p99_ms = None
    return result


# Profiling


def profile(route: Route, seconds: int, output: Path, load: Callable[[Route], object]) -> str:
    """Runs `load` while py-spy samples the proxy; returns a summary of the raw stacks."""
    assert route.proxy is not None
    spy = subprocess.Popen([str(BIN / "py-spy"), "record", "--pid", str(route.proxy.pid),
                            "--format", "raw", "--rate", "250", "--nonblocking",
                            "--duration", str(int(seconds)), "-o", str(output)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        load(route)
    finally:
        spy.wait(seconds + 30)
    return summarize(output.read_text())


def _frames(stack: str) -> Iterator[tuple[str, str]]:
    """(function, file) of each frame, innermost first, of a py-spy raw stack."""
    for frame in reversed(stack.split(";")):
        match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
        if match:
            yield match.group(1), match.group(2)


def _owner(path: str) -> str:
    if OURS.search(path) and not path.endswith(("/cli.py", "/runner.py")):  # the entry points
        return "ours"
    return "mitmproxy" if "mitmproxy" in path else "other"


def summarize(raw: str, top: int = 12) -> str:
    """Shares of the samples: by whose code the innermost frame that is ours or mitmproxy's
    belongs to (so the standard library is counted with its caller), and our functions with
    the most samples, counting every sample with them anywhere on the stack."""
    owners: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = list(_frames(stack))
        whose = next((_owner(f) for _, f in frames if _owner(f) != "other"), "other")
        owners[whose] += count
        for name in {f"{fn} ({Path(f).name})" for fn, f in frames if _owner(f) == "ours"}:
            ours[name] += count
        if frames:
            leaves[f"{frames[0][0]} ({Path(frames[0][1]).name})"] += count
    if not total:
        return "no samples"
    share = lambda n: f"{100 * n / total:.1f}%"  # noqa: E731
    lines = [f"{total} samples; innermost of ours/mitmproxy's: " +
             ", ".join(f"{k} {share(n)}" for k, n in owners.most_common()),
             "our functions (inclusive): " +
             "; ".join(f"{k} {share(n)}" for k, n in ours.most_common(top)),
             "leaf functions (self): " +
             "; ".join(f"{k} {share(n)}" for k, n in leaves.most_common(top))]
    return "\n".join(lines)


# The run


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}" if reference else "-"


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(title: str, unit: str, results: dict[str, Result], reference: str) -> str:
    ref = results[reference].rate
    # inspected HTTPS, (e) and (g), compares with squid's ssl-bump, the rest with plain squid
    squid_label = "squid ssl-bump" if "squid ssl-bump" in results else "squid"
    squid = results[squid_label].rate if squid_label in results else None
    memory = any(r.rss_peak_mib for r in results.values())
    headers = [title, unit, "p50 ms", "p99 ms", "errors", f"÷ {reference}", f"÷ {squid_label}"]
    headers += ["RSS before MiB", "RSS peak MiB"] if memory else []
    rows = []
    for label, r in results.items():
        row = [label, _number(r.rate, 0 if unit == "req/s" else 1), _number(r.p50_ms),
               _number(r.p99_ms), r.errors, _ratio(r.rate, ref), _ratio(r.rate, squid)]
        row += [_number(r.rss_before_mib), _number(r.rss_peak_mib)] if memory else []
        rows.append(row + [_number(r.cpu_us, 0), f"{r.others:.2f}"])
    headers += ["proxy CPU µs/req", "others' CPU"]
    return table(headers, rows)


def verdicts(scenarios: dict[str, tuple[dict[str, Result], str]]) -> str:
    lines = []
    for name, (results, reference) in scenarios.items():
        for label in (k for k in results if k.startswith(("agent-egress", "mitmdump + addon"))):
            result = results[label]
            if name.startswith("(f)"):
                squid_p99 = results["squid"].p99_ms or 0
                p99 = result.p99_ms or 0
                met = "met" if p99 < squid_p99 and not result.errors else "NOT met"
                lines.append(f"- {name} {label}: p99 {p99:.2f} ms, squid {squid_p99:.2f} ms; "
                             f"target below squid's {met}")
                continue
            if name.startswith("(a)") and label.startswith("agent-egress"):
                of_squid = result.rate / results["squid"].rate
                met = "met" if of_squid >= 1.0 and not result.errors else "NOT met"
                logging = results.get("squid, access log")
                beside = f" ({result.rate / logging.rate:.2f}x squid with its access log)" if (
                    logging) else ""
                lines.append(f"- {name} {label}: {of_squid:.2f}x squid{beside}, {result.errors} "
                             f"errors; target >= 1.0x squid {met}")
                continue
            if name.startswith("(d)"):
                peak = result.rss_peak_mib or 0
                met = "met" if peak < TARGET_RSS_MIB else "NOT met"
                lines.append(f"- {name} {label}: peak RSS {peak:.0f} MiB; target "
                             f"< {TARGET_RSS_MIB} MiB {met}")
                continue
            bump = results.get("squid ssl-bump")
            if name.startswith(("(e)", "(g)")) and bump and (
                    label == "agent-egress" or "workers" in label):
                wanted = INSPECTED_TARGETS[name[1]]  # issue 19's inspected targets
                of_bump = result.rate / bump.rate
                met = "met" if of_bump >= wanted and not result.errors else "NOT met"
                lines.append(f"- {name} {label}: {of_bump:.2f}x squid ssl-bump, "
                             f"{result.errors} errors; target >= {wanted:.1f}x squid ssl-bump "
                             f"{met}")
                if name.startswith("(g)"):
                    continue
            ratio = result.rate / results[reference].rate
            if label == "agent-egress, credential injected":  # issue 15: what injection costs
                without = results["agent-egress, tripwire on"].rate
                met = "met" if result.rate >= 0.9 * without and not result.errors else "NOT met"
                lines.append(f"- {name} {label}: {result.rate / without - 1:+.1%} against the "
                             f"same rule without injection; target at most -10% {met}")
                continue
            if "workers" in label and name.startswith("(b)"):  # issue 8: the gap to squid
                of_squid = result.rate / results["squid"].rate
                met = "met" if ratio >= 2 and of_squid >= 0.5 and not result.errors else "NOT met"
                lines.append(f"- {name} {label}: {ratio:.2f}x {reference}, {of_squid:.0%} of "
                             f"squid, {result.errors} errors; target >= 2x and >= 50% {met}")
                continue
            met = "met" if ratio >= TARGET_RATIO and not result.errors else "NOT met"
            lines.append(f"- {name} {label}: {ratio:.0%} of {reference}, {result.errors} "
                         f"errors; target >= {TARGET_RATIO:.0%} without errors {met}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per route (a smoke run)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="afterwards, py-spy agent-egress under (a), (b) and (c) into DIR")
    parser.add_argument("--only", default="abcdefg", metavar="LETTERS",
                        help="run only these scenarios, e.g. 'b' (default: all)")
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="run agent-egress from this copy of the repository (PYTHONPATH), "
                        "to measure a change")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    for tool in ("nginx", "squid", "wrk", "hey", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y nginx-light squid wrk hey")
    bumping = "e" in args.only or "g" in args.only  # squid ssl-bump is their baseline
    if bumping:
        _squid_certgen()
    print(f"# bench_proxy\n\n{machine()}\n", flush=True)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # noqa: S103 (squid runs as user proxy)

        def started(service: Service, port: int, label: str, host: str) -> Route:
            stack.callback(service.stop)
            return Route(label, service, port, host)

        dns = Dns(NAMES)
        stack.callback(dns.stop)
        ca = trustme.CA()
        ca_file = work / "origin-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        bump_address = free_https_address() if bumping else ""  # squid ssl-bump's origin, :443
        nginx, http_port, https_port = start_nginx(
            work, ca.issue_cert(TLS_NAME, INSPECT_NAME, INJECT_NAME),
            f"{bump_address}:443" if bumping else "")
        stack.callback(nginx.stop)
        policy = write_policy(work, http_port, https_port)
        proxy_ca = make_ca(work / "proxy-ca")  # the inspecting routes' CA
        named = started(*start_agent_egress(work / "agent-egress", policy, dns, args.source,
                                            "--upstream-ca", str(ca_file), ca=proxy_ca),
                        "agent-egress", HTTP_NAME)
        literal = Route("agent-egress, IP literal", named.proxy, named.port, "127.0.0.1")
        cores = len(os.sched_getaffinity(0))
        workers = started(*start_agent_egress(work / "agent-egress-workers", policy, dns,
                                              args.source, "--workers", str(cores),
                                              "--upstream-ca", str(ca_file), ca=proxy_ca),
                          f"agent-egress, {cores} workers", HTTP_NAME)
        credentialed = started(*start_agent_egress(
            work / "agent-egress-credentials", write_credential_policy(work, https_port), dns,
            args.source, "--upstream-ca", str(ca_file), ca=proxy_ca),
            "agent-egress, tripwire on", INSPECT_NAME)
        on_asyncio = started(*start_agent_egress(work / "agent-egress-asyncio", policy, dns,
                                                 args.source, "--loop", "asyncio"),
                             "agent-egress, asyncio loop", HTTP_NAME)
        no_fast_requests = started(*start_agent_egress(
            work / "agent-egress-mitmproxy-requests", policy, dns, args.source,
            env={"AGENT_EGRESS_FAST_REQUESTS": "0"}),
            "agent-egress, requests through mitmproxy", HTTP_NAME)
        addon = started(*start_mitmdump_addon(work / "mitmdump-addon", policy, dns, args.source),
                        "mitmdump + addon", HTTP_NAME)
        mitm = started(*start_mitmdump(work / "mitmdump"), "mitmdump", "127.0.0.1")
        lazy = started(*start_mitmdump(work / "mitmdump-lazy", "--set",
                                       "connection_strategy=lazy", "--set",
                                       "stream_large_bodies=1m"), "mitmdump lazy", "127.0.0.1")
        passthrough = started(*start_mitmdump(work / "mitmdump-pass", "--ignore-hosts", ".*"),
                              "mitmdump passthrough", "127.0.0.1")
        intercept = started(*start_mitmdump(work / "mitmdump-intercept", "--set",
                                            f"ssl_verify_upstream_trusted_ca={ca_file}",
                                            ca=proxy_ca),
                            "mitmdump, full interception", "127.0.0.1")
        squid = started(*start_squid(work / "squid"), "squid", "127.0.0.1")
        # what agent-egress does on every request (an audit line) squid does with its access log;
        # the targets stay against squid without one, this row says what the log costs squid
        logging = started(*start_squid(work / "squid-logging", options=(
            f"access_log stdio:{work / 'squid-logging' / 'access.log'}")),
            "squid, access log", "127.0.0.1")
        bumps = [dataclasses.replace(started(*start_squid_bump(
            work / "squid-bump", proxy_ca, ca_file, bump_address), "squid ssl-bump",
            INSPECT_NAME), origin_port=443)] if bumping else []
        direct = Route("direct", None, 0, HTTP_NAME)
        nginx.wait_for_port(http_port)
        proxies = (named, workers, on_asyncio, no_fast_requests, credentialed, addon, mitm, lazy,
                   passthrough, intercept, squid, logging, *bumps)
        for route in proxies:
            assert route.proxy is not None
            route.proxy.wait_for_port(route.port)
        tls, tls_workers, tls_addon = (dataclasses.replace(r, host=TLS_NAME)
                                       for r in (named, workers, addon))

        def seconds(warm: bool) -> int:
            return settings.warm_up if warm else settings.seconds

        def plain(route: Route, warm: bool = False) -> Result:
            return wrk(route, http_port, "/", CONNECTIONS, seconds(warm), work)

        def tunnels(route: Route, warm: bool = False) -> Result:
            return hey_tunnels(route, https_port, seconds(warm))

        def bulk(route: Route, warm: bool = False) -> Result:
            return curl_bulk(route, https_port, 1 if warm else settings.downloads)

        def memory(route: Route, warm: bool = False) -> Result:
            return peak_rss(route, http_port, seconds(warm), work)

        def offered(route: Route, warm: bool = False) -> Result:
            return hey_offered(route, http_port, seconds(warm))

        def inspected(route: Route, warm: bool = False) -> Result:
            return hey_inspected(route, https_port, seconds(warm))

        def new_inspected(route: Route, warm: bool = False) -> Result:
            return hey_inspected(route, https_port, seconds(warm), keep_alive=False)

        inspecting = dataclasses.replace(named, host=INSPECT_NAME)
        inspecting_workers = dataclasses.replace(workers, host=INSPECT_NAME)
        injecting = dataclasses.replace(credentialed, label="agent-egress, credential injected",
                                        host=INJECT_NAME)

        scenarios = {
            "(a) plain HTTP keep-alive, 32 connections": (
                "req/s", [direct, named, literal, workers, on_asyncio, no_fast_requests, addon,
                          mitm, lazy, squid, logging], plain, "mitmdump lazy"),
            "(b) new CONNECT + TLS + GET, 32 at once": (
                "req/s", [direct, tls, tls_workers, tls_addon, passthrough, squid], tunnels,
                "mitmdump passthrough"),
            f"(c) {BULK // 1_000_000} MB over HTTPS, passed through": (
                "MB/s", [direct, tls, tls_workers, tls_addon, passthrough, squid], bulk,
                "mitmdump passthrough"),
            "(d) 10 MiB bodies, 8 connections": (
                "MB/s", [named, literal, mitm, lazy, squid], memory, "mitmdump lazy"),
            "(e) inspected HTTPS keep-alive, 32 connections": (
                "req/s", [inspecting, inspecting_workers, credentialed, injecting, intercept,
                          *bumps], inspected,
                "mitmdump, full interception"),
            f"(f) plain HTTP keep-alive offered at {OFFERED:,} req/s": (
                "req/s", [direct, named, workers, lazy, squid, logging], offered,
                "mitmdump lazy"),
            "(g) new inspected connections: CONNECT + TLS to the proxy + GET, 32 at once": (
                "req/s", [direct, inspecting, inspecting_workers, intercept, *bumps],
                new_inspected,
                "mitmdump, full interception"),
        }
        watch = CpuWatch([nginx.pid] + [r.proxy.pid for r in proxies if r.proxy])
        done: dict[str, tuple[dict[str, Result], str]] = {}
        for name, (unit, routes, measure, reference) in scenarios.items():
            if name[1] not in args.only:
                continue
            print(f"## {name}", flush=True)
            results = {}
            for route in routes:
                for _ in range(2):  # retaken once if something else ran meanwhile
                    watch.wait_quiet()
                    measure(route, True)
                    watch.start()
                    cpu = process_cpu(route.proxy.pid) if route.proxy else 0.0
                    results[route.label] = measure(route)
                    results[route.label].others = watch.stop()
                    if route.proxy and unit == "req/s":
                        served = results[route.label].rate * settings.seconds
                        results[route.label].cpu_us = (
                            (process_cpu(route.proxy.pid) - cpu) / served * 1e6 if served else None)
                    if results[route.label].others < BUSY:
                        break
                print(f"  {route.label}: {results[route.label]}", flush=True)
            done[name] = results, reference
            print(f"\n{report(name, unit, results, reference)}\n", flush=True)
        print(verdicts(done))
        print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for name, route, load in (("a", named, plain), ("b", tls, tunnels), ("c", tls, bulk)):
                summary = profile(route, settings.seconds, args.profile / f"{name}.txt", load)
                print(f"\n### py-spy, agent-egress under ({name})\n\n{summary}")


if __name__ == "__main__":
    main()
