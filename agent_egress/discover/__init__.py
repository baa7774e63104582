"""`agent-egress discover`: the registries and source-control hosts this user's toolchains are
configured to use, printed as policy presets.

Each toolchain has a reader in a `discover_*` module; this one runs them and writes YAML that is
valid as the `presets:` section of a policy. Every entry names the file, command or
environment variable it came from, so the user can judge it before allowing it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml

from .apt import find_apt
from .cargo import find_cargo
from .common import Discovery, Entry
from .docker import find_docker
from .gem import find_gem
from .git import find_git
from .go import find_go
from .held import find_held, render_held
from .maven import find_maven
from .npm import find_npm
from .pip import find_pip

# In this order in the output; the reader names its preset (pip, npm, ..., git-remotes).
FINDERS: tuple[Callable[[Discovery], None], ...] = (
    find_pip, find_npm, find_apt, find_cargo, find_go, find_maven, find_gem, find_docker,
    find_git)
COMMENT_COLUMN_MAX = 48

HEADER = """\
# Registry presets found by `agent-egress discover` in this user's toolchain configuration.
# Each entry's comment names the file, command or environment variable it came from: review
# them, then allow a preset in an account with `- preset: NAME`.
"""


def discover(home: Path, root: Path, repos: list[Path], env: Mapping[str, str]) -> str:
    """YAML text: a header, `# skipped ...` lines for what could not be read, and `presets:`."""
    found = Discovery(home, root, repos, env)
    for finder in FINDERS:
        try:
            finder(found)
        except Exception as e:  # noqa: BLE001
            # A reader's bug must not cost the user the other toolchains; say where it was.
            found.skip(finder.__name__.removeprefix("find_"), f"internal error: {e!r}")
    held = find_held(found)
    return HEADER + "".join(f"# skipped {line}\n" for line in map(_one_line, found.skipped)) \
        + render_presets(found.presets) + render_held(held)


def render_presets(presets: Mapping[str, Mapping[str, Entry]]) -> str:
    if not presets:
        return "presets: {}\n"
    lines = ["presets:"]
    for name, entries in presets.items():
        lines.append(f"  {name}:")
        heads = {key: f"    - {'cidr' if e.is_cidr else 'host'}: {_scalar(e.target)}"
                 for key, e in entries.items()}
        column = min(max(len(h) for h in heads.values()), COMMENT_COLUMN_MAX)
        for key, entry in entries.items():
            lines.append(f"{heads[key]:{column}}  # {_one_line(entry.comment())}")
            lines.append(f"      ports: [{', '.join(map(str, sorted(entry.ports)))}]")
    return "\n".join(lines) + "\n"


def _scalar(text: str) -> str:
    """Plain when YAML reads it back as this string; `*.x` would be an alias, and a host may
    be called `on`, `null` or `no`."""
    try:
        plain = yaml.safe_load(text) == text and ":" not in text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def _one_line(text: str) -> str:
    """Comment text that stays one comment line whatever a file name or setting contains."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
