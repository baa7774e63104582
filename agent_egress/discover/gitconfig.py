"""Reads git's and ssh's configuration files as far as `discover` needs them: git variables with
their sections and line numbers, and the ssh host aliases that git remotes may name."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_SECTION = re.compile(r'\[\s*([A-Za-z0-9.-]+)(?:\s+"((?:[^"\\]|\\.)*)")?\s*\]')
_ESCAPES = {"n": "\n", "t": "\t", "b": "\b", "\\": "\\", '"': '"'}
_SSH_PATTERN = frozenset("*?!")


@dataclass(frozen=True, slots=True)
class Variable:
    line: int
    section: str  # lower case
    subsection: str | None  # as written: remote names and URLs keep their case
    key: str  # lower case
    value: str

    @property
    def name(self) -> str:
        middle = f".{self.subsection}" if self.subsection is not None else ""
        return f"{self.section}{middle}.{self.key}"


def variables(text: str) -> Iterator[Variable]:
    """Every variable in a git config file, in order; raises ValueError on a bad section line.
    Values keep no quotes, escapes are resolved and comments removed, as git reads them."""
    section, subsection = "", None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("["):
            match = _SECTION.match(line)
            if match is None:
                raise ValueError(f"line {number}: expected a section like [remote \"origin\"]")
            section, subsection = match.group(1).lower(), match.group(2)
            if subsection is None and "." in section:  # the old [section.subsection] form
                section, subsection = section.split(".", 1)
            elif subsection is not None:
                subsection = re.sub(r"\\(.)", r"\1", subsection)
            line = line[match.end():].strip()  # a variable may follow on the same line
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        yield Variable(number, section, subsection, key.strip().lower(),
                       _value(value) if sep else "true")


def _value(text: str) -> str:
    out: list[str] = []
    quoted = escaped = False
    for char in text.strip():
        if escaped:
            out.append(_ESCAPES.get(char, char))
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char in "#;" and not quoted:
            break
        else:
            out.append(char)
    return "".join(out).strip()


@dataclass(frozen=True, slots=True)
class SshAlias:
    hostname: str | None
    port: int | None


def ssh_aliases(text: str) -> dict[str, SshAlias]:
    """`Host NAME` blocks of an ssh config with the HostName and Port they set. Only exact
    names: a pattern (`*.corp.test`) is not an alias a remote URL can name by itself."""
    aliases: dict[str, SshAlias] = {}
    current: list[str] = []
    for raw in text.splitlines():
        words = raw.strip().replace("=", " ", 1).split()
        if not words or words[0].startswith("#"):
            continue
        keyword, argument = words[0].lower(), words[1] if len(words) > 1 else ""
        if keyword in ("host", "match"):
            # ssh compares host names in lower case
            current = [w.lower() for w in words[1:] if not _SSH_PATTERN.intersection(w)] \
                if keyword == "host" else []
        for alias in current if keyword in ("hostname", "port") else []:
            # ssh keeps the first value it obtains for each option.
            known = aliases.get(alias, SshAlias(None, None))
            if keyword == "hostname" and known.hostname is None:
                known = SshAlias(argument.replace("%h", alias), known.port)
            elif keyword == "port" and known.port is None and argument.isdigit():
                known = SshAlias(known.hostname, int(argument))
            aliases[alias] = known
    return aliases
