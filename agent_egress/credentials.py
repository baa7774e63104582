"""The secrets the proxy holds for its credentials (`credentials:` in the policy): read at load
and at every reload, swapped with the policy they belong to, never shown.

A secret comes from a file (read through a checked chain, refused when a governed account
could read or write it, or write anything on the way to it: filetrust.py) or from the proxy's
environment. `Secrets` gives the header to inject for a credential and finds a credential's
value in what a client sends (the tripwire): as sent, percent-decoded, and inside base64 (each
of the three alignments a value can have in a longer base64 text, standard and URL-safe) or
hex.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .filetrust import open_chain
from .rules import Credential, PolicyDocument, PolicyError, Problem, Scheme

SCANNED_BODY = 64 * 1024  # the tripwire reads this much of a request body
MIN_SECRET = 8  # a shorter value would trip on ordinary traffic
MAX_SECRET = 16 * 1024
_Stamp = tuple[int, int, int, int] | None


@dataclass(frozen=True, slots=True)
class Secret:
    """One credential's value, held by the proxy. Its repr never shows the value."""

    credential: Credential
    header_value: str = field(repr=False)
    value: str = field(repr=False)
    needles: tuple[bytes, ...] = field(repr=False)


class Secrets:
    """The loaded secrets of one policy: immutable, replaced whole on reload."""

    def __init__(self, secrets: Mapping[str, Secret] | None = None,
                 stamps: Mapping[str, _Stamp] | None = None) -> None:
        self._secrets = dict(secrets or {})
        self._stamps = dict(stamps or {})
        # every form the tripwire knows, so that command lines are redacted of each
        self.values = tuple({needle.decode("ascii") for s in self._secrets.values()
                             for needle in s.needles})
        self._needles = tuple((name, s.needles) for name, s in self._secrets.items())

    def __repr__(self) -> str:
        return f"Secrets({', '.join(self._secrets)})"

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def header(self, name: str) -> tuple[str, str] | None:
        """The header name and value that credential `name` is sent as."""
        secret = self._secrets.get(name)
        return None if secret is None else (secret.credential.header, secret.header_value)

    def files(self) -> dict[str, _Stamp]:
        """The secret files read, each with what it was when read (see `stamp`)."""
        return dict(self._stamps)

    def carried(self, parts: Iterable[bytes]) -> str | None:
        """The name of the first credential whose value one of `parts` carries, or None."""
        for part in parts:
            if not part:
                continue
            found = self._find(part)
            if found is None and b"%" in part:
                found = self._find(percent_decoded(part))
            if found is not None:
                return found
        return None

    def _find(self, data: bytes) -> str | None:
        for name, needles in self._needles:
            for needle in needles:
                if needle in data:
                    return name
        return None


# Percent-decoding in C: binascii's quoted-printable decoder reads `=XX`, so `%` becomes `=`
# (and `=` a NUL, turned back after) once every `%` that starts no escape is set aside as \x01.
# Exact (urllib.parse.unquote_to_bytes) except that NUL and \x01 in the data, and escapes
# decoding to them, come out as `=` and `%`: bytes no needle holds, so a needle is never missed.
_LONE_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_TO_QP = bytes.maketrans(b"=%", b"\0=")
_FROM_QP = bytes.maketrans(b"\0\1", b"=%")


def percent_decoded(data: bytes) -> bytes:
    """`data` with every %XX escape decoded (about 10 times faster than unquote_to_bytes on a
    64 KiB body full of escapes); see above for the one difference."""
    set_aside = _LONE_PERCENT.sub(b"\x01", data)
    return binascii.a2b_qp(set_aside.translate(_TO_QP)).translate(_FROM_QP)


def body_head(body: bytes, encoding: str | None) -> bytes:
    """The first SCANNED_BODY bytes of a request body as the origin will read them: a gzip or
    deflate body is inflated (that much of it, no more)."""
    head = body[:SCANNED_BODY]
    coding = (encoding or "").strip().lower()
    if coding not in ("gzip", "x-gzip", "deflate"):
        return head
    try:
        inflater = zlib.decompressobj(wbits=47 if "gzip" in coding else 15)
        inflated = inflater.decompress(body, SCANNED_BODY)
    except zlib.error:
        return head
    return head + b"\n" + inflated


def stamp(path: str) -> _Stamp:
    """What a file is now (inode, mtime, size, and ctime: a change of owner, mode or ACL that
    lets a governed account read the secret is a change too), to see it change; None when it
    cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns


def load_secrets(document: PolicyDocument, governed: Mapping[int, str],
                 environ: Mapping[str, str] | None = None) -> Secrets:
    """Reads every credential's secret; PolicyError (FILE:LINE:COL at the entry's file or env)
    listing each one that cannot be used. No message holds a value."""
    env = os.environ if environ is None else environ
    problems: list[Problem] = []
    secrets: dict[str, Secret] = {}
    stamps: dict[str, _Stamp] = {}
    for name, credential in document.credentials.items():
        try:
            if credential.file is not None:
                stamps[credential.file] = stamp(credential.file)
                raw = _read_file(credential.file, governed)
            elif credential.env is not None and credential.env in env:
                raw = env[credential.env].encode()
            else:
                raise _Unusable(f"environment variable {credential.env} is not set in the "
                                "proxy's environment")
            secrets[name] = _secret(credential, raw)
        except _Unusable as e:
            file, line, col = credential.origin
            problems.append(Problem(file, line, col, f"credential {name}: {e}"))
    if problems:
        raise PolicyError(problems)
    return Secrets(secrets, stamps)


class _Unusable(Exception):
    pass


def _read_file(path: str, governed: Mapping[int, str]) -> bytes:
    try:
        fd, chain = open_chain(path)
    except OSError as e:
        raise _Unusable(f"cannot read {path}: {e.strerror or e}") from None
    try:
        reason = chain.untrusted_reason(governed) or chain.readable_reason(governed)
        if reason is not None:
            raise _Unusable(f"refused: {reason}")
        if not stat.S_ISREG(chain.steps[-1].st.st_mode):
            raise _Unusable(f"{path} is not a regular file")
        data = os.read(fd, MAX_SECRET + 1)
    except OSError as e:
        raise _Unusable(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET:
        raise _Unusable(f"{path} is larger than {MAX_SECRET} bytes; expected one secret")
    return data


def _secret(credential: Credential, raw: bytes) -> Secret:
    text = raw.strip(b"\r\n")
    if not text:
        raise _Unusable("the secret is empty")
    if not all(0x21 <= byte <= 0x7E for byte in text):
        raise _Unusable("the secret holds spaces, control characters or non-ASCII bytes; "
                        "expected one token (a trailing newline is removed)")
    if len(text) < MIN_SECRET:
        raise _Unusable(f"the secret is shorter than {MIN_SECRET} characters: too short to "
                        "be told from ordinary traffic")
    value = text.decode("ascii")
    if credential.scheme is Scheme.BEARER:
        header_value = f"Bearer {value}"
    elif credential.scheme is Scheme.BASIC:
        header_value = "Basic " + base64.b64encode(
            f"{credential.username}:{value}".encode()).decode("ascii")
    else:
        header_value = value
    return Secret(credential, header_value, value, needles(text))


def needles(value: bytes) -> tuple[bytes, ...]:
    """The forms of `value` looked for: as is, hex, and base64 at each alignment."""
    found = {value, binascii.hexlify(value), binascii.hexlify(value).upper()}
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + value)
        start = (pad * 8 + 5) // 6  # characters that also encode bytes before the value
        end = (pad + len(value)) * 8 // 6  # characters wholly from the value
        middle = encoded[start:end]
        found.add(middle)
        found.add(middle.replace(b"+", b"-").replace(b"/", b"_"))
    return tuple(sorted(found, key=len))
