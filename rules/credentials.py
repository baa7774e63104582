"""The `credentials:` section and a rule's `credential:` reference, as the loader reads them.

Only names and settings are checked here (a name per entry, `file` or `env` but not both, a
scheme, a `username` for `basic`, a header the proxy may set); the secret itself is read by the
proxy (agent_egress/credentials.py), never by the policy engine.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

import yaml

from .model import Credential, Scheme
from .source import position

if TYPE_CHECKING:
    from .loader import _Reader

CREDENTIAL_KEYS = ("file", "env", "header", "scheme", "username")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# headers that frame the message, route it or authenticate to the proxy: never set by a rule
_RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
    "upgrade", "expect", "proxy-authorization", "proxy-connection",
})


def credential_entries(reader: _Reader, node: yaml.Node) -> dict[str, Credential]:
    credentials = {}
    for name, (key, value) in (reader.mapping(node, "credentials", None) or {}).items():
        if not _NAME.fullmatch(name):
            reader.problem(key, f"credential name {name!r}: expected letters, digits, '_', '.' "
                                "and '-', at most 64")
            continue
        credential = _entry(reader, name, key, value)
        if credential is not None:
            credentials[name] = credential
    return credentials


def _entry(reader: _Reader, name: str, key: yaml.Node, node: yaml.Node) -> Credential | None:
    what = f"credential {name}"
    fields = reader.mapping(node, what, CREDENTIAL_KEYS)
    if fields is None:
        return None
    sources = [k for k in ("file", "env") if k in fields]
    if len(sources) != 1:
        found = "both" if sources else "neither"
        reader.problem(node if sources else key, f"{what}: expected exactly one of file (a "
                       f"path the proxy reads) or env (a variable of the proxy), found {found}")
        return None
    origin_node = fields[sources[0]][1]
    text = reader.string(origin_node, f"{what}: {sources[0]}")
    if text is None:
        return None
    if sources[0] == "file" and not text.startswith("/"):
        reader.problem(origin_node, f"{what}: file {text!r} is relative; expected an absolute "
                                    "path like /etc/agent-egress/credentials/NAME")
        return None
    if sources[0] == "env" and not _ENV_NAME.fullmatch(text):
        reader.problem(origin_node, f"{what}: env {text!r}: expected a variable name like "
                                    "CI_TOKEN")
        return None
    header = "Authorization"
    if "header" in fields:
        header_node = fields["header"][1]
        header = reader.string(header_node, f"{what}: header") or header
        if not _HEADER_NAME.fullmatch(header):
            reader.problem(header_node, f"{what}: header {header!r}: expected an HTTP header "
                                        "name like Authorization or X-Api-Key")
        elif header.lower() in _RESERVED_HEADERS:
            reader.problem(header_node, f"{what}: header {header!r} frames or routes the "
                                        "request; expected a header like Authorization")
    scheme = Scheme.BEARER
    if "scheme" in fields:
        scheme_node = fields["scheme"][1]
        scheme_text = reader.string(scheme_node, f"{what}: scheme")
        if scheme_text is not None:
            try:
                scheme = Scheme(scheme_text)
            except ValueError:
                close = difflib.get_close_matches(scheme_text, [s.value for s in Scheme], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                reader.problem(scheme_node, f"{what}: scheme {scheme_text!r}{hint}; expected "
                                            "bearer, basic or raw")
    username = None
    if "username" in fields:
        username_key, username_node = fields["username"]
        username = reader.string(username_node, f"{what}: username")
        if scheme is not Scheme.BASIC:
            reader.problem(username_key, f"{what}: username is only sent with scheme basic; "
                                         "expected scheme: basic, or no username")
        elif username is not None and (":" in username or not username.isprintable()):
            reader.problem(username_node, f"{what}: username {username!r}: expected no ':' "
                                          "and no control characters")
    elif scheme is Scheme.BASIC:
        reader.problem(node, f"{what}: scheme basic needs a username; expected username: "
                             "NAME")
    line, col = position(origin_node)
    return Credential(name, reader.where(key), (reader.file, line, col),
                      file=text if sources[0] == "file" else None,
                      env=text if sources[0] == "env" else None,
                      header=header, scheme=scheme, username=username)


def credential_reference(reader: _Reader, key: yaml.Node, node: yaml.Node,
                         deny: bool) -> str | None:
    """The name a rule's `credential:` gives, if the policy defines it."""
    name = reader.string(node, "credential")
    if name is None:
        return None
    if deny:
        reader.problem(key, "credential belongs on allow rules; a deny rule sends nothing")
        return None
    if name not in reader.credentials:
        known = ", ".join(sorted(reader.credentials)) or "none defined"
        close = difflib.get_close_matches(name, list(reader.credentials), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        reader.problem(node, f"credential {name!r} is not defined{hint}; expected a name "
                             f"from credentials: ({known})")
        return None
    return name
