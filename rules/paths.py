"""Request paths in the one form that path rules are matched against, and the raw paths that
cannot be matched safely at all.

The query and fragment go; percent-escapes of unreserved characters are decoded (RFC 3986 6.2.2.2)
and the rest upper-cased; dot-segments are removed (RFC 3986 5.2.4). So `/v1/%2e%2e/admin` and
`/v1/../admin` are both `/admin`, and a `/v1/*` rule never sees them as below `/v1`.

Origins do not all stop there: many decode `%2F` to `/` before routing, read `\\` as `/`, drop
`;params` from `..;`, decode twice, accept overlong UTF-8 or fold full-width dots (NFKC). A path
that one of those readings moves elsewhere is *ambiguous* (`ambiguous_path`), and a rule that
looks at paths refuses it rather than deciding on one reading while the origin acts on another.
`%2F` inside an ordinary segment (npm's `@scope%2Fname`) stays below the same parent whichever
way it is read, so it is not refused: instead a path is matched both as sent and with `%2F` read
as `/`, and a rule decides only when the two readings agree (`RequestPath`, `paths_match`).

A deny rule also matches the readings common origins give a path that is not ambiguous in the
sense above (`deny_paths_match`): `//` merged into `/` (nginx), `;params` dropped from segments
(Tomcat, Jetty), letters in either case (Windows servers), a trailing `/` added or taken away
(the directory and its index). Denying a little more than written fails closed; an allow rule
never matches more than written.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Printable ASCII but for `%` (an escape to look into), `\` and `#` (read differently by origins)
_PLAIN_PATH = re.compile(r"[!\"$&'()*+,\-./0-9:;<=>@A-Z\[\]^_`a-z{|}~]*")
_HEX = frozenset("0123456789abcdefABCDEF")
_SHOWN_LENGTH = 120


def normalize_path(raw: str) -> str:
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        path = _ESCAPE.sub(_decode_unreserved, path)
    if not path.startswith("/"):
        path = "/" + path
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def ambiguous_path(raw_path: str) -> str | None:
    """Why an origin could read `raw_path` (a request target's path as sent; a query is cut
    off) as another path than the one rules are matched against, or None when it cannot."""
    path = raw_path.split("?", 1)[0]
    if _PLAIN_PATH.fullmatch(path) and "/." not in "/" + path:
        return None  # the common case: nothing to decode, no dot-segment
    for char in path:
        if char == "#":
            return "has '#', which a request target never carries"
        if char == "\\":
            return "has a backslash, which some origins read as '/'"
        if ord(char) < 0x20 or ord(char) == 0x7F:
            return "has a control character"
        if char == " ":
            return "has a raw space"
        if not char.isascii():
            return "has a raw non-ASCII character (origins decode raw bytes differently)"
    decoded = bytearray()
    i = 0
    while i < len(path):
        char = path[i]
        if char != "%":
            decoded.append(ord(char))
            i += 1
            continue
        digits = path[i + 1:i + 3]
        if len(digits) != 2 or not set(digits) <= _HEX:
            return "has invalid percent-encoding ('%' not followed by two hex digits)"
        code = int(digits, 16)
        if code == 0x00:
            return "encodes NUL (%00)"
        if code < 0x20 or code == 0x7F:
            return f"encodes a control character (%{code:02X})"
        if code == 0x5C:
            return "encodes a backslash (%5C), which some origins read as '/'"
        if code == 0x25 and len(path) >= i + 5 and set(path[i + 3:i + 5]) <= _HEX:
            return "is double-encoded (%25 followed by hex digits)"
        decoded.append(code)
        i += 3
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        return "decodes to invalid or overlong UTF-8 (as %C0%AE is an overlong '.')"
    folded = unicodedata.normalize("NFKC", text)
    if "\\" in folded or any(ord(c) < 0x20 or ord(c) == 0x7F for c in folded):
        return "decodes to a backslash or control character (after Unicode folding)"
    for segment in folded.split("/"):
        core = segment.split(";", 1)[0].rstrip(" ")
        if core and not core.strip("."):
            return f"has a dot-segment once decoded ('{core}'), which origins resolve " \
                   "differently"
    return None


def shown_path(raw_path: str) -> str:
    """A client's path as messages, headers and logs show it: no control or non-ASCII
    characters (percent-encoded instead), at most _SHOWN_LENGTH characters."""
    path = raw_path.split("?", 1)[0]
    shown = "".join(c if 0x20 < ord(c) < 0x7F else _escaped(c) for c in path[:_SHOWN_LENGTH])
    return shown + ("..." if len(path) > _SHOWN_LENGTH else "")


def _escaped(char: str) -> str:
    try:  # a byte that was not UTF-8 on the wire is a lone surrogate (surrogateescape)
        data = char.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = char.encode("utf-8", "surrogatepass")
    return "".join(f"%{b:02X}" for b in data)


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    output: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


class RequestPath:
    """A request's path as path rules read it: `normalized` as sent, `slashed` with `%2F`
    read as `/` as many origins do, and, worked out on first use, why the raw path is
    ambiguous (None if it is not)."""

    __slots__ = ("_ambiguity", "_checked", "normalized", "raw", "slashed")

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self.normalized = normalize_path(raw)
        normalized = self.normalized
        self.slashed = normalized.replace("%2F", "/") if "%2F" in normalized else normalized
        self._checked = False
        self._ambiguity: str | None = None

    @property
    def ambiguity(self) -> str | None:
        if not self._checked:
            self._ambiguity, self._checked = ambiguous_path(self.raw), True
        return self._ambiguity


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A glob over a normalised path: `*` is any run of characters, `/` included. `slashed`
    is the same glob with `%2F` read as `/`, matched against RequestPath.slashed."""

    text: str
    regex: re.Pattern[str]
    slashed: re.Pattern[str]
    loose: re.Pattern[str]  # `slashed` in either case, for deny rules' readings

    @classmethod
    def parse(cls, text: str) -> PathPattern:
        if not text.startswith("/"):
            raise ValueError(f"path pattern {text!r} must start with '/'")
        if "?" in text or "#" in text:
            raise ValueError(f"path pattern {text!r} has a query or fragment; "
                             "paths are matched without them")
        normalized = normalize_path(text)
        regex = _glob(normalized)
        slashed = normalized.replace("%2F", "/")
        return cls(text, regex, regex if slashed == normalized else _glob(slashed),
                   _glob(slashed, re.IGNORECASE))

    def matches(self, path: str) -> bool:
        return self.regex.fullmatch(path) is not None


def paths_match(patterns: Iterable[PathPattern], path: RequestPath) -> bool | None:
    """Whether some pattern matches `path` read as sent, and some (the same or another) with
    `%2F` read as `/`; None when the two readings disagree, so that no rule decides on one
    of them while the origin acts on the other."""
    as_sent = decoded = False
    plain = path.slashed is path.normalized  # no %2F in the path
    for pattern in patterns:
        matched = pattern.regex.fullmatch(path.normalized) is not None
        as_sent = as_sent or matched
        if plain and pattern.slashed is pattern.regex:  # no %2F on either side
            decoded = decoded or matched
        elif not decoded:
            decoded = pattern.slashed.fullmatch(path.slashed) is not None
    return as_sent if as_sent == decoded else None


def deny_paths_match(patterns: Iterable[PathPattern], path: RequestPath) -> bool | None:
    """For a deny rule: `paths_match`, and besides, whether some pattern matches a reading
    that common origins give the path (see the module's docstring)."""
    matched = paths_match(patterns, path)
    if matched is not False:
        return matched
    readings = _origin_readings(path.slashed)
    return any(pattern.loose.fullmatch(reading) for pattern in patterns
               for reading in readings)


_SLASHES = re.compile(r"//+")
_PARAMS = re.compile(r";[^/]*")


def _origin_readings(path: str) -> set[str]:
    merged = _SLASHES.sub("/", path)
    readings = {merged, _PARAMS.sub("", merged)}
    for reading in list(readings):
        readings.add(reading.rstrip("/") or "/")
        readings.add(reading if reading.endswith("/") else reading + "/")
    return readings


def _glob(normalized: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in normalized.split("*")),
                      re.DOTALL | flags)
