"""cargo: registry indexes and replacement sources from cargo's configuration and environment."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .common import Discovery

PRESET = "cargo"
# [source.NAME] keys that name something to fetch; local-registry and directory stay local.
SOURCE_KEYS = ("registry", "git")
_ENV_INDEX = re.compile(r"CARGO_REGISTRIES_(.+)_INDEX")


def find_cargo(found: Discovery) -> None:
    for name, value in sorted(found.env.items()):
        if _ENV_INDEX.fullmatch(name):
            found.add_url(PRESET, value, f"env {name}")
    cargo_home = Path(found.env["CARGO_HOME"]) if found.env.get("CARGO_HOME") \
        else found.home / ".cargo"
    # cargo reads `config` from before config.toml existed; both may be present.
    for path in (cargo_home / "config.toml", cargo_home / "config"):
        config = _load(found, path)
        if config is not None:
            _from_config(found, path, config)


def _load(found: Discovery, path: Path) -> dict[str, Any] | None:
    text = found.read_text(path)
    if text is None:
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        found.skip(path, f"invalid TOML ({e})")
        return None


def _from_config(found: Discovery, path: Path, config: Mapping[str, Any]) -> None:
    _url(found, _table(found, path, config, "registry"), "index", f"{path} registry")
    for section in ("registries", "source"):
        keys = ("index",) if section == "registries" else SOURCE_KEYS
        for name, table in _table(found, path, config, section).items():
            if not isinstance(table, dict):
                found.skip(f"{path} {section}.{name}", "expected a table")
                continue
            for key in keys:
                _url(found, table, key, f"{path} {section}.{name}")


def _table(found: Discovery, path: Path, config: Mapping[str, Any],
           key: str) -> Mapping[str, Any]:
    value = config.get(key, {})
    if isinstance(value, dict):
        return value
    found.skip(f"{path} {key}", "expected a table")
    return {}


def _url(found: Discovery, table: Mapping[str, Any], key: str, where: str) -> None:
    value = table.get(key)
    if isinstance(value, str):
        found.add_url(PRESET, value, f"{where}.{key}")
    elif value is not None:
        found.skip(f"{where}.{key}", "expected a URL string")
