"""The network namespace and local users that the transparent-mode tests and benchmark use."""

from __future__ import annotations

import pwd
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.netns_servers import FOREIGN, NAMESERVER, ORIGIN, SSH


def system_user(name: str) -> pwd.struct_passwd:
    """A local system user without a home or a shell, created if missing (needs root)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


@contextmanager
def namespace(name: str) -> Iterator[str]:
    """A namespace whose servers' addresses (documentation ranges) are local to it, with a
    resolv.conf naming its DNS server. Removed on exit."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    resolv = Path("/etc/netns") / name
    try:
        # a veth pair with both ends inside: an interface for addresses local to the namespace
        for command in (("link", "set", "lo", "up"),
                        ("link", "add", "d0", "type", "veth", "peer", "name", "d1"),
                        ("link", "set", "d0", "up"), ("link", "set", "d1", "up"),
                        *(("addr", "add", f"{a}/32", "dev", "d0")
                          for a in (ORIGIN, SSH, FOREIGN, NAMESERVER)),
                        ("addr", "add", "2001:db8::10/128", "dev", "d0", "nodad")):
            subprocess.run(["ip", "-n", name, *command], check=True, capture_output=True)
        resolv.mkdir(parents=True, exist_ok=True)
        (resolv / "resolv.conf").write_text(f"nameserver {NAMESERVER}\n")
        yield name
    finally:
        shutil.rmtree(resolv, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", name], check=False)
