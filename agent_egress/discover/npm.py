"""npm: the default and scoped registries from npm's environment variables and npmrc files, or
the registry that npm itself reports when none is configured."""

from __future__ import annotations

import re
from pathlib import Path

from .common import Discovery

PRESET = "npm"
_ENV_PREFIX = "npm_config_"
_ENV_REFERENCE = re.compile(r"\$\{([^}]*)\}")


def find_npm(found: Discovery) -> None:
    configured = _from_environment(found)
    for path in _npmrc_files(found):
        configured = _from_npmrc(found, path) or configured
    if not configured:
        _from_npm_itself(found)


def _is_registry_key(key: str) -> bool:
    """`registry`, or `@scope:registry` for the packages of one scope."""
    return key == "registry" or (key.startswith("@") and key.endswith(":registry"))


def _from_environment(found: Discovery) -> bool:
    configured = False
    for name, value in sorted(found.env.items()):
        # npm reads its settings from npm_config_* in any letter case.
        key = name[len(_ENV_PREFIX):].lower()
        if name.lower().startswith(_ENV_PREFIX) and _is_registry_key(key) and value.strip():
            found.add_url(PRESET, value, f"env {name}")
            configured = configured or key == "registry"
    return configured


def _setting(found: Discovery, name: str) -> str | None:
    return found.env.get(f"{_ENV_PREFIX}{name}") or found.env.get(
        f"{_ENV_PREFIX}{name}".upper())


def _npmrc_files(found: Discovery) -> list[Path]:
    user = _setting(found, "userconfig")
    system = _setting(found, "globalconfig")
    return [Path(user) if user else found.home / ".npmrc",
            Path(system) if system else found.root / "etc/npmrc"]


def _from_npmrc(found: Discovery, path: Path) -> bool:
    """Reads one npmrc; True if it sets the default registry."""
    text = found.read_text(path)
    if text is None:
        return False
    configured = False
    for number, line in enumerate(text.splitlines(), 1):
        key, sep, value = line.strip().partition("=")
        key = key.strip()
        if not sep or key.startswith((";", "#")) or not _is_registry_key(key):
            continue
        source = f"{path}:{number} {key}"
        url = _expand(found, value.strip().strip("\"'"), source)
        if url:
            found.add_url(PRESET, url, source)
            configured = configured or key == "registry"
    return configured


def _expand(found: Discovery, value: str, source: str) -> str | None:
    """npm replaces ${NAME} in settings with the environment variable."""
    missing = [n for n in _ENV_REFERENCE.findall(value) if n not in found.env]
    if missing:
        found.skip(source, f"uses ${{{missing[0]}}}, which is not set")
        return None
    return _ENV_REFERENCE.sub(lambda m: found.env[m.group(1)], value)


def _from_npm_itself(found: Discovery) -> None:
    # npm would otherwise check for a newer npm: discover must not reach out itself.
    output = found.run(["npm", "config", "get", "registry"],
                       {"npm_config_update_notifier": "false", "NO_UPDATE_NOTIFIER": "1"})
    value = (output or "").strip()
    if value and value not in ("undefined", "null"):
        found.add_url(PRESET, value, "command `npm config get registry` (npm's default)")
