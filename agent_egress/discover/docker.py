"""docker: registries the user has logged in to or has credential helpers for, and the daemon's
mirrors and insecure registries."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_network
from pathlib import Path

from .common import WEB_PORTS, Discovery, split_host_port

PRESET = "docker"
HTTPS = (443,)


def find_docker(found: Discovery) -> None:
    config_dir = Path(found.env["DOCKER_CONFIG"]) if found.env.get("DOCKER_CONFIG") \
        else found.home / ".docker"
    client_path = config_dir / "config.json"
    client = _settings(found, client_path)
    for key in ("auths", "credHelpers"):
        for name in _keys(found, client, key, f"{client_path} {key}"):
            _registry(found, name, HTTPS, f"{client_path} {key}")
    daemon_path = found.root / "etc/docker/daemon.json"
    daemon = _settings(found, daemon_path)
    source = f"{daemon_path} registry-mirrors"
    for url in _strings(found, daemon, "registry-mirrors", source):
        found.add_url(PRESET, url, source)
    source = f"{daemon_path} insecure-registries"
    for name in _strings(found, daemon, "insecure-registries", source):
        # An insecure registry may be reached over plain HTTP too.
        _registry(found, name, WEB_PORTS, source)


def _settings(found: Discovery, path: Path) -> dict[str, object]:
    config = found.read_json(path)
    if config is None:
        return {}
    if not isinstance(config, dict):
        found.skip(path, "expected a JSON object")
        return {}
    return config


def _keys(found: Discovery, settings: dict[str, object], key: str, source: str) -> list[str]:
    value = settings.get(key)
    if value is None:
        return []
    if not isinstance(value, dict):
        found.skip(source, "expected an object keyed by registry")
        return []
    return [str(k) for k in value]


def _strings(found: Discovery, settings: dict[str, object], key: str, source: str) -> list[str]:
    value = settings.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        found.skip(source, "expected a list of strings")
        return []
    return value


def _registry(found: Discovery, name: str, ports: Sequence[int], source: str) -> None:
    """A registry as docker names one: a URL, host[:port][/path], or (insecure) a network."""
    if "://" in name:
        found.add_url(PRESET, name, source)
        return
    if "/" in name and _is_network(name):
        found.skip(source, f"{name!r} is a network that docker trusts, not a registry")
        return
    try:
        host, port = split_host_port(name.split("/", 1)[0])
    except ValueError as e:
        found.skip(source, str(e))
        return
    found.add_host(PRESET, host, [port] if port else ports, source)


def _is_network(text: str) -> bool:
    try:
        ip_network(text, strict=False)
    except ValueError:
        return False
    return True
