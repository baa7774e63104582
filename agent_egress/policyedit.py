"""Adding allow rules to a policy file the way a person would: comments, order and quoting kept,
the result validated before it replaces the original, and the original untouched on failure."""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from .rules import PolicyError, Problem, parse_policy

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


@dataclass(frozen=True)
class NewRule:
    """An allow entry to add: `host`, `cidr` or `preset`, optional ports and expiry, and why."""

    host: str | None = None
    cidr: str | None = None
    preset: str | None = None
    ports: Sequence[int] | None = None
    access: str | None = None  # "read-only"
    expires: str | None = None
    comment: str | None = None

    def flow(self) -> str:
        """The entry in YAML flow style, as a proposal shows it."""
        parts = [f"host: {self.host}" if self.host else f"cidr: {self.cidr}" if self.cidr
                 else f"preset: {self.preset}"]
        if self.ports:
            parts.append(f"ports: [{', '.join(str(p) for p in sorted(self.ports))}]")
        if self.access:
            parts.append(f"access: {self.access}")
        if self.expires:
            parts.append(f"expires: {self.expires}")
        return "{" + ", ".join(parts) + "}"


def parse_duration(text: str) -> timedelta:
    """`90m`, `2h`, `1d12h`, `30s`: raises ValueError for anything else, zero included."""
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration; expected e.g. 30m, 2h, 1d12h")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if not duration:
        raise ValueError(f"{text!r} is no time at all; expected e.g. 30m, 2h, 1d12h")
    return duration


def add_allow_rules(path: Path, account: str, rules: Sequence[NewRule]) -> None:
    """Appends `rules` to accounts.ACCOUNT.allow in `path`; raises PolicyError (and leaves the
    file as it was) if the file cannot be read, lacks the account or would not validate."""
    replace_policy(path, with_allow_rules(path, account, rules))


def with_allow_rules(path: Path, account: str, rules: Sequence[NewRule]) -> str:
    """The text `path` would have with `rules` added (validated), without writing it: a
    caller can decide on the new policy first."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)  # lists indented under their key
    file = str(path)
    try:
        original = path.read_text()
        document = yaml.load(original)
    except (OSError, YAMLError, UnicodeDecodeError) as e:
        raise PolicyError([Problem(file, 1, 1, f"cannot edit the policy: {e}")]) from None
    accounts = document.get("accounts") if isinstance(document, CommentedMap) else None
    entry = accounts.get(account) if isinstance(accounts, CommentedMap) else None
    if not isinstance(entry, CommentedMap):
        raise PolicyError([Problem(file, 1, 1, f"no account {account!r} to add rules to")])
    allow = entry.get("allow")
    if not isinstance(allow, CommentedSeq):
        allow = entry["allow"] = CommentedSeq()
    # A comment goes on its own line above its entry. The dump lays the file out anew with the
    # indentation set above, which puts the entries of accounts.NAME.allow in column 6.
    column = 6
    for rule in rules:
        allow.append(_entry(rule))
        if rule.comment:
            allow.yaml_set_comment_before_after_key(len(allow) - 1, before=rule.comment,
                                                    indent=column)
    out = io.StringIO()
    yaml.dump(document, out)
    text = out.getvalue()
    parse_policy(text.encode(), file)  # raises PolicyError: the original stays as it is
    return text


def _entry(rule: NewRule) -> CommentedMap:
    entry = CommentedMap()
    if rule.host is not None:
        entry["host"] = rule.host
    elif rule.cidr is not None:
        entry["cidr"] = rule.cidr
    else:
        entry["preset"] = rule.preset
    if rule.ports:
        ports = CommentedSeq(sorted(rule.ports))
        ports.fa.set_flow_style()
        entry["ports"] = ports
    if rule.access:
        entry["access"] = rule.access
    if rule.expires:
        entry["expires"] = rule.expires
    return entry


def replace_policy(path: Path, text: str) -> None:
    """Writes beside the original and renames over it: readers see the old file or the new
    one, never half of one (the proxy may be reloading it right now)."""
    mode = path.stat().st_mode & 0o777
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as f:
            f.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
