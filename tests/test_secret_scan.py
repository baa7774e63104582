"""The tripwire's scan in-process (agent_egress/credentials.py): the fast percent-decoding
against the standard library's, and secrets found however a client spells them."""

from __future__ import annotations

import base64
import random
from urllib.parse import quote_from_bytes, unquote_to_bytes

import pytest

from agent_egress.credentials import Secret, Secrets, needles, percent_decoded
from agent_egress.rules import Credential

VALUE = "tok=en%4f9c2e7a1b"  # holds the two bytes the decoding treats specially
# the difference percent_decoded documents: NUL and \x01 come out as '=' and '%'
_DOCUMENTED = bytes.maketrans(b"\0\1", b"=%")


def secrets() -> Secrets:
    credential = Credential("api-token", "t:1", ("t", 1, 1), env="X")
    return Secrets({"api-token": Secret(credential, f"Bearer {VALUE}", VALUE,
                                        needles(VALUE.encode()))})


@pytest.mark.parametrize("seed", range(8))
def test_percent_decoding_is_the_standard_one(seed):
    rng = random.Random(seed)
    alphabet = b"%%%=0123456789abcdefABCDEFgG\r\n _\t\0\1\xff"
    for _ in range(5000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        assert percent_decoded(data) == unquote_to_bytes(data).translate(_DOCUMENTED), data


@pytest.mark.parametrize("spelling", [
    "every byte", "every other byte", "lower-case hex", "after a lone %", "after %%",
    "before a lone % at the end", "beside NUL bytes", "beside = and CR LF",
    "after a lone % and CR",
])
def test_a_percent_encoded_secret_is_found_however_it_is_spelled(spelling):
    value = VALUE.encode()
    every = "".join(f"%{b:02X}" for b in value).encode()
    other = b"".join(bytes([b]) if i % 2 else b"%%%02X" % b for i, b in enumerate(value))
    data = {
        "every byte": every,
        "every other byte": other,
        "lower-case hex": every.lower(),
        "after a lone %": b"100% " + every,
        "after %%": b"%%" + every,
        "before a lone % at the end": other + b"%",
        "beside NUL bytes": b"\0%00" + other + b"\0\1",
        "beside = and CR LF": b"a=%\r\nb=" + other + b"%\r\n=",
        "after a lone % and CR": b"%\r" + other + b"\n",
    }[spelling]
    assert VALUE.encode() in unquote_to_bytes(data)
    assert secrets().carried([data]) == "api-token"


def test_other_forms_and_no_false_alarm():
    found = secrets()
    value = VALUE.encode()
    assert found.carried([b"x=" + quote_from_bytes(value).encode()]) == "api-token"
    assert found.carried([b"k: " + base64.b64encode(b"u:" + value)]) == "api-token"
    assert found.carried([b"%" * 70000, value.hex().encode()]) == "api-token"
    assert found.carried([b"%" * 70000, b"%41" * 20000, b"tok=en%4f9c2e7a1", b""]) is None
