"""maven: mirror and repository URLs in the user's and the system's settings.xml."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .common import Discovery

PRESET = "maven"
# Elements with a <url> that maven downloads from; any of them may sit in a profile.
URL_OWNERS = ("mirror", "repository", "pluginRepository")


def find_maven(found: Discovery) -> None:
    for path in (found.home / ".m2/settings.xml", found.root / "etc/maven/settings.xml"):
        root = _parse(found, path)
        if root is not None:
            _from_settings(found, path, root)


def _parse(found: Discovery, path: Path) -> ET.Element | None:
    # Bytes, not text: the XML declaration names the encoding.
    data = found.read_bytes(path)
    if data is None:
        return None
    try:
        # The user's own settings.xml and pom.xml. ElementTree resolves no external entities, and
        # the expat it runs on (>= 2.4) bounds entity expansion ("billion laughs").
        return ET.fromstring(data)  # noqa: S314
    except ET.ParseError as e:
        found.skip(path, f"invalid XML ({e})")
        return None


def _local(tag: str) -> str:
    """The name without its namespace: settings.xml exists with several or none."""
    return tag.rpartition("}")[2]


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def _from_settings(found: Discovery, path: Path, root: ET.Element) -> None:
    for element in root.iter():
        kind = _local(element.tag)
        url = _child_text(element, "url") if kind in URL_OWNERS else None
        if not url:
            continue
        ident = _child_text(element, "id")
        source = f"{path} {kind} {ident}" if ident else f"{path} {kind}"
        if "${" in url:
            found.skip(source, "the URL uses a ${property}; resolve it by hand")
            continue
        found.add_url(PRESET, url, source)
