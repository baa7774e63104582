"""Turns a policy file into a PolicyDocument, reporting every problem with its file:line:col."""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import datetime
from importlib import resources
from ipaddress import IPv4Network, ip_network
from pathlib import Path
from typing import TypedDict, TypeVar

import yaml

from .credentials import credential_entries, credential_reference
from .errors import PolicyError, Problem
from .hosts import HostError, Name, normalize_host
from .model import (
    DEFAULT_PORTS,
    Account,
    Credential,
    Match,
    Mode,
    Network,
    PolicyDocument,
    PolicyWarning,
    Rule,
)
from .paths import PathPattern
from .source import position, read_nodes, release_nodes
from .suffixes import is_icann_suffix, is_public_suffix

SUPPORTED_VERSION = 1
DEFAULT_ACCOUNT = "default"
KNOWN_METHODS = frozenset({
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
    # WebDAV, as used by some artifact stores
    "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH",
})
_TOP_KEYS = ("version", "presets", "credentials", "accounts")
_ACCOUNT_KEYS = ("match", "mode", "ask_timeout", "allow", "deny")
_ASK_TIMEOUT = re.compile(r"(\d{1,5})(s|m)?")
_ASK_TIMEOUT_MAX = 3600.0
_MATCH_KEYS = ("unix_users", "uids", "proxy_users", "sources")
_TARGET_KEYS = ("host", "cidr", "preset")
_ENTRY_KEYS = (*_TARGET_KEYS, "id", "ports", "methods", "paths", "access", "expires",
               "credential")
_PRESET_REFERENCE_KEYS = ("preset", "id", "access", "expires", "credential")
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_RULE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"

T = TypeVar("T")


def load_policy(path: str | Path) -> PolicyDocument:
    """Reads and validates a policy file; raises PolicyError listing every problem."""
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PolicyError([Problem(file, 1, 1, f"cannot read the policy: {e.strerror}")]) from None
    return parse_policy(data, file)


def parse_policy(data: bytes, file: str) -> PolicyDocument:
    with gc_paused():
        root = read_nodes(data, file)
        reader = _Reader(file)
        try:
            document = reader.policy(root, hashlib.sha256(data).hexdigest()[:16])
        finally:
            release_nodes(root)
    if reader.problems or document is None:
        raise PolicyError(reader.problems)
    return document


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Builds of many acyclic objects (YAML nodes, rules, indexes) without the cyclic garbage
    collector re-scanning them all along: for a 100,000-rule file, most of the load time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.cache
def builtin_presets() -> dict[str, tuple[Rule, ...]]:
    """The presets shipped in rules/presets/, one YAML list per file."""
    presets = {}
    for resource in resources.files(__package__).joinpath("presets").iterdir():
        if not resource.name.endswith(".yaml"):
            continue
        name = resource.name.removesuffix(".yaml")
        file = f"builtin:{resource.name}"
        reader = _Reader(file)
        rules = reader.entries(read_nodes(resource.read_bytes(), file), "preset", presets={})
        if reader.problems:
            raise PolicyError(reader.problems)
        presets[name] = tuple(rules)
    return presets


class _Options(TypedDict, total=False):
    ports: frozenset[int] | None
    methods: frozenset[str]
    paths: tuple[PathPattern, ...]
    read_only: bool
    expires: float | None
    credential: str | None


class _Reader:
    """Walks the YAML nodes, building values and collecting problems instead of stopping."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.warnings: list[PolicyWarning] = []
        self.rule_ids: dict[str, str] = {}  # explicit `id:` -> where it was given
        self.credentials: dict[str, Credential] = {}

    def where(self, node: yaml.Node) -> str:
        return f"{self.file}:{position(node)[0]}"

    def problem(self, node: yaml.Node, message: str) -> None:
        line, col = position(node)
        self.problems.append(Problem(self.file, line, col, message))

    def warn(self, node: yaml.Node, message: str) -> None:
        line, col = position(node)
        self.warnings.append(PolicyWarning(f"{self.file}:{line}:{col}", message))

    # Generic shapes

    def mapping(self, node: yaml.Node, what: str,
                keys: Iterable[str] | None) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{what}: expected a mapping, got {_kind(node)}")
            return None
        allowed = tuple(keys) if keys is not None else None
        items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag != _STR:
                self.problem(key, f"{what}: keys must be names, got {_kind(key)}")
                continue
            if allowed is not None and key.value not in allowed:
                self.problem(key, f"{what}: unknown key {key.value!r}{_suggest(key.value, allowed)}"
                                  f"; expected one of {', '.join(allowed)}")
                continue
            items[key.value] = (key, value)
        return items

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, f"{what}: expected a list, got {_kind(node)}")
            return []
        return list(node.value)

    def string(self, node: yaml.Node, what: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR or not node.value:
            self.problem(node, f"{what}: expected a non-empty string, got {_kind(node)}")
            return None
        return str(node.value)

    def integer(self, node: yaml.Node, what: str, low: int, high: int) -> int | None:
        value = None
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT:
            try:
                value = int(node.value.replace("_", ""), 0)
            except ValueError:
                value = None
        if value is None:
            self.problem(node, f"{what}: expected a whole number, got {_kind(node)}")
        elif not low <= value <= high:
            self.problem(node, f"{what}: {value} is out of range; expected {low} to {high}")
            value = None
        return value

    def each(self, node: yaml.Node, what: str, parse: Callable[[yaml.Node], T | None]) -> list[T]:
        values = (parse(item) for item in self.sequence(node, what))
        return [v for v in values if v is not None]

    # The policy

    def policy(self, root: yaml.Node, digest: str) -> PolicyDocument | None:
        top = self.mapping(root, "policy", _TOP_KEYS)
        if top is None:
            return None
        if "version" not in top:
            self.problem(root, "missing 'version'; expected 'version: 1' at the top")
        else:
            version_node = top["version"][1]
            version = self.integer(version_node, "version", 0, 2**31)
            if version is not None and version != SUPPORTED_VERSION:
                self.problem(version_node, f"version {version} is not supported; "
                                           f"expected version: {SUPPORTED_VERSION}")
        if "credentials" in top:
            self.credentials = credential_entries(self, top["credentials"][1])
        presets = dict(builtin_presets())
        if "presets" in top:
            presets.update(self.presets(top["presets"][1], frozenset(presets)))
        accounts: dict[str, Account] = {}
        if "accounts" not in top:
            self.problem(root, "missing 'accounts'; expected a mapping of account names")
        else:
            accounts = self.accounts(top["accounts"][1], presets)
        return PolicyDocument(self.file, digest, accounts, tuple(self.warnings),
                              self.credentials)

    def presets(self, node: yaml.Node, builtin: frozenset[str]) -> dict[str, tuple[Rule, ...]]:
        presets = {}
        for name, (key, value) in (self.mapping(node, "presets", None) or {}).items():
            if name in builtin:
                self.problem(key, f"preset {name!r} is built in; expected another name")
                continue
            presets[name] = tuple(self.entries(value, f"preset {name}", presets={}))
        return presets

    def accounts(self, node: yaml.Node,
                 presets: dict[str, tuple[Rule, ...]]) -> dict[str, Account]:
        accounts = {}
        claims: dict[tuple[str, object], str] = {}
        for name, (key, value) in (self.mapping(node, "accounts", None) or {}).items():
            if not _ACCOUNT_NAME.fullmatch(name):
                self.problem(key, f"account name {name!r}: expected letters, digits, '_', '.' "
                                  "and '-', at most 64")
            account = self.account(name, key, value, presets)
            if account is not None:
                accounts[name] = account
                self.claim(account, value, claims)
        return accounts

    def account(self, name: str, key: yaml.Node, node: yaml.Node,
                presets: dict[str, tuple[Rule, ...]]) -> Account | None:
        what = f"account {name}"
        fields = self.mapping(node, what, _ACCOUNT_KEYS)
        if fields is None:
            return None
        match = Match()
        if "match" in fields:
            match_key, match_node = fields["match"]
            if name == DEFAULT_ACCOUNT:
                self.problem(match_key, "account default: takes no 'match'; it serves clients "
                                        "that match no other account")
            else:
                match = self.match(match_node, what)
        elif name != DEFAULT_ACCOUNT:
            self.problem(key, f"{what}: missing 'match'; expected unix_users, uids, proxy_users "
                              "or sources")
        mode = Mode.ENFORCE
        if "mode" in fields:
            mode_node = fields["mode"][1]
            text = self.string(mode_node, f"{what}: mode")
            if text is not None:
                try:
                    mode = Mode(text)
                except ValueError:
                    self.problem(mode_node, f"{what}: mode {text!r}{_suggest(text, list(Mode))}; "
                                            "expected enforce, learn or ask")
        ask_timeout = self.ask_timeout(fields["ask_timeout"][1], what) \
            if "ask_timeout" in fields else None
        allow = self.entries(fields["allow"][1], f"{what}: allow", presets) if "allow" in fields \
            else []
        deny = self.entries(fields["deny"][1], f"{what}: deny", presets, deny=True) \
            if "deny" in fields else []
        allow = [with_rule_id(rule, name, "allow") for rule in allow]
        deny = [with_rule_id(rule, name, "deny") for rule in deny]
        account = Account(name, self.where(key), mode, match, tuple(allow), tuple(deny))
        return account if ask_timeout is None else replace(account, ask_timeout=ask_timeout)

    def ask_timeout(self, node: yaml.Node, what: str) -> float | None:
        """`30s`, `2m` or a number of seconds: more than zero, at most an hour."""
        text = str(node.value).strip() if isinstance(node, yaml.ScalarNode) else ""
        match = _ASK_TIMEOUT.fullmatch(text)
        seconds = (int(match.group(1)) * (60 if match.group(2) == "m" else 1)) if match else 0
        if not 0 < seconds <= _ASK_TIMEOUT_MAX:
            self.problem(node, f"{what}: ask_timeout {text or _kind(node)!r}: expected a time "
                               "from 1s to 60m, like 30s or 2m")
            return None
        return float(seconds)

    def match(self, node: yaml.Node, what: str) -> Match:
        fields = self.mapping(node, f"{what}: match", _MATCH_KEYS)
        if not fields:
            if fields is not None:
                self.problem(node, f"{what}: match is empty; expected unix_users, uids, "
                                   "proxy_users or sources")
            return Match()

        def listed(key: str, parse: Callable[[yaml.Node], T | None]) -> list[T]:
            return self.each(fields[key][1], f"{what}: {key}", parse) if key in fields else []

        return Match(
            unix_users=frozenset(listed("unix_users", lambda n: self.string(n, "unix user"))),
            uids=frozenset(listed("uids", lambda n: self.integer(n, "uid", 0, 2**32 - 2))),
            proxy_users=frozenset(listed("proxy_users", lambda n: self.string(n, "proxy user"))),
            sources=tuple(listed("sources", lambda n: self.network(n, "source"))),
        )

    def claim(self, account: Account, node: yaml.Node,
              claims: dict[tuple[str, object], str]) -> None:
        """Two accounts may not claim one user, uid or proxy user."""
        match_node = next((v for k, v in node.value if k.value == "match"), node)
        identities: list[tuple[str, object]] = [
            ("unix user", u) for u in sorted(account.match.unix_users)]
        identities += [("uid", u) for u in sorted(account.match.uids)]
        identities += [("proxy user", u) for u in sorted(account.match.proxy_users)]
        for kind, value in identities:
            owner = claims.setdefault((kind, value), account.name)
            if owner != account.name:
                self.problem(match_node, f"account {account.name}: {kind} {value!r} is already "
                                         f"claimed by account {owner}; expected each {kind} in "
                                         "one account")

    # Rules

    def entries(self, node: yaml.Node, what: str, presets: dict[str, tuple[Rule, ...]],
                deny: bool = False) -> list[Rule]:
        rules: list[Rule] = []
        for item in self.sequence(node, what):
            rules.extend(self.entry(item, what, presets, deny))
        return rules

    def entry(self, node: yaml.Node, what: str, presets: dict[str, tuple[Rule, ...]],
              deny: bool) -> list[Rule]:
        fields = self.mapping(node, f"{what} entry", _ENTRY_KEYS)
        if fields is None:
            return []
        targets = [k for k in _TARGET_KEYS if k in fields]
        if len(targets) != 1:
            found = " and ".join(targets) if targets else "none"
            self.problem(node, f"{what} entry: expected exactly one of host, cidr or preset, "
                               f"found {found}")
            return []
        target = targets[0]
        source = self.where(node)
        rule_id = self.rule_id(fields["id"][1], what, source) if "id" in fields else ""
        if target == "preset":
            return [replace(rule, id=rule_id) for rule in
                    self.preset_reference(fields, what, source, presets, deny)]
        options = self.options(fields, deny)
        options.setdefault("ports", None if deny else DEFAULT_PORTS)
        target_node = fields[target][1]
        if target == "host":
            host = self.host_pattern(target_node)
            return [] if host is None else [Rule(source, host=host, id=rule_id, **options)]
        network = self.network(target_node, "cidr")
        return [] if network is None else [Rule(source, network=network, id=rule_id,
                                                **options)]

    def rule_id(self, node: yaml.Node, what: str, source: str) -> str:
        """An explicit `id:`, checked: its form, and that no other rule in the file has it."""
        text = self.string(node, "id")
        if text is None:
            return ""
        if what.startswith("preset"):
            self.problem(node, f"{what} entry: id {text!r}: ids belong on an account's rules "
                               "(a preset's entries become rules of every account using it); "
                               "expected the id on the rule that uses the preset")
            return ""
        if not _RULE_ID.fullmatch(text):
            self.problem(node, f"id {text!r}: expected lower-case letters, digits, '.', '_' and "
                               "'-', starting with a letter or digit, at most 128")
            return ""
        first = self.rule_ids.setdefault(text, source)
        if first != source:
            self.problem(node, f"id {text!r} is already the id of the rule at line "
                               f"{first.rpartition(':')[2]}; "
                               "expected each id once in the file")
            return ""
        return text

    def options(self, fields: dict[str, tuple[yaml.Node, yaml.Node]], deny: bool) -> _Options:
        options: _Options = {}
        if "ports" in fields:
            ports_node = fields["ports"][1]
            ports = self.each(ports_node, "ports", lambda n: self.integer(n, "port", 1, 65535))
            if not ports and isinstance(ports_node, yaml.SequenceNode) and not ports_node.value:
                self.problem(ports_node, "ports: empty; expected at least one port")
            options["ports"] = frozenset(ports)
        if "methods" in fields:
            options["methods"] = frozenset(self.each(fields["methods"][1], "methods", self.method))
        if "paths" in fields:
            options["paths"] = tuple(self.each(fields["paths"][1], "paths", self.path_pattern))
        if "access" in fields:
            options["read_only"] = self.access(fields["access"][1], deny)
        if "expires" in fields:
            options["expires"] = self.expires(fields["expires"][1])
        if "credential" in fields:
            options["credential"] = credential_reference(self, *fields["credential"], deny)
        return options

    def preset_reference(self, fields: dict[str, tuple[yaml.Node, yaml.Node]], what: str,
                         source: str, presets: dict[str, tuple[Rule, ...]],
                         deny: bool) -> list[Rule]:
        for key, (key_node, _) in fields.items():
            if key not in _PRESET_REFERENCE_KEYS:
                self.problem(key_node, f"{what} entry: {key!r} cannot be set on a preset "
                                       f"reference; expected {', '.join(_PRESET_REFERENCE_KEYS)}")
        name_node = fields["preset"][1]
        name = self.string(name_node, "preset")
        if name is None:
            return []
        if name not in presets:
            if what.startswith("preset"):
                self.problem(name_node, "presets cannot refer to other presets")
            else:
                self.problem(name_node, f"unknown preset {name!r}{_suggest(name, presets)}; "
                                        f"expected one of {', '.join(sorted(presets))}")
            return []
        options = self.options(fields, deny)
        if deny:
            options["ports"] = None
        return [replace(rule, source=source, preset=name, preset_source=rule.source, **options)
                for rule in presets[name]]

    def host_pattern(self, node: yaml.Node) -> str | None:
        text = self.string(node, "host")
        if text is None:
            return None
        wildcard = text.startswith("*.")
        name_text = text[2:] if wildcard else text
        if "*" in name_text:
            self.problem(node, f"host {text!r}: '*' is only allowed as a leading '*.'; expected "
                               "a name like api.example.test or *.example.test")
            return None
        try:
            host = normalize_host(name_text)
        except HostError as e:
            self.problem(node, f"host {text!r}: {e}; expected a name like api.example.test")
            return None
        if not isinstance(host, Name):
            self.problem(node, f"host {text!r} is an IP address; expected a name "
                               f"(write addresses as 'cidr: {host}/{host.max_prefixlen}')")
            return None
        if not wildcard:
            return host.text
        if is_icann_suffix(host.text):
            self.problem(node, f"host {text!r} covers every name under the public suffix "
                               f"{host.text!r}; expected a wildcard under a registered domain")
            return None
        if is_public_suffix(host.text):
            self.warn(node, f"host {text!r}: the Public Suffix List marks {host.text!r} as a "
                            "shared suffix, so names under it belong to different owners")
        return "*." + host.text

    def network(self, node: yaml.Node, what: str) -> Network | None:
        text = self.string(node, what)
        if text is None:
            return None
        try:
            network = ip_network(text, strict=True)
        except ValueError as e:
            loose = None
            try:
                loose = ip_network(text, strict=False)
            except ValueError:
                pass
            hint = f"expected {loose}" if loose else "expected an address or network like " \
                                                     "192.0.2.0/24 or 2001:db8::/32"
            self.problem(node, f"{what} {text!r}: {e}; {hint}")
            return None
        mapped = getattr(network.network_address, "ipv4_mapped", None)
        if mapped is not None and network.prefixlen >= 96:
            self.problem(node, f"{what} {text!r} is IPv4-mapped; expected the IPv4 form "
                               f"{IPv4Network((mapped, network.prefixlen - 96))}")
            return None
        return network

    def method(self, node: yaml.Node) -> str | None:
        text = self.string(node, "method")
        if text is None:
            return None
        method = text.upper()
        if method not in KNOWN_METHODS:
            self.problem(node, f"unknown method {text!r}{_suggest(method, KNOWN_METHODS)}; "
                               "expected an HTTP method like GET or POST")
            return None
        return method

    def path_pattern(self, node: yaml.Node) -> PathPattern | None:
        text = self.string(node, "path")
        if text is None:
            return None
        try:
            return PathPattern.parse(text)
        except ValueError as e:
            self.problem(node, f"{e}; expected a glob like /v1/*")
            return None

    def access(self, node: yaml.Node, deny: bool) -> bool:
        text = self.string(node, "access")
        if text is None:
            return False
        if text != "read-only":
            self.problem(node, f"access {text!r}{_suggest(text, ['read-only'])}; "
                               "expected read-only")
            return False
        if deny:
            self.problem(node, "access: read-only belongs on allow rules; a deny rule denies "
                               "every kind of access")
            return False
        return True

    def expires(self, node: yaml.Node) -> float | None:
        text = node.value if isinstance(node, yaml.ScalarNode) else None
        try:
            moment = datetime.fromisoformat(str(text)) if text else None
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            self.problem(node, f"expires {text!r}: expected an RFC 3339 time with a zone, like "
                               "2026-12-01T00:00:00Z")
            return None
        return moment.timestamp()


def with_rule_id(rule: Rule, account: str, kind: str) -> Rule:
    """`rule` with its stable id: its own `id:`, or one derived from the account, whether it
    allows or denies, and what it matches (never its line or `expires`), so that editing the
    file elsewhere, or renewing a grant, keeps it. The rules of one preset reference share the
    reference's id."""
    if rule.id:
        return rule
    if rule.preset is not None:  # its entries' hosts and ports are the preset's
        content = "\0".join((account, kind, f"preset {rule.preset}",
                             "read-only" if rule.read_only else "", rule.credential or ""))
        return replace(rule, id="r-" + hashlib.sha256(content.encode()).hexdigest()[:12])
    target = f"host {rule.host}" if rule.host else f"cidr {rule.network}"
    content = "\0".join((
        account, kind, target,
        ",".join(str(p) for p in sorted(rule.ports)) if rule.ports is not None else "*",
        ",".join(sorted(rule.methods)) if rule.methods is not None else "*",
        "\n".join(p.text for p in rule.paths) if rule.paths is not None else "*",
        "read-only" if rule.read_only else "", rule.credential or ""))
    return replace(rule, id="r-" + hashlib.sha256(content.encode()).hexdigest()[:12])


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    tag = str(node.tag).rsplit(":", 1)[-1]
    if tag == "null":
        return "nothing"
    return f"{tag} {node.value!r}"
