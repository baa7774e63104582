"""`agent-egress run`: mitmproxy in this process with the project's addons, until a signal."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import sys
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from mitmproxy import certs, options
from mitmproxy.addons import core, next_layer, proxyauth, proxyserver, tlsconfig
from mitmproxy.master import Master

from .addons.enforce import Enforcer
from .audit import AuditLog
from .identity import SocketOwners
from .runtime import EMBEDDED_POLICY, PolicyHolder, Runtime
from .upstream import DnsServers, SystemResolver, parse_server

log = logging.getLogger(__name__)

CA_BASENAME = "mitmproxy"


class StartupError(Exception):
    """A reason not to start, for the user; the process exits 2."""


@dataclass(frozen=True)
class RunConfig:
    policy: Path | None
    proxy: tuple[str, int]
    audit_log: Path | None  # None: standard output
    upstream_dns: tuple[str, ...]
    proxy_auth: Path | None
    state_dir: Path
    upstream_ca: Path | None


def parse_listen(text: str, default_port: int) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT`, `PORT` or `[V6]:PORT`, host an address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.isdigit():
        host, port_text = "127.0.0.1", text
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    host = host or "127.0.0.1"
    try:
        ip_address(host)
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise StartupError(
            f"{text!r}: expected ADDRESS:PORT, like 127.0.0.1:{default_port}") from None
    if not 0 <= port < 65536:
        raise StartupError(f"{text!r}: port out of range")
    return host, port


def check_listener(address: tuple[str, int], proxy_auth: Path | None) -> None:
    if not ip_address(address[0]).is_loopback and proxy_auth is None:
        raise StartupError(f"refusing to listen on {address[0]}, which is not loopback, "
                           "without --proxy-auth: anyone who reaches it would use this "
                           "machine's egress")


def prepare_state_dir(state_dir: Path) -> Path:
    """Creates the state directory owner-only and the CA in it, once, under a lock: several
    mitmproxy processes creating one CA at the same time race and crash."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    confdir = state_dir / "mitmproxy"
    confdir.mkdir(exist_ok=True, mode=0o700)
    os.chmod(confdir, 0o700)
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        certs.CertStore.from_store(confdir, CA_BASENAME, 2048)
    return confdir


def ca_certificate(state_dir: Path) -> Path:
    return state_dir / "mitmproxy" / f"{CA_BASENAME}-ca-cert.pem"


class _Listening:
    """Reports the listeners once they are up, or stops when one failed to bind."""

    def __init__(self, announce: str, failed: asyncio.Event) -> None:
        self.announce = announce
        self.failed = failed

    def running(self) -> None:
        from mitmproxy import ctx

        server = ctx.master.addons.get("proxyserver")
        addresses = server.listen_addrs()
        if not addresses:
            errors = [str(s.last_exception) for s in server.servers if s.last_exception]
            print(f"agent-egress: cannot listen: {'; '.join(errors) or 'unknown error'}",
                  file=sys.stderr)
            self.failed.set()
            ctx.master.shutdown()
            return
        host, port = addresses[0][:2]
        print(f"agent-egress: proxy listening on {_format(host, port)}\n{self.announce}",
              flush=True)


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(config: RunConfig) -> int:
    check_listener(config.proxy, config.proxy_auth)
    confdir = prepare_state_dir(config.state_dir)
    policies = PolicyHolder(config.policy)
    if config.upstream_dns:
        try:
            resolver: SystemResolver | DnsServers = DnsServers(
                [parse_server(s) for s in config.upstream_dns])
        except ValueError as e:
            raise StartupError(f"--upstream-dns: {e}") from None
    else:
        resolver = SystemResolver()
    audit = AuditLog(config.audit_log)
    owners = SocketOwners()
    runtime = Runtime(policies, audit, resolver, owners)
    failed = asyncio.Event()
    announce = (
        f"agent-egress: policy {config.policy or EMBEDDED_POLICY} "
        f"({policies.current.digest}), accounts: "
        f"{', '.join(policies.current.accounts()) or 'none'}\n"
        f"agent-egress: audit log {config.audit_log or 'standard output'}; CA for inspected "
        f"HTTPS {ca_certificate(config.state_dir)}")

    opts = options.Options()
    master = Master(opts)
    enforcer = Enforcer(runtime)
    # Order matters: proxy authentication before the policy (which reads its result); the
    # policy before Proxyserver (whose self-connect guard must see the pinned address) and
    # before NextLayer (so that it can take pass-through tunnels first).
    master.addons.add(core.Core(), proxyauth.ProxyAuth(), enforcer, proxyserver.Proxyserver(),
                      next_layer.NextLayer(), tlsconfig.TlsConfig(), _Listening(announce, failed))
    settings: dict[str, object] = {
        "mode": [f"regular@{_format(*config.proxy)}"],
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

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.shutdown)
    loop.add_signal_handler(signal.SIGHUP, policies.reload)
    loop.add_signal_handler(signal.SIGUSR1, audit.reopen)
    watcher = asyncio.create_task(policies.watch())
    try:
        await master.run()
    finally:
        watcher.cancel()
        await master.addons.get("proxyserver").servers.update([])
        audit.close()
        owners.close()
        enforcer.done()
    return 1 if failed.is_set() else 0
