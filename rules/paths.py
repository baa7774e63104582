"""Request paths in the one form that path rules are matched against.

The query and fragment go; percent-escapes of unreserved characters are decoded (RFC 3986 6.2.2.2)
and the rest upper-cased; dot-segments are removed (RFC 3986 5.2.4). So `/v1/%2e%2e/admin` and
`/v1/../admin` are both `/admin`, and a `/v1/*` rule never sees them as below `/v1`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normalize_path(raw: str) -> str:
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        path = _ESCAPE.sub(_decode_unreserved, path)
    if not path.startswith("/"):
        path = "/" + path
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


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


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A glob over a normalised path: `*` is any run of characters, `/` included."""

    text: str
    regex: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> PathPattern:
        if not text.startswith("/"):
            raise ValueError(f"path pattern {text!r} must start with '/'")
        if "?" in text or "#" in text:
            raise ValueError(f"path pattern {text!r} has a query or fragment; "
                             "paths are matched without them")
        normalized = normalize_path(text)
        body = ".*".join(re.escape(part) for part in normalized.split("*"))
        return cls(text, re.compile(body, re.DOTALL))

    def matches(self, path: str) -> bool:
        return self.regex.fullmatch(path) is not None
