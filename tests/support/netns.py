"""The network namespaces and local users that the transparent-mode tests and benchmarks use.

Two shapes. `namespace`: one namespace where the far side's addresses are local (the proxy's
original routes go through `lo`). `routed`: a devbox as they really are, where the proxy and
the agent account live in one namespace whose default routes (IPv4 and IPv6) lead through a
veth pair to a second namespace holding the far side: origins, the upstream DNS server, and
what an attacker would aim at (metadata, private ranges, an SSH server, IPv6 origins)."""

from __future__ import annotations

import pwd
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from support.netns_servers import FAR_SIDE, NAMESERVER

# the devbox's link to the outside world: a /24 and a /64 from documentation ranges
DEVBOX_ADDRESS, GATEWAY = "192.0.2.2", "192.0.2.1"
DEVBOX_ADDRESS6, GATEWAY6 = "2001:db8:ffff::2", "2001:db8:ffff::1"


def system_user(name: str) -> pwd.struct_passwd:
    """A local system user without a home or a shell, created if missing (needs root)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


def ip(namespace: str, *command: str) -> None:
    subprocess.run(["ip", "-n", namespace, *command], check=True, capture_output=True)


@contextmanager
def _bare(name: str) -> Iterator[str]:
    """A new namespace with `lo` up; removed on exit with everything inside it."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip(name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextmanager
def _resolv_conf(name: str) -> Iterator[None]:
    """`ip netns exec` mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf."""
    resolv = Path("/etc/netns") / name
    resolv.mkdir(parents=True, exist_ok=True)
    try:
        (resolv / "resolv.conf").write_text(f"nameserver {NAMESERVER}\n")
        yield
    finally:
        shutil.rmtree(resolv, ignore_errors=True)


def _add_far_side(name: str, device: str) -> None:
    for address in FAR_SIDE:
        prefix = 32 if ":" not in address else 128
        ip(name, "addr", "add", f"{address}/{prefix}", "dev", device,
           *(("nodad",) if prefix == 128 else ()))


@contextmanager
def namespace(name: str) -> Iterator[str]:
    """A namespace whose far-side addresses (FAR_SIDE) are local to it, with a resolv.conf
    naming its DNS server. Removed on exit."""
    with _bare(name), _resolv_conf(name):
        # a veth pair with both ends inside: an interface for addresses local to the namespace
        ip(name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ip(name, "link", "set", "d0", "up")
        ip(name, "link", "set", "d1", "up")
        _add_far_side(name, "d0")
        yield name


@dataclass(frozen=True)
class Routed:
    devbox: str  # the proxy and the agent account: lo, and eth0 with the default routes
    outside: str  # the far side, reached only through the devbox's gateway


@contextmanager
def routed(name: str) -> Iterator[Routed]:
    """The devbox namespace `name` and the outside `name`-out, joined by a veth pair: the
    devbox has 192.0.2.2/24 and 2001:db8:ffff::2/64 on eth0 with default routes through
    the outside's end, which holds every far-side address (FAR_SIDE) itself. The devbox's
    resolv.conf names the far side's DNS server. Removed on exit."""
    with ExitStack() as stack:
        devbox = stack.enter_context(_bare(name))
        outside = stack.enter_context(_bare(f"{name}-out"))
        stack.enter_context(_resolv_conf(devbox))
        ip(devbox, "link", "add", "eth0", "type", "veth", "peer", "name", "uplink", "netns",
           outside)
        for namespace_, device, address, address6 in (
                (devbox, "eth0", DEVBOX_ADDRESS, DEVBOX_ADDRESS6),
                (outside, "uplink", GATEWAY, GATEWAY6)):
            ip(namespace_, "addr", "add", f"{address}/24", "dev", device)
            ip(namespace_, "addr", "add", f"{address6}/64", "dev", device, "nodad")
            ip(namespace_, "link", "set", device, "up")
        ip(devbox, "route", "add", "default", "via", GATEWAY)
        ip(devbox, "-6", "route", "add", "default", "via", GATEWAY6)
        _add_far_side(outside, "lo")
        yield Routed(devbox, outside)
