"""What every toolchain reader of `agent-egress discover` shares: reading a file or running a
command without ever failing, turning URLs into destinations, and collecting them per preset.

Registry endpoints are never built in: they come from the user's files, environment and the
toolchains' own reports, so the presets say what this machine is configured to use.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent_egress.rules import HostError, Name, normalize_host
from agent_egress.rules.suffixes import is_icann_suffix

SCHEME_PORTS = {"http": 80, "https": 443, "ssh": 22, "git": 9418, "ftp": 21}
# Schemes that name something on this machine: nothing to allow through the proxy.
LOCAL_SCHEMES = frozenset({"file", "unix", "npipe", "cdrom", "copy"})
WEB_PORTS = (80, 443)
MAX_FILE_BYTES = 1 << 20
COMMAND_TIMEOUT = 30.0
MAX_SOURCES_SHOWN = 3


class LocalEndpoint(Exception):
    """A URL or path that stays on this machine (file:, a unix socket, loopback)."""


@dataclass
class Entry:
    """One destination of a preset: a host (name or `*.` pattern) or an address as a cidr."""

    target: str
    is_cidr: bool
    ports: set[int]
    sources: list[str] = field(default_factory=list)

    def comment(self) -> str:
        shown = self.sources[:MAX_SOURCES_SHOWN]
        more = len(self.sources) - len(shown)
        text = "; ".join(shown) + (f"; and {more} more" if more else "")
        # An address in a registry setting is easy to miss and may be internal: say so.
        return f"IP address: {text}" if self.is_cidr else text


@dataclass
class Discovery:
    """The machine being read (home, root, repositories, environment) and what was found."""

    home: Path
    root: Path
    repos: Sequence[Path]
    env: Mapping[str, str]
    presets: dict[str, dict[str, Entry]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    # Collecting

    def skip(self, what: object, reason: str) -> None:
        self.skipped.append(f"{what}: {reason}")

    def add_url(self, preset: str, url: str, source: str) -> None:
        """Adds the host and port that fetching `url` connects to."""
        try:
            host, port = url_endpoint(url)
        except LocalEndpoint:
            return
        except ValueError as e:
            self.skip(source, f"{redact(url)!r}: {e}")
            return
        self.add_host(preset, host, [port], source)

    def add_host(self, preset: str, host: str, ports: Iterable[int], source: str) -> None:
        """Adds a host (a name, `*.name` or an address) with the ports it is reached on."""
        try:
            target, is_cidr = host_target(host)
        except LocalEndpoint:
            return
        except ValueError as e:
            self.skip(source, str(e))
            return
        entries = self.presets.setdefault(preset, {})
        entry = entries.setdefault(target, Entry(target, is_cidr, set()))
        entry.ports.update(ports)
        if source not in entry.sources:
            entry.sources.append(source)

    # Reading, never raising: whatever cannot be read is reported and left out

    def read_bytes(self, path: Path) -> bytes | None:
        """The file's content; None, silently, when it does not exist."""
        try:
            if not path.exists():
                return None
            # A FIFO or device would block or never end; configuration is a regular file.
            if not path.is_file():
                self.skip(path, "not a regular file")
                return None
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            self.skip(path, e.strerror or str(e))
            return None
        if len(data) > MAX_FILE_BYTES:
            self.skip(path, f"larger than {MAX_FILE_BYTES} bytes")
            return None
        return data

    def read_text(self, path: Path) -> str | None:
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            self.skip(path, f"not UTF-8 text ({e.reason} at byte {e.start})")
            return None

    def read_json(self, path: Path) -> Any:
        text = self.read_text(path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            self.skip(path, f"invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})")
            return None

    def run(self, argv: Sequence[str], extra_env: Mapping[str, str]) -> str | None:
        """The output of a toolchain's command found on the environment's PATH; None when the
        toolchain is not installed or the command fails (reported)."""
        program = shutil.which(argv[0], path=self.env.get("PATH", ""))
        if program is None:
            return None
        command = f"command `{' '.join(argv)}`"
        try:
            # The argv is one of the fixed toolchain queries of discover/ (`npm config get
            # registry`, ...); only the program is looked up, on the user's own PATH, on purpose.
            done = subprocess.run(  # noqa: S603
                [program, *argv[1:]], capture_output=True, text=True, errors="replace",
                stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT, env={**self.env, **extra_env},
                # Toolchains read project files in the working directory (go.mod can even make
                # `go` download a toolchain); the root has none.
                cwd=self.root if self.root.is_dir() else None)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.skip(command, str(e))
            return None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [""])[-1]
            self.skip(command, f"exit status {done.returncode} {last}".strip())
            return None
        return done.stdout


def url_endpoint(url: str) -> tuple[str, int]:
    """The host and port that fetching `url` connects to. Raises LocalEndpoint for files,
    paths and sockets, ValueError for what is not a usable URL."""
    text = url.strip()
    if text.startswith(("/", ".", "~")):
        raise LocalEndpoint(text)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(str(e)) from None
    # Compound schemes name a transport inside a method: sparse+https, git+ssh, tor+http.
    schemes = parts.scheme.lower().split("+")
    if LOCAL_SCHEMES.intersection(schemes):
        raise LocalEndpoint(text)
    known = [s for s in schemes if s in SCHEME_PORTS]
    if not parts.scheme or "//" not in text:
        raise ValueError("expected a URL like https://host/path")
    if not known:
        raise ValueError(f"unsupported scheme {parts.scheme!r}; expected one of "
                         f"{', '.join(SCHEME_PORTS)}")
    if not parts.hostname:
        raise ValueError("no host")
    return parts.hostname, port or SCHEME_PORTS[known[0]]


def split_host_port(text: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address, as registries are named."""
    text = text.strip()
    if text.count(":") > 1 and not text.startswith("["):
        return text, None
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    if not parts.hostname or parts.path or parts.query or parts.fragment:
        raise ValueError(f"{text!r}: expected host or host:port")
    return parts.hostname, port


def host_target(text: str) -> tuple[str, bool]:
    """The policy spelling of a host: (name or `*.name`, False) or (address/prefix, True)."""
    wildcard = text.startswith("*.")
    try:
        host = normalize_host(text[2:] if wildcard else text)
    except HostError as e:
        raise ValueError(str(e)) from None
    if isinstance(host, Name):
        if host.text == "localhost" or host.text.endswith(".localhost"):
            raise LocalEndpoint(text)
        if not wildcard:
            return host.text, False
        # The policy loader refuses these; a preset that does not load helps nobody.
        if is_icann_suffix(host.text):
            raise ValueError(f"{text!r} covers a whole public suffix")
        return f"*.{host.text}", False
    if wildcard:
        raise ValueError(f"{text!r}: a wildcard over an IP address")
    if host.is_loopback or host.is_unspecified:
        raise LocalEndpoint(text)
    return f"{host}/{host.max_prefixlen}", True


def redact(url: str) -> str:
    """A URL fit for a comment: no user name, password or query (tokens live there), at most
    100 characters."""
    return re.sub(r"[?#].*", "", re.sub(r"//[^/@]*@", "//", url.strip()))[:100]



