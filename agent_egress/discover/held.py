"""The credentials this user's configuration holds, for `agent-egress discover`: by file, key
and kind, never the value, each with the `credentials:` entry and rule that would let the proxy
hold it instead (docs/rollout.md, "Moving secrets out of the agent's account")."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .common import MAX_FILE_BYTES, Discovery

SECRET_DIR = "/etc/agent-egress/credentials"  # noqa: S105 (a directory, not a secret)
_NPM_AUTH = re.compile(r"^(//[^:]+)?:?(_authToken|_auth|_password)$")
_NAME = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class Held:
    """One secret found: where (file:line and key), what kind, for which host."""

    where: str
    key: str
    kind: str
    host: str | None = None
    scheme: str = "bearer"
    username: str | None = None

    @property
    def name(self) -> str:
        if self.where == "environment":
            base = f"env-{self.key}"
        elif self.host:
            base = f"{self.kind.split()[0]}-{self.host}"
        else:
            base = f"{self.kind.split()[0]}-{self.kind.split('(')[-1]}"
        return _NAME.sub("-", base.lower()).strip("-")[:64]


def find_held(found: Discovery) -> list[Held]:
    held: list[Held] = []
    home = found.home
    held += _npmrc(found, home / ".npmrc")
    for path in (home / ".config/pip/pip.conf", home / ".pip/pip.conf"):
        held += _pip(found, path)
    held += _urls(found, home / ".git-credentials", "git credential store")
    held += _netrc(found, home / ".netrc")
    held += _docker(found, home / ".docker/config.json")
    for path, kind in ((home / ".aws/credentials", "cloud key (AWS)"),
                       (home / ".config/gcloud/application_default_credentials.json",
                        "cloud key (Google)"),
                       (home / ".azure/msal_token_cache.json", "cloud token (Azure)"),
                       (home / ".codex/auth.json", "agent auth (Codex)"),
                       (home / ".claude/.credentials.json", "agent auth (Claude)"),
                       (home / ".config/gh/hosts.yml", "token (GitHub CLI)")):
        if path.is_file():
            held.append(Held(str(path), "(the file)", kind, scheme="raw"))
    for name in sorted(found.env):
        if name.endswith(("_TOKEN", "_API_KEY", "_SECRET", "_SECRET_ACCESS_KEY", "_PASSWORD")):
            held.append(Held("environment", name, "environment secret", scheme="raw"))
    return held


def _npmrc(found: Discovery, path: Path) -> list[Held]:
    text = _read(path)
    held = []
    for number, line in enumerate((text or "").splitlines(), 1):
        key, sep, _ = line.strip().partition("=")
        match = _NPM_AUTH.match(key.strip()) if sep else None
        if match:
            host = urlsplit(f"https:{match.group(1)}").hostname if match.group(1) else None
            basic = match.group(2) != "_authToken"
            held.append(Held(f"{path}:{number}", key.strip(), "npm token", host,
                             "basic" if basic else "bearer", "USER" if basic else None))
    return held


def _pip(found: Discovery, path: Path) -> list[Held]:
    text = _read(path)
    if not text:
        return []
    held = []
    for number, line in enumerate(text.splitlines(), 1):
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("index-url", "extra-index-url"):
            for url in value.split():
                parts = urlsplit(url)
                if parts.password:
                    held.append(Held(f"{path}:{number}", key.strip(), "pip index password",
                                     parts.hostname, "basic", parts.username))
    return held


def _urls(found: Discovery, path: Path, kind: str) -> list[Held]:
    held = []
    for number, line in enumerate((_read(path) or "").splitlines(), 1):
        parts = urlsplit(line.strip())
        if parts.password:
            held.append(Held(f"{path}:{number}", "password", kind, parts.hostname, "basic",
                             parts.username))
    return held


def _netrc(found: Discovery, path: Path) -> list[Held]:
    held = []
    words = (_read(path) or "").split()
    machine = login = None
    for i, word in enumerate(words[:-1]):
        if word == "machine":
            machine, login = words[i + 1], None
        elif word == "login":
            login = words[i + 1]
        elif word == "password" and machine:
            held.append(Held(str(path), f"machine {machine} password", "netrc password",
                             machine, "basic", login or "USER"))
    return held


def _docker(found: Discovery, path: Path) -> list[Held]:
    try:
        config = json.loads(_read(path) or "null")
    except ValueError:
        return []
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return []
    return [Held(str(path), f"auths.{registry}", "docker auth",
                 urlsplit(registry if "//" in registry else f"//{registry}").hostname, "basic",
                 "USER")
            for registry, entry in auths.items()
            if isinstance(entry, dict) and (entry.get("auth") or entry.get("identitytoken"))]


def _read(path: Path) -> str | None:
    """The file's text, or None: the registry readers already report what cannot be read."""
    try:
        with path.open("rb") as f:
            return f.read(MAX_FILE_BYTES).decode("utf-8", "replace")
    except OSError:
        return None


def render_held(held: list[Held]) -> str:
    """A `credentials:` section (valid policy YAML) and, in comments, the rules to add."""
    if not held:
        return ""
    lines = ["", "# Credentials this user's configuration holds (values not shown). To move one "
             "out of the",
             "# account: write its value to the file named (owned by the proxy's user, mode "
             "0600), add",
             "# the rule shown to the account, replace the value in the file above with a "
             "dummy, rotate it.",
             "credentials:"]
    seen: set[str] = set()
    for entry in held:
        name = entry.name
        while name in seen:
            name += "-2"
        seen.add(name)
        lines.append(f"  {name}:  # {_printable(entry.where)} {_printable(entry.key)}: "
                     f"{entry.kind}")
        lines.append(f"    file: {SECRET_DIR}/{name}")
        lines.append(f"    scheme: {entry.scheme}")
        if entry.username:
            lines.append(f"    username: {_quoted(entry.username)}")
        if entry.host:
            lines.append(f"    # rule: {{host: {entry.host}, credential: {name}}}")
        else:
            lines.append("    # no rule: a tripwire (or a rule for the host it is sent to)")
    return "\n".join(lines) + "\n"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

