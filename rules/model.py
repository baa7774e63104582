"""The loaded policy as immutable values: rules, accounts and how clients map to accounts."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network

from .paths import PathPattern

Network = IPv4Network | IPv6Network

DEFAULT_PORTS = frozenset({80, 443})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Mode(StrEnum):
    ENFORCE = "enforce"
    LEARN = "learn"
    ASK = "ask"  # unmatched traffic waits for a person's answer (agent_egress/approvals.py)


class Result(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    WOULD_DENY = "would_deny"


class Stage(StrEnum):
    DNS = "dns"
    CONNECT = "connect"
    REQUEST = "request"


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow or deny entry. `source` is the `file:line` a person edits to change it."""

    source: str
    host: str | None = None  # an exact name or "*.parent", normalised
    network: Network | None = None
    ports: frozenset[int] | None = None  # None: any port
    methods: frozenset[str] | None = None
    paths: tuple[PathPattern, ...] | None = None
    read_only: bool = False
    expires: float | None = None  # POSIX time
    preset: str | None = None
    preset_source: str | None = None  # the preset entry this rule came from
    credential: str | None = None  # injected into every request this rule allows
    id: str = ""  # stable: the rule's `id:`, or derived from its account and content

    @property
    def inspects(self) -> bool:
        """Whether the rule has to see requests, so TLS to its destinations is inspected."""
        return (self.methods is not None or self.paths is not None or self.read_only
                or self.credential is not None)

    def describe(self) -> str:
        parts = [f"host {self.host}" if self.host else f"cidr {self.network}"]
        if self.ports is not None:
            parts.append("ports " + ",".join(str(p) for p in sorted(self.ports)))
        if self.methods is not None:
            parts.append("methods " + ",".join(sorted(self.methods)))
        if self.paths is not None:
            parts.append("paths " + ",".join(p.text for p in self.paths))
        if self.read_only:
            parts.append("access read-only")
        if self.credential is not None:
            parts.append(f"credential {self.credential}")
        if self.preset:
            parts.append(f"from preset {self.preset} ({self.preset_source})")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Match:
    unix_users: frozenset[str] = frozenset()
    uids: frozenset[int] = frozenset()
    proxy_users: frozenset[str] = frozenset()
    sources: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    source: str
    mode: Mode
    match: Match
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]
    ask_timeout: float = 30.0  # ask mode: seconds an unmatched connection waits for an answer


class Scheme(StrEnum):
    BEARER = "bearer"
    BASIC = "basic"
    RAW = "raw"


@dataclass(frozen=True, slots=True)
class Credential:
    """A `credentials:` entry: where the proxy reads a secret and how it sends it. The value
    itself is never part of the policy (agent_egress/credentials.py reads it)."""

    name: str
    source: str  # file:line of the entry
    origin: tuple[str, int, int]  # file, line, col of its `file` or `env` value
    file: str | None = None
    env: str | None = None
    header: str = "Authorization"
    scheme: Scheme = Scheme.BEARER
    username: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyWarning:
    """Something valid but probably not meant, reported by `validate` without failing it."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: warning: {self.message}"


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    """What the loader read; `rules.Policy` builds the indexes that decisions use."""

    file: str
    digest: str
    accounts: dict[str, Account]
    warnings: tuple[PolicyWarning, ...] = field(default=())
    credentials: dict[str, Credential] = field(default_factory=dict)
