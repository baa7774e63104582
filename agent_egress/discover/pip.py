"""pip: package indexes from pip's environment variables and configuration files, or the default
index that pip itself reports when none is configured."""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path

from .common import WEB_PORTS, Discovery, split_host_port

PRESET = "pip"
# `global` applies to every pip command; the others to the commands that fetch packages.
SECTIONS = ("global", "install", "download", "wheel")
# pip's help shows each option's default, after its own configuration is applied.
_HELP_DEFAULT = re.compile(r"--index-url <url> [^()]*\(default ([^\s)]+)\)")


def find_pip(found: Discovery) -> None:
    configured = _from_environment(found)
    for path in _config_files(found):
        configured = _from_config_file(found, path) or configured
    if not configured:
        _from_pip_help(found)


def _from_environment(found: Discovery) -> bool:
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        for url in found.env.get(name, "").split():
            found.add_url(PRESET, url, f"env {name}")
    _trusted_hosts(found, found.env.get("PIP_TRUSTED_HOST", ""), "env PIP_TRUSTED_HOST")
    return bool(found.env.get("PIP_INDEX_URL", "").strip())


def _config_files(found: Discovery) -> list[Path]:
    """pip's configuration files, the ones that win first."""
    explicit = found.env.get("PIP_CONFIG_FILE")
    if explicit == os.devnull:
        return []  # pip's documented way to load no configuration file at all
    files = [Path(explicit)] if explicit else []
    return files + [found.home / ".config/pip/pip.conf", found.home / ".pip/pip.conf",
                    found.root / "etc/xdg/pip/pip.conf", found.root / "etc/pip.conf"]


def _from_config_file(found: Discovery, path: Path) -> bool:
    """Reads one file; True if it sets index-url."""
    text = found.read_text(path)
    if text is None:
        return False
    config = configparser.RawConfigParser()  # as pip reads it: no interpolation
    try:
        config.read_string(text, str(path))
    except configparser.Error as e:
        found.skip(path, f"invalid configuration ({e.message.splitlines()[0]})")
        return False
    configured = False
    for section in SECTIONS:
        if not config.has_section(section):
            continue
        for key in ("index-url", "extra-index-url"):
            for url in config.get(section, key, fallback="").split():
                found.add_url(PRESET, url, f"{path} [{section}] {key}")
                configured = configured or key == "index-url"
        _trusted_hosts(found, config.get(section, "trusted-host", fallback=""),
                       f"{path} [{section}] trusted-host")
    return configured


def _trusted_hosts(found: Discovery, value: str, source: str) -> None:
    # A trusted host may be fetched over plain HTTP as well as HTTPS.
    for item in value.split():
        try:
            host, port = split_host_port(item)
        except ValueError as e:
            found.skip(source, str(e))
            continue
        found.add_host(PRESET, host, [port] if port else WEB_PORTS, source)


def _from_pip_help(found: Discovery) -> None:
    for program in ("pip", "pip3"):
        # No version check: discover must not reach out to an index itself.
        output = found.run([program, "install", "--help"], {"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        if output is None:
            continue
        match = _HELP_DEFAULT.search(" ".join(output.split()))
        command = f"command `{program} install --help` (pip's default index)"
        if match is None:
            found.skip(command, "no default --index-url in its output")
        else:
            found.add_url(PRESET, match.group(1), command)
        return
