"""go: the module proxies, the checksum database and the private module hosts, from the
environment or, for what it does not set, from `go env`."""

from __future__ import annotations

from collections.abc import Mapping

from .common import Discovery

PRESET = "go"
PROXY = "GOPROXY"
SUMDB = "GOSUMDB"
# Modules matching these are fetched from their own hosts (with git over HTTPS), not a proxy.
PRIVATE = ("GOPRIVATE", "GONOPROXY", "GONOSUMDB")
VARIABLES = (PROXY, SUMDB, *PRIVATE)
HTTPS = 443
_PROXY_KEYWORDS = ("direct", "off")
_GLOB = frozenset("*?[]\\")


def find_go(found: Discovery) -> None:
    values = {name: (found.env[name], f"env {name}") for name in VARIABLES
              if found.env.get(name)}
    values.update(_from_go_env(found, [name for name in VARIABLES if name not in values]))
    if PROXY in values:
        _proxies(found, *values[PROXY])
    if SUMDB in values:
        _sumdb(found, *values[SUMDB])
    for name in PRIVATE:
        if name in values:
            _private(found, *values[name])


def _from_go_env(found: Discovery, names: list[str]) -> Mapping[str, tuple[str, str]]:
    if not names:
        return {}
    # GOTOOLCHAIN=local: a go.mod or go.env must not make `go env` download a toolchain.
    output = found.run(["go", "env", *names], {"GOTOOLCHAIN": "local"})
    if output is None:
        return {}
    lines = output.splitlines()
    return {name: (value.strip(), f"command `go env {name}`")
            for name, value in zip(names, lines, strict=False) if value.strip()}


def _proxies(found: Discovery, value: str, source: str) -> None:
    # Comma: next proxy on 404/410; pipe: next proxy on any error. Both may be tried.
    for item in value.replace("|", ",").split(","):
        if item.strip() and item.strip() not in _PROXY_KEYWORDS:
            found.add_url(PRESET, item.strip(), source)


def _sumdb(found: Discovery, value: str, source: str) -> None:
    """`off`, `NAME[+KEY]` (served at https://NAME) or `NAME[+KEY] URL`."""
    words = value.split()
    if words == ["off"]:
        return
    if len(words) > 1:
        found.add_url(PRESET, words[1], source)
    else:
        found.add_host(PRESET, words[0].split("+", 1)[0], [HTTPS], source)


def _private(found: Discovery, value: str, source: str) -> None:
    """Module path patterns; their first element is the host (`*.corp.test/x` is *.corp.test)."""
    for pattern in value.split(","):
        host = pattern.strip().split("/", 1)[0]
        if not host:
            continue
        if _GLOB.intersection(host.removeprefix("*.")):
            found.skip(source, f"{host!r}: only a leading '*.' can be written as a policy host")
            continue
        found.add_host(PRESET, host, [HTTPS], source)
