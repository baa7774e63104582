"""gem: the `:sources:` list in the user's and the system's gemrc."""

from __future__ import annotations

import yaml

from .common import Discovery

PRESET = "gem"
# gem writes its keys as Ruby symbols, which YAML reads as strings with a leading colon.
SOURCE_KEYS = (":sources", "sources")


def find_gem(found: Discovery) -> None:
    for path in (found.home / ".gemrc", found.root / "etc/gemrc"):
        text = found.read_text(path)
        if text is None:
            continue
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            found.skip(path, f"invalid YAML ({str(e).splitlines()[0]})")
            continue
        if config is None:
            continue
        if not isinstance(config, dict):
            found.skip(path, "expected a mapping of settings")
            continue
        for key in SOURCE_KEYS:
            sources = config.get(key)
            if sources is None:
                continue
            if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
                found.skip(f"{path} {key}:", "expected a list of URLs")
                continue
            for url in sources:
                found.add_url(PRESET, url, f"{path} {key}:")
