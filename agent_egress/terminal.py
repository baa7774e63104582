"""Text that reaches a terminal made harmless: names chosen by a governed account's clients
(hosts, paths, command lines, reasons quoting them) must not move the cursor, recolour,
erase or fake lines of what an operator reads."""

from __future__ import annotations

import unicodedata

# Unicode characters that reorder or hide text without being control characters: bidirectional
# overrides and isolates, zero-width characters, line and paragraph separators.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def printable(text: str) -> str:
    """`text` with every control, format or separator character written as an escape
    (`\\x1b`, `\\u202e`); everything else, non-ASCII letters included, kept as it is."""
    if text.isprintable():  # the common case, and a fast one
        return text
    return "".join(char if char == " " or unicodedata.category(char) not in _INVISIBLE_CATEGORIES
                   else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """`1 event`, `2 events`."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"
