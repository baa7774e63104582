"""git: the hosts of the remotes of every repository under the --repos directories, and the
targets of the user's `url.<base>.insteadOf` rewrites."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from .common import Discovery
from .gitconfig import SshAlias, Variable, ssh_aliases, variables

# Not `git`: the presets are named after what they hold, and github etc. are built in.
PRESET = "git-remotes"
MAX_DEPTH = 6
REMOTE_KEYS = ("url", "pushurl")
REWRITE_KEYS = {"insteadof": "insteadOf", "pushinsteadof": "pushInsteadOf"}
SSH_SCHEMES = ("ssh", "git+ssh", "ssh+git")
SSH_PORT = 22
_REMOTE_HELPER = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*::")
_SCP = re.compile(r"(?:[^@/]+@)?([^:/\[\]]+|\[[^\]/]+\]):.*")  # [user@]host:path

Rewrites = Sequence[tuple[str, str]]  # (prefix, base) of url.<base>.insteadOf = prefix


def find_git(found: Discovery) -> None:
    text = found.read_text(found.home / ".ssh/config")
    aliases = ssh_aliases(text) if text else {}
    rewrites = _rewrites(found, aliases)
    for top in found.repos:
        for config in _repositories(found, top):
            for var in _read(found, config):
                if var.section == "remote" and var.key in REMOTE_KEYS:
                    _add_remote(found, _rewrite(var.value, rewrites),
                                f"{config}:{var.line} {var.name}", aliases)


def _read(found: Discovery, path: Path) -> list[Variable]:
    text = found.read_text(path)
    if text is None:
        return []
    try:
        return list(variables(text))
    except ValueError as e:
        found.skip(path, f"invalid git config ({e})")
        return []


def _rewrites(found: Discovery, aliases: Mapping[str, SshAlias]) -> Rewrites:
    """The user's URL rewrites; the base of each is a destination by itself too."""
    rewrites = []
    for path in (found.home / ".gitconfig", found.home / ".config/git/config",
                 found.root / "etc/gitconfig"):
        for var in _read(found, path):
            if var.section != "url" or not var.subsection or var.key not in REWRITE_KEYS:
                continue
            # The base may carry a token: the comment names the setting, not the URL.
            _add_remote(found, var.subsection, f"{path}:{var.line} url.<base>."
                                               f"{REWRITE_KEYS[var.key]}", aliases)
            if var.key == "insteadof":
                rewrites.append((var.value, var.subsection))
    return rewrites


def _rewrite(url: str, rewrites: Rewrites) -> str:
    """As git does: the longest matching insteadOf prefix wins."""
    matches = [(len(prefix), base + url[len(prefix):]) for prefix, base in rewrites
               if prefix and url.startswith(prefix)]
    return max(matches)[1] if matches else url


def _add_remote(found: Discovery, remote: str, source: str,
                aliases: Mapping[str, SshAlias]) -> None:
    text = remote.strip()
    if _REMOTE_HELPER.match(text):
        found.skip(source, "a remote helper (transport::address); check it by hand")
        return
    url = text if "://" in text else _scp_url(text)
    if url is None:
        return  # a path on this machine
    url, alias = _resolve_alias(url, aliases)
    found.add_url(PRESET, url, f"{source} (ssh alias {alias})" if alias else source)


def _scp_url(text: str) -> str | None:
    """`[user@]host:path` is ssh to host; a path (no colon before the first slash) is local."""
    match = _SCP.fullmatch(text)
    if match is None or text.startswith(("/", ".", "~")):
        return None
    return f"ssh://{match.group(1)}/"


def _resolve_alias(url: str, aliases: Mapping[str, SshAlias]) -> tuple[str, str | None]:
    """ssh connects to the HostName and Port its config gives an alias like `gh-work`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return url, None  # reported when the URL is read
    alias = aliases.get(parts.hostname or "")
    if parts.scheme.lower() not in SSH_SCHEMES or alias is None:
        return url, None
    host = alias.hostname or parts.hostname or ""
    # A port in the URL is given to ssh as -p, which wins over its config.
    port = port or alias.port or SSH_PORT
    return f"ssh://{f'[{host}]' if ':' in host else host}:{port}/", parts.hostname


def _repositories(found: Discovery, top: Path) -> Iterator[Path]:
    """The config file of every repository at or below `top` (bare ones too), in name order."""
    def unreadable(error: OSError) -> None:
        found.skip(error.filename or top, error.strerror or str(error))

    for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable):
        here = Path(dirpath)
        dirnames.sort()
        if ".git" in dirnames or ".git" in filenames:
            config = _config_of(found, here / ".git")
            if config is not None:
                yield config
            if ".git" in dirnames:
                dirnames.remove(".git")
        elif {"HEAD", "config"} <= set(filenames) and "objects" in dirnames:
            yield here / "config"
            dirnames.clear()
        if len(here.relative_to(top).parts) >= MAX_DEPTH:
            dirnames.clear()


def _config_of(found: Discovery, dotgit: Path) -> Path | None:
    """A `.git` directory, or a `.git` file (worktree, submodule) saying where it is."""
    gitdir = dotgit
    if not dotgit.is_dir():
        text = found.read_text(dotgit)
        if text is None:
            return None
        if not text.startswith("gitdir:"):
            found.skip(dotgit, "expected 'gitdir: PATH'")
            return None
        gitdir = dotgit.parent / text.removeprefix("gitdir:").strip()
    # A worktree keeps its remotes in the main repository's config.
    common = gitdir / "commondir"
    text = found.read_text(common) if common.is_file() else None
    # Lexically, for the comments: ../../.git/modules/lib reads better resolved.
    return Path(os.path.normpath((gitdir / text.strip() if text else gitdir) / "config"))
