"""`agent-egress run`: mitmproxy in this process with the project's addons, until a signal."""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import gc
import grp
import json
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from ipaddress import ip_address
from pathlib import Path
from typing import IO, Any

from dnslib import DNSRecord
from mitmproxy import certs, options
from mitmproxy.addons import core, proxyserver, tlsconfig
from mitmproxy.master import Master

from . import ocsf
from .addons.enforce import Enforcer
from .addons.fastpath import ExplicitListener
from .addons.limits import RequestHeadLimits, raise_open_file_limit
from .addons.nextlayer import ClientFirstNextLayer
from .addons.proxyauth import ProxyAuthenticator
from .addons.tlsterminate import Certificates, Inspection, upstream_context
from .audit import AuditLog
from .control import Control, ControlError, open_control
from .dns.resolver import PolicyResolver
from .dns.server import DnsServer
from .filetrust import untrusted_reason
from .gate import Gate
from .identity import SocketOwners
from .metrics import Metrics
from .nftables import governed_accounts
from .rules import Policy, parse_port, split_host_port
from .runtime import EMBEDDED_POLICY, PolicyHolder, Runtime, UntrustedPolicy
from .upstream import DnsServers, SystemResolver, parse_server, system_dns_servers
from .workerpool import WithWorkers, WorkerPool, bind_shared

log = logging.getLogger(__name__)

CA_BASENAME = "mitmproxy"
STATE_DIR_MODE = 0o711


class StartupError(Exception):
    """A reason not to start, for the user; the process exits 2."""


@dataclass(frozen=True)
class RunConfig:
    policy: Path | None
    proxy: tuple[str, int] | None  # None: no proxy
    transparent: tuple[str, int] | None  # None: no transparent listener
    dns: tuple[str, int] | None  # None: no resolver
    metrics: tuple[str, int] | None  # None: no /metrics endpoint
    audit_log: Path | None  # None: standard output
    upstream_dns: tuple[str, ...]
    proxy_auth: Path | None
    state_dir: Path
    upstream_ca: Path | None
    on_audit_failure: str = "deny"
    workers: int = 1  # processes accepting on the explicit proxy listener
    audit_format: str = "jsonl"  # or "ocsf" (ocsf.FORMATS)
    control: str | None = None  # the control socket's path; None: off
    control_default: bool = False  # the path is the default one: failing to use it warns
    operators: str | None = None
    notify: str | None = None
    request_lifetime: float = 24 * 3600.0
    loop: str = "asyncio"  # the event loop: asyncio's or uvloop (see event_loop)

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v
                           for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        fields = json.loads(text)
        for key in ("policy", "audit_log", "proxy_auth", "state_dir", "upstream_ca"):
            fields[key] = None if fields[key] is None else Path(fields[key])
        for key in ("proxy", "transparent", "dns", "metrics", "upstream_dns"):
            fields[key] = None if fields[key] is None else tuple(fields[key])
        return cls(**fields)


def event_loop(choice: str) -> str:
    """`run --loop`: "auto" is uvloop where it is installed, else asyncio's own loop."""
    if choice == "asyncio":
        return choice
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise StartupError("--loop uvloop: uvloop is not installed (install "
                               "agent-egress[uvloop], or use --loop asyncio)") from None
        return "asyncio"
    return "uvloop"


def settle_heap() -> None:
    """Called once serving: what start-up built (mitmproxy, the policy and its index) is moved
    out of the collector's sight (gc.freeze). Each full collection walked all of it, a 48 ms
    pause of every connection (p99 under load 41 ms, 8 ms without); the young generation's
    collections stay small and short (0.15 ms; a larger threshold made fewer but 2 ms long)."""
    gc.collect()
    gc.freeze()


def run_loop(main: Coroutine[Any, Any, int], loop: str) -> int:
    """Runs `main` on the event loop `event_loop` chose."""
    if loop == "uvloop":
        import uvloop

        return asyncio.run(main, loop_factory=uvloop.new_event_loop)
    return asyncio.run(main)


def with_control(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    """`config` with `run`'s flags for the control socket (control.py); raises
    StartupError."""
    from .loginenv import default_control_path
    from .notify import check_url
    from .policyedit import parse_duration

    try:
        lifetime = parse_duration(args.request_lifetime).total_seconds()
        notify = check_url(args.notify) if args.notify else None
    except ValueError as e:
        raise StartupError(str(e)) from None
    if args.operators:
        try:
            grp.getgrnam(args.operators)
        except KeyError:
            raise StartupError(f"--operators {args.operators}: no such group") from None
    control = None if args.control == "off" else args.control or str(default_control_path())
    return replace(config, control=control, control_default=not args.control,
                   operators=args.operators, notify=notify, request_lifetime=lifetime)


async def start_control(config: RunConfig, gate: Gate) -> Control | None:
    """The control socket, or None when it is off. A default path that cannot be used is a
    warning (the proxy runs without it, and ask mode denies as enforce does); a path given
    with --control that cannot be used stops the start."""
    if config.control is None:
        return None
    try:
        return await open_control(gate, Path(config.control), config.operators, config.notify,
                                  config.request_lifetime)
    except ControlError as e:
        if not config.control_default:
            raise StartupError(str(e)) from None
        log.warning("%s; running without a control socket", e)
        return None


def parse_listen(text: str, default_port: int) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT`, `PORT` or `[V6]:PORT`, host an address."""
    try:
        host, port_text = ("", text) if text.isdigit() else split_host_port(text)
        host = host or "127.0.0.1"
        ip_address(host)
        port = parse_port(port_text, lowest=0) if port_text else default_port
    except ValueError:
        raise StartupError(
            f"{text!r}: expected ADDRESS:PORT, like 127.0.0.1:{default_port}") from None
    return host, port


def check_listener(address: tuple[str, int], proxy_auth: Path | None) -> None:
    if not ip_address(address[0]).is_loopback and proxy_auth is None:
        raise StartupError(f"refusing to listen on {address[0]}, which is not loopback, "
                           "without --proxy-auth: anyone who reaches it would use this "
                           "machine's egress")


def check_tamper(paths: list[Path], policy: Policy) -> list[str]:
    """Refuses to start when an account the policy governs could rewrite the policy or the CA
    key (it would widen its own allowlist), or anything on the way to them; returns warnings
    for what is merely loose."""
    governed = governed_accounts(policy)
    warnings = []
    if os.getuid() in governed:
        warnings.append(f"agent-egress runs as uid {os.getuid()}, which account "
                        f"{governed.pop(os.getuid())} governs: that account owns the policy "
                        "and the CA key; run agent-egress as its own user")
    for path in paths:
        try:
            reason = untrusted_reason(path, governed)
            st = path.stat()
        except OSError:
            continue
        if reason is not None:
            raise StartupError(reason)
        if st.st_mode & stat.S_IWGRP:
            warnings.append(f"{path} is writable by its group (gid {st.st_gid}); make sure no "
                            "governed account is in it")
    return warnings


def prepare_state_dir(state_dir: Path) -> Path:
    """Creates the state directory and the CA in it, once, under a lock: several mitmproxy
    processes creating one CA at the same time race and crash. Others may pass through the
    directory but not list it: what is in it is owner-only (the CA's key, in an owner-only
    directory of its own; the audit log) except the CA bundle that `agent-egress env` writes
    for the governed accounts' clients."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
    os.chmod(state_dir, STATE_DIR_MODE)
    confdir = state_dir / "mitmproxy"
    confdir.mkdir(exist_ok=True, mode=0o700)
    os.chmod(confdir, 0o700)
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        certs.CertStore.from_store(confdir, CA_BASENAME, 2048)
    return confdir


def ca_certificate(state_dir: Path) -> Path:
    return state_dir / "mitmproxy" / f"{CA_BASENAME}-ca-cert.pem"


class Listening:
    """Learns where each proxy mode listens once they are up, or that one could not bind."""

    def __init__(self) -> None:
        self.addresses: asyncio.Future[dict[str, tuple[str, int]] | None] = (
            asyncio.get_running_loop().create_future())

    def running(self) -> None:
        from mitmproxy import ctx

        bound = {}
        errors = []
        for server in ctx.master.addons.get("proxyserver").servers:
            if server.listen_addrs:
                bound[server.mode.type_name] = server.listen_addrs[0][:2]
            else:
                errors.append(f"{server.mode.full_spec}: {server.last_exception}")
        if errors:
            print(f"agent-egress: cannot listen: {'; '.join(errors)}", file=sys.stderr)
        if not self.addresses.done():
            self.addresses.set_result(None if errors else bound)


def check_free(config: RunConfig) -> None:
    """Refuses, in one line naming the flag, a listener address another process holds, before
    anything starts (mitmproxy's own failure to bind is several lines of its internals)."""
    listeners = [("--proxy", config.proxy, False, True), ("--dns", config.dns, True, True),
                 ("--metrics", config.metrics, False, True),
                 ("--transparent", config.transparent, False, False)]
    for flag, address, udp, can_be_off in listeners:
        if address is None or address[1] == 0:
            continue
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,):
            with socket.socket(family, kind) as probe:
                # as the servers bind: a closed connection's TIME_WAIT is not a conflict
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                except OSError as e:
                    what = "address in use" if e.errno == errno.EADDRINUSE else e.strerror
                    raise StartupError(f"{flag} {_format(*address)}: {what} (use {flag} ADDR"
                                       f"{' or off' if can_be_off else ''})") from None


def lock_instance(path: Path, what: str) -> IO[str]:
    """Holds `path` locked for as long as this process runs: a second agent-egress on the same
    state directory or audit log is refused (they would interleave one CA's files and one
    log's lines). The kernel releases the lock when the process ends, however it ends."""
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise StartupError(f"another agent-egress ({holder}) runs with the {what}; stop it "
                           "first, or give this one its own --state-dir and --audit-log") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    return lock


async def warn_unanswered(servers: list[tuple[str, int]], wait: float = 2.0) -> None:
    """Warns, at start, of an --upstream-dns server that does not answer: every name the proxy
    resolves through it would fail, and the first sign would be clients' 502s."""
    query = DNSRecord.question(".", "NS").pack()

    async def probe(server: tuple[str, int]) -> None:
        try:
            await DnsServers([server], timeout=wait).exchange(query)
        except Exception:  # noqa: BLE001 - whatever kept it from answering, the warning is the same
            log.warning("--upstream-dns %s does not answer (asked for the root's NS records, "
                        "waited %s s): names the proxy resolves through it will fail",
                        _format(*server), wait)

    await asyncio.gather(*(probe(server) for server in servers))


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _upstream_servers(config: RunConfig) -> list[tuple[str, int]]:
    try:
        return [parse_server(s) for s in config.upstream_dns]
    except ValueError as e:
        raise StartupError(f"--upstream-dns: {e}") from None


def runtime_for(config: RunConfig, policies: PolicyHolder, audit: AuditLog) -> Runtime:
    metrics = Metrics()
    metrics.watch(policies, audit)
    servers = _upstream_servers(config)
    return Runtime(policies, audit, DnsServers(servers) if servers else SystemResolver(),
                   SocketOwners(config.transparent[1] if config.transparent else None), metrics,
                   on_audit_failure=config.on_audit_failure)


def master_for(config: RunConfig, confdir: Path, enforcer: Enforcer, listening: Listening,
               accept_on: socket.socket | None = None) -> Master:
    """`accept_on`: a socket bound beforehand that the explicit proxy accepts on."""
    opts = options.Options()
    master = Master(opts)
    # Order matters: proxy authentication before the policy (which reads its result); the
    # policy before Proxyserver (whose self-connect guard must see the pinned address) and
    # before NextLayer (so that it can take pass-through tunnels first).
    tls = tlsconfig.TlsConfig()
    master.addons.add(core.Core(), ProxyAuthenticator(), enforcer, proxyserver.Proxyserver(),
                      ClientFirstNextLayer(), RequestHeadLimits(), tls, listening)
    if config.proxy is not None:
        # allowed HTTPS tunnels skip mitmproxy's layers, inspected ones with certificates from
        # mitmproxy's store; not with proxy authentication, which mitmproxy checks
        inspection = Inspection(Certificates(lambda: tls.certstore),
                                upstream_context(config.upstream_ca))
        master.addons.add(ExplicitListener(master.addons.get("proxyserver").servers,
                                           enforcer.gate, accept_on,
                                           fast=config.proxy_auth is None,
                                           inspection=inspection))
    modes = [f"regular@{_format(*config.proxy)}"] if config.proxy else []
    if config.transparent:
        modes.append(f"transparent@{_format(*config.transparent)}")
    settings: dict[str, object] = {
        "mode": modes,
        "confdir": str(confdir),
        "connection_strategy": "lazy",
        "stream_large_bodies": "1m",
        "ssl_insecure": False,
    }
    if config.proxy_auth is not None:
        settings["proxyauth"] = f"@{config.proxy_auth}"
    if config.upstream_ca is not None:
        settings["ssl_verify_upstream_trusted_ca"] = str(config.upstream_ca)
    opts.update(**settings)
    return master


async def serve(config: RunConfig) -> int:
    if config.proxy is None and config.transparent is None and config.dns is None:
        raise StartupError("nothing to run: --proxy and --dns are off")
    if config.workers > 1 and config.proxy is None:
        raise StartupError("--workers needs the explicit proxy (--proxy)")
    for address in (config.proxy, config.transparent):
        if address is not None:
            check_listener(address, config.proxy_auth)
    for what, address in (("DNS", config.dns), ("metrics", config.metrics)):
        if address is not None and not ip_address(address[0]).is_loopback:
            raise StartupError(f"refusing to serve {what} on {address[0]}, which is not "
                               "loopback: it has no authentication")
    servers = _upstream_servers(config)
    check_free(config)
    raise_open_file_limit()
    confdir = prepare_state_dir(config.state_dir)
    locks = [lock_instance(config.state_dir / "run.lock", f"state directory {config.state_dir}")]
    if config.audit_log is not None:
        locks.append(lock_instance(config.audit_log.with_name(f".{config.audit_log.name}.lock"),
                                   f"audit log {config.audit_log}"))
    try:
        policies = PolicyHolder(config.policy)
    except UntrustedPolicy as e:
        raise StartupError(str(e)) from None
    guarded = [config.state_dir, confdir / f"{CA_BASENAME}-ca.pem"]
    if config.policy is not None:
        guarded += [config.policy, config.policy.resolve().parent]
    for warning in check_tamper(guarded, policies.current):
        log.warning("%s", warning)
    audit = AuditLog(config.audit_log, ocsf.formatter(config.audit_format))
    runtime = runtime_for(config, policies, audit)
    pool = WorkerPool(config, audit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _both, policies.request_reload, pool.signal,
                            signal.SIGHUP)

    def reopen_audit() -> None:
        audit.reopen()
        log.info("audit log reopened (SIGUSR1): %s", config.audit_log or "standard output")

    loop.add_signal_handler(signal.SIGUSR1, _both, reopen_audit, pool.signal, signal.SIGUSR1)
    watcher = asyncio.create_task(policies.watch())
    probes = asyncio.create_task(warn_unanswered(servers)) if servers else None
    gate = Gate(runtime)
    enforcer = Enforcer(gate)
    controlling: Control | None = None
    dns_server: DnsServer | None = None
    master: Master | None = None
    proxy_task: asyncio.Task[None] | None = None
    metrics_server = None
    shared: list[socket.socket] = []
    try:
        lines = []
        controlling = await start_control(config, gate)
        if controlling is not None:
            who = ", ".join(["root", *([f"group {config.operators}"] if config.operators else [])])
            lines.append(f"control socket {config.control} (operators: {who})")
        if config.metrics is not None:
            try:
                metrics_server = runtime.metrics.serve(
                    config.metrics, WithWorkers(runtime.metrics.registry, pool)
                    if config.workers > 1 else None)
            except OSError as e:
                print(f"agent-egress: cannot listen for metrics on {_format(*config.metrics)}: "
                      f"{e.strerror}", file=sys.stderr)
                return 1
            host, port = metrics_server.server_address[:2]
            lines.append(f"metrics on http://{_format(str(host), port)}/metrics")
        if config.dns is not None:
            upstream = DnsServers(servers or system_dns_servers())
            dns_server = DnsServer(PolicyResolver(gate, upstream))
            try:
                resolver_address = await dns_server.start(*config.dns)
            except OSError as e:
                print(f"agent-egress: cannot listen for DNS on {_format(*config.dns)}: "
                      f"{e.strerror}", file=sys.stderr)
                return 1
            lines.append(f"resolver listening on {_format(*resolver_address)} (UDP and TCP), "
                         f"forwarding to {', '.join(_format(*s) for s in upstream.servers)}")
        if config.proxy is not None or config.transparent is not None:
            if config.proxy is not None and config.workers > 1:
                try:
                    shared = bind_shared(config.proxy, config.workers)
                except OSError as e:
                    print(f"agent-egress: cannot listen on {_format(*config.proxy)}: "
                          f"{e.strerror}", file=sys.stderr)
                    return 1
            listening = Listening()
            master = master_for(config, confdir, enforcer, listening,
                                shared[0] if shared else None)
            proxy_task = asyncio.create_task(master.run())
            bound = await listening.addresses
            if not bound:
                return 1
            if shared:
                try:
                    await pool.start(shared[1:])
                except RuntimeError as e:
                    print(f"agent-egress: {e}", file=sys.stderr)
                    return 1
            if "transparent" in bound:
                lines.insert(0, f"transparent proxy listening on "
                                f"{_format(*bound['transparent'])}")
            if "regular" in bound:
                processes = f" ({config.workers} processes)" if shared else ""
                lines.insert(0, f"proxy listening on {_format(*bound['regular'])}{processes}")
        lines.append(f"policy {config.policy or EMBEDDED_POLICY} ({policies.current.digest}), "
                     f"accounts: {', '.join(policies.current.accounts()) or 'none'}")
        form = " (OCSF)" if config.audit_format == "ocsf" else ""
        lines.append(f"audit log {config.audit_log or 'standard output'}{form}; CA for inspected "
                     f"HTTPS {ca_certificate(config.state_dir)}")
        print("\n".join(f"agent-egress: {line}" for line in lines), flush=True)
        settle_heap()
        waits = [asyncio.create_task(stop.wait())] + ([proxy_task] if proxy_task else [])
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return 0
    finally:
        watcher.cancel()
        if probes is not None:
            probes.cancel()
        for lock in locks:
            lock.close()
        for sock in shared[1:]:
            sock.close()  # the workers' when start-up failed before them (twice is harmless)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        await pool.stop()
        if master is not None and proxy_task is not None:
            await stop_proxy(master, proxy_task)
        if dns_server is not None:
            await dns_server.stop()
        if controlling is not None:
            await controlling.stop()
        audit.close()
        if runtime.owners is not None:
            runtime.owners.close()
        enforcer.done()


async def stop_proxy(master: Master, running: asyncio.Task[None]) -> None:
    master.shutdown()
    await running
    await master.addons.get("proxyserver").servers.update([])
    if (explicit := master.addons.get("explicitlistener")) is not None:
        await explicit.close_tunnels()
    await _close_connections(master.addons.get("proxyserver"))


def _both(here: Callable[[], object], workers: Callable[[int], None], signum: int) -> None:
    here()
    workers(signum)


async def _close_connections(server: proxyserver.Proxyserver, wait: float = 5.0) -> None:
    """Closes the clients' connections that are still open, as mitmproxy's idle timeout does,
    and waits for their last hooks: left open, they would go on being served after the audit
    log is closed, their events lost."""
    for handler in list(server.connections.values()):
        client = handler.transports.get(handler.client)
        if client is not None and client.handler is not None:
            client.handler.cancel("agent-egress is stopping")
    try:
        async with asyncio.timeout(wait):
            # mitmproxy drops a connection from this registry after its last hook and signals
            # nothing when it does: there is no event to await, so a short poll, bounded above.
            while server.connections:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        log.warning("%d connections still open %s s after closing; stopping anyway",
                    len(server.connections), wait)
