"""`agent-egress env`: a login shell given only what it prints runs curl, git, pip and npm
through the proxy, with HTTPS that a rule inspects, and nothing else set."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from support.origins import Origin, package_index_handler
from support.proxy import RunningProxy

from agent_egress.loginenv import CA_VARIABLES

UID = os.getuid()
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}  # what env -i leaves a login: nothing else


def npm_registry_handler(port_of: list[int]):
    """A registry serving one package, `egress-probe` 1.0.0, its tarball built here."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        manifest = json.dumps({"name": "egress-probe", "version": "1.0.0"}).encode()
        info = tarfile.TarInfo("package/package.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    tarball = archive.getvalue()

    def handle(request: BaseHTTPRequestHandler) -> None:
        if request.path.endswith(".tgz"):
            body, kind = tarball, "application/octet-stream"
        elif request.path.strip("/") == "egress-probe":
            url = f"https://index.test:{port_of[0]}/egress-probe/-/egress-probe-1.0.0.tgz"
            body = json.dumps({"name": "egress-probe", "dist-tags": {"latest": "1.0.0"},
                               "versions": {"1.0.0": {
                                   "name": "egress-probe", "version": "1.0.0",
                                   "dist": {"tarball": url,
                                            "shasum": hashlib.sha1(tarball).hexdigest()}}}}
                              ).encode()
            kind = "application/json"
        else:
            request.send_response(404)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        request.send_response(200)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return handle


@pytest.fixture(scope="module")
def origins(test_ca, package_root):
    port_of: list[int] = []
    npm = Origin(npm_registry_handler(port_of), tls=test_ca.server_context())
    port_of.append(npm.port)
    pip = Origin(package_index_handler(package_root), tls=test_ca.server_context())
    yield {"npm": npm, "pip": pip}
    npm.stop()
    pip.stop()


@pytest.fixture(scope="module")
def proxy(cli, tmp_path_factory, dns, secure, git_origin, origins, test_ca):
    policy = f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: inspect.test
        ports: [{secure.port}]
        methods: [GET]
      - host: git.test
        ports: [{git_origin.port}]
        access: read-only
      - host: index.test
        ports: [{origins["pip"].port}, {origins["npm"].port}]
        methods: [GET, HEAD]
      - cidr: 127.0.0.1/32   # the origins' address, which the names resolve to
        ports: [{secure.port}, {git_origin.port}, {origins["pip"].port}, {origins["npm"].port}]
"""
    running = RunningProxy(cli, tmp_path_factory.mktemp("env"), policy, "--upstream-dns",
                           dns.address, "--upstream-ca", str(test_ca.ca_file))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def env_file(cli, proxy) -> Path:
    state = proxy.directory / "state"
    done = subprocess.run([cli, "env", "--account", "tester", "--policy", str(proxy.policy_file),
                           "--proxy", f"127.0.0.1:{proxy.port}", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    path = proxy.directory / "env.sh"
    path.write_text(done.stdout)
    return Path(path)


def login(env_file: Path, home: Path, command: str) -> subprocess.CompletedProcess[str]:
    """`command` in a shell whose environment is only what `env` printed (and PATH, HOME)."""
    return subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in BASE_ENV.items()),
                           f"HOME={home}", "sh", "-c", f". {env_file}; {command}"],
                          capture_output=True, text=True, timeout=120)


def inspected(proxy, host: str, port: int) -> list[dict[str, Any]]:
    """Request events: the proxy saw inside the TLS, so the client trusted its CA."""
    return list(proxy.wait_for_events(lambda e: e["event"] == "request" and e["host"] == host
                                      and e["port"] == port))


@pytest.mark.e2e
def test_curl_with_the_login_environment_only(proxy, env_file, secure, tmp_path):
    done = login(env_file, tmp_path, f"curl -sS https://inspect.test:{secure.port}/v1/items")
    assert (done.returncode, done.stdout) == (0, f"hello from inspect.test:{secure.port} GET "
                                                 "/v1/items\n"), done.stderr
    (event,) = inspected(proxy, "inspect.test", secure.port)
    assert (event["decision"], event["method"], event["path"]) == ("allow", "GET", "/v1/items")
    # the environment is what made it work: without it curl neither proxies nor trusts the CA
    bare = login(Path("/dev/null"), tmp_path, "curl -sS --max-time 5 -x http://127.0.0.1:"
                 f"{proxy.port} https://inspect.test:{secure.port}/v1/items")
    assert bare.returncode != 0


@pytest.mark.e2e
def test_git_clone_with_the_login_environment_only(proxy, env_file, git_origin, tmp_path):
    done = login(env_file, tmp_path, f"git clone -q https://git.test:{git_origin.port}/repo.git "
                                     f"{tmp_path}/clone && cat {tmp_path}/clone/README")
    assert (done.returncode, done.stdout) == (0, "hello\n"), done.stderr
    assert any(e["path"].endswith("/git-upload-pack")
               for e in inspected(proxy, "git.test", git_origin.port))


@pytest.mark.e2e
def test_pip_with_the_login_environment_only(proxy, env_file, origins, tmp_path):
    port = origins["pip"].port
    done = login(env_file, tmp_path, f"{sys.executable} -m pip download -q --no-deps "
                                     f"--no-cache-dir --disable-pip-version-check -d {tmp_path} "
                                     f"--index-url https://index.test:{port}/simple/ "
                                     "egress-probe")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "egress_probe-1.0-py3-none-any.whl").is_file()
    assert inspected(proxy, "index.test", port)


@pytest.mark.e2e
@pytest.mark.skipif(not shutil.which("npm"), reason="needs npm")
def test_npm_with_the_login_environment_only(proxy, env_file, origins, tmp_path):
    port = origins["npm"].port
    done = login(env_file, tmp_path, f"npm view --registry https://index.test:{port}/ "
                                     "--no-update-notifier egress-probe version")
    assert (done.returncode, done.stdout.strip()) == (0, "1.0.0"), done.stderr
    assert any(e["path"] == "/egress-probe" for e in inspected(proxy, "index.test", port))


def test_env_prints_every_variable_in_each_syntax(cli, tmp_path):
    state = tmp_path / "state"
    outputs = {}
    for shell in ("sh", "fish", "systemd"):
        done = subprocess.run([cli, "env", "--shell", shell, "--state-dir", str(state),
                               "--proxy", "[::1]:3128", "--control", "/run/x.sock"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs[shell] = [line for line in done.stdout.splitlines()
                          if not line.startswith("#")]
    bundle = state / "ca-bundle.pem"
    names = ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
             *CA_VARIABLES, "AGENT_EGRESS_CONTROL"]
    values = {"http_proxy": "http://[::1]:3128", "no_proxy": "localhost,127.0.0.1,::1",
              "AGENT_EGRESS_CONTROL": "/run/x.sock"}

    def value(name: str) -> str:
        return values.get(name.lower() if "proxy" in name.lower() else name,
                          values["http_proxy"] if "proxy" in name.lower() else str(bundle))

    assert outputs["sh"] == [f"export {n}={shlex.quote(value(n))}" for n in names]
    assert outputs["fish"] == [f"set -gx {n} {shlex.quote(value(n))}" for n in names]
    assert outputs["systemd"] == [f'{n}="{value(n)}"' if "[" in value(n) else f"{n}={value(n)}"
                                  for n in names]
    # each reads back as the values themselves
    read = subprocess.run(["sh", "-c", "\n".join(outputs["sh"]) + "\nenv"], capture_output=True,
                          text=True, env={}, check=True).stdout.splitlines()
    assert {f"{n}={value(n)}" for n in names} <= set(read)
    for must in ("CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "PIP_CERT", "REQUESTS_CA_BUNDLE",
                 "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "NPM_CONFIG_CAFILE",
                 "CARGO_HTTP_CAINFO"):
        assert must in CA_VARIABLES


def test_the_bundle_is_readable_by_all_and_the_ca_key_by_none(cli, tmp_path):
    state = tmp_path / "state"
    done = subprocess.run([cli, "env", "--state-dir", str(state)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    bundle = (state / "ca-bundle.pem").read_text()
    proxy_ca = (state / "mitmproxy" / "mitmproxy-ca-cert.pem").read_text()
    assert proxy_ca in bundle and "PRIVATE KEY" not in bundle
    assert bundle.count("BEGIN CERTIFICATE") > 1  # the system's CAs too

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(state / "ca-bundle.pem") == 0o644 and mode(state) == 0o711
    assert mode(state / "mitmproxy") == 0o700
    assert mode(state / "mitmproxy" / "mitmproxy-ca.pem") == 0o600


def test_the_bundle_as_another_user(cli, two_users):
    """Another account reads the bundle by its path, and neither lists the state directory nor
    reads the CA's key."""
    with tempfile.TemporaryDirectory(prefix="agent-egress-env-") as public:  # pytest's is 0700
        os.chmod(public, 0o755)
        _check_as_other(cli, Path(public) / "state", two_users[0])


def _check_as_other(cli: str, state: Path, user: str) -> None:
    assert subprocess.run([cli, "env", "--state-dir", str(state)], capture_output=True,
                          timeout=60).returncode == 0

    def as_other(*command: str) -> int:
        return subprocess.run(["setpriv", "--reuid", user, "--regid", user,
                               "--clear-groups", *command], capture_output=True,
                              timeout=30).returncode

    assert as_other("cat", str(state / "ca-bundle.pem")) == 0
    assert as_other("ls", str(state)) != 0
    assert as_other("cat", str(state / "mitmproxy" / "mitmproxy-ca.pem")) != 0


def test_env_checks_the_account_against_the_policy(cli, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\naccounts:\n  codex:\n    match: {uids: [1001]}\n")
    done = subprocess.run([cli, "env", "--policy", str(policy), "--account", "nobody",
                           "--state-dir", str(tmp_path / "state")], capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"agent-egress: no account 'nobody' in {policy}\n"
