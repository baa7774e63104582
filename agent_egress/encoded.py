"""Whether a DNS label looks like encoded data: the measure the resolver's tunnelling signals
and learn's warnings about dangerous rules share, so that both call the same label suspicious."""

from __future__ import annotations

import math
from collections import Counter

ENTROPY_MIN_LENGTH = 16
ENTROPY_BITS = 3.8


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def looks_encoded(label: str) -> bool:
    """Long enough and random enough to be data (base32, hex, ...) rather than a word."""
    return len(label) >= ENTROPY_MIN_LENGTH and entropy(label) > ENTROPY_BITS
