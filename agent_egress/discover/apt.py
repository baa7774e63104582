"""apt: the archive URIs in sources.list and sources.list.d, one-line (`*.list`) and deb822
(`*.sources`) formats."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .common import Discovery

PRESET = "apt"
_TYPES = ("deb", "deb-src")
_DISABLED = ("no", "false", "0")


def find_apt(found: Discovery) -> None:
    for path in _source_files(found.root / "etc/apt"):
        text = found.read_text(path)
        if text is None:
            continue
        if path.suffix == ".sources":
            _deb822(found, path, text)
        else:
            _one_line(found, path, text)


def _source_files(apt: Path) -> list[Path]:
    parts = apt / "sources.list.d"
    # apt ignores other names in sources.list.d (backups, .save, .disabled).
    listed = sorted(p for p in parts.glob("*") if p.suffix in (".list", ".sources")) \
        if parts.is_dir() else []
    return [apt / "sources.list", *listed]


def _add_uri(found: Discovery, uri: str, source: str) -> None:
    # The mirror method fetches a list of mirrors over HTTP; the mirrors it names are not here.
    if uri.startswith("mirror://"):
        uri = "http://" + uri.removeprefix("mirror://")
    found.add_url(PRESET, uri, source)


def _one_line(found: Discovery, path: Path, text: str) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        source = f"{path}:{number}"
        if words[0] not in _TYPES:
            found.skip(source, f"expected deb or deb-src, found {words[0][:40]!r}")
            continue
        rest = words[1:]
        if rest and rest[0].startswith("["):
            # [ options ] run to the word that closes them; spaces inside are allowed.
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if not rest:
            found.skip(source, "no URI")
            continue
        _add_uri(found, rest[0], source)


def _deb822(found: Discovery, path: Path, text: str) -> None:
    for start, fields in _stanzas(found, path, text):
        if fields.get("enabled", (0, ""))[1].strip().lower() in _DISABLED:
            continue
        if "uris" not in fields:
            found.skip(f"{path}:{start}", "a stanza without URIs")
            continue
        number, value = fields["uris"]
        for uri in value.split():
            _add_uri(found, uri, f"{path}:{number}")


def _stanzas(found: Discovery, path: Path,
             text: str) -> Iterator[tuple[int, dict[str, tuple[int, str]]]]:
    """(first line, {field in lower case: (line, value)}) per paragraph."""
    fields: dict[str, tuple[int, str]] = {}
    start = 0
    for number, line in enumerate([*text.splitlines(), ""], 1):
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield start, fields
            fields = {}
        elif line[0] in " \t" and fields:
            key = next(reversed(fields))  # a continuation line extends the last field
            fields[key] = (fields[key][0], f"{fields[key][1]} {line.strip()}")
        elif ":" in line:
            name, _, value = line.partition(":")
            start = start if fields else number
            fields[name.strip().lower()] = (number, value.strip())
        else:
            found.skip(f"{path}:{number}", "expected 'Field: value'")
