"""`agent-egress env`: the environment a governed account's login needs, so that its clients
use the proxy and trust it where a rule inspects HTTPS, without any other setting."""

from __future__ import annotations

import os
import shlex
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

CA_BUNDLE_NAME = "ca-bundle.pem"
CONTROL_SOCKET = "control.sock"
# Where distributions keep the system's CA certificates, first found wins.
SYSTEM_CA_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                   "/etc/ssl/ca-bundle.pem", "/etc/ssl/cert.pem")
# The variables each client reads for the CAs it trusts: curl, git, pip, requests and Python's
# ssl (OpenSSL's SSL_CERT_FILE, which Go and uv read too), Node, npm, cargo, the AWS CLI, Deno.
CA_VARIABLES = ("SSL_CERT_FILE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "PIP_CERT",
                "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "NPM_CONFIG_CAFILE",
                "CARGO_HTTP_CAINFO", "AWS_CA_BUNDLE", "DENO_CERT")
NO_PROXY = "localhost,127.0.0.1,::1"
SHELLS = ("sh", "fish", "systemd")


def default_control_path() -> Path:
    """The control socket `run` listens on by default: under /run as root, else in the user's
    runtime directory."""
    if os.geteuid() == 0:
        return Path("/run/agent-egress") / CONTROL_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return Path(runtime) / "agent-egress" / CONTROL_SOCKET


def system_ca_file() -> Path | None:
    candidates = [ssl.get_default_verify_paths().cafile, *SYSTEM_CA_FILES]
    return next((Path(c) for c in candidates if c and os.path.isfile(c)), None)


def write_ca_bundle(proxy_ca: Path, destination: Path, system_cas: Path | None) -> None:
    """The system's CAs and the proxy's CA in one file, readable by every account (it holds
    certificates only: the CA's key stays owner-only beside it). Written beside the old one
    and renamed over it, so a client never reads half a bundle."""
    parts = [system_cas.read_text()] if system_cas is not None else []
    parts.append(f"# agent-egress proxy CA ({proxy_ca})\n{proxy_ca.read_text()}")
    text = "".join(part if part.endswith("\n") else part + "\n" for part in parts)
    destination.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=destination.parent,
                                             prefix=f".{destination.name}.")
    try:
        with os.fdopen(descriptor, "w") as f:
            f.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, destination)
    except BaseException:
        os.unlink(temporary)
        raise


def variables(proxy_url: str, ca_bundle: Path, control: Path) -> list[tuple[str, str]]:
    """Proxy variables in both cases (curl reads only the lower-case http_proxy, other
    clients only the upper case), the CA variables, and the control socket."""
    out = []
    for name in ("http_proxy", "https_proxy"):
        out += [(name, proxy_url), (name.upper(), proxy_url)]
    out += [("no_proxy", NO_PROXY), ("NO_PROXY", NO_PROXY)]
    out += [(name, str(ca_bundle)) for name in CA_VARIABLES]
    out.append(("AGENT_EGRESS_CONTROL", str(control)))
    return out


def render(pairs: Sequence[tuple[str, str]], shell: str, comments: Sequence[str] = ()) -> str:
    """`export NAME=value` lines (sh), `set -gx NAME value` (fish), or `NAME=value` for
    systemd's EnvironmentFile= and environment.d."""
    lines = [f"# {comment}" for comment in comments]
    for name, value in pairs:
        if shell == "fish":
            lines.append(f"set -gx {name} {shlex.quote(value)}")
        elif shell == "systemd":
            lines.append(f"{name}={_systemd_quote(value)}")
        else:
            lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


def _systemd_quote(value: str) -> str:
    if value and all(c.isalnum() or c in "/:.,_-+@=" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
