"""Credentials end to end: the proxy holds the secrets and adds them on the wire (git push to
one repository, pip from an index behind basic auth, npm from a registry wanting a bearer
token, curl to an API), clients that carry a secret anywhere are refused before anything
reaches the origin, and no output of the whole run holds a secret."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from email.message import Message
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import quote

import pytest
from support.origins import Origin, git_handler, package_index_handler
from support.proxy import RunningProxy, wait_until

UID = os.getuid()
SECRETS = {
    "api": "api-secret-4f9c2e7a1b",
    "git": "git-secret-77d01c3e95",
    "pip": "pip-secret-0a8b6c4d2e",
    "npm": "npm-secret-5e3f1a9c7b",
    "cloud": "cloud-secret-9d8c7b6a5f",
}
ROTATED = "api-secret-rotated-31c4"


class Guarded:
    """An origin that answers 401 unless the request has `expected` in `header`; records
    every request's headers."""

    def __init__(self, expected: str, inner: Callable[[BaseHTTPRequestHandler], None],
                 header: str = "Authorization") -> None:
        self.expected = expected
        self.header = header
        self.seen: list[Message] = []
        self.inner = inner

    def __call__(self, request: BaseHTTPRequestHandler) -> None:
        self.seen.append(request.headers)
        if request.headers.get_all(self.header) != [self.expected]:
            length = int(request.headers.get("Content-Length") or 0)
            if length:
                request.rfile.read(length)
            request.send_response(401)
            request.send_header("WWW-Authenticate", 'Basic realm="test"')
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        self.inner(request)


def _ok(request: BaseHTTPRequestHandler) -> None:
    body = b"authorised\n"
    request.send_response(200)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def secret_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("secrets")
    directory.chmod(0o700)
    for name, value in SECRETS.items():
        if name != "cloud":
            (directory / name).write_text(value + "\n")
            (directory / name).chmod(0o600)
    return directory


@pytest.fixture(scope="module")
def repos(git_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    served = tmp_path_factory.mktemp("served")
    for name in ("app.git", "other.git"):
        subprocess.run(["git", "clone", "-q", "--bare", str(git_repo / "repo.git"),
                        str(served / name)], check=True)
        subprocess.run(["git", "-C", str(served / name), "config", "http.receivepack", "true"],
                       check=True)
    return served


@pytest.fixture(scope="module")
def origins(test_ca, repos, package_root):
    from test_loginenv import npm_registry_handler

    port_of: list[int] = []
    guards = {
        "api": Guarded(f"Bearer {SECRETS['api']}", _ok),
        "git": Guarded(_basic("x-access-token", SECRETS["git"]), git_handler(repos)),
        "pip": Guarded(_basic("pypi-user", SECRETS["pip"]), package_index_handler(package_root)),
        "npm": Guarded(f"Bearer {SECRETS['npm']}", npm_registry_handler(port_of)),
    }
    running = {
        "api": Origin(guards["api"], tls=test_ca.server_context()),
        "git": Origin(guards["git"], tls=test_ca.server_context()),
        "pip": Origin(guards["pip"]),
        "npm": Origin(guards["npm"], tls=test_ca.server_context()),
        "web": Origin(),  # an allowed host holding no credential
    }
    port_of.append(running["npm"].port)
    yield running, guards
    for origin in running.values():
        origin.stop()


def policy_for(secret_dir: Path, ports: dict[str, int]) -> str:
    return f"""version: 1
credentials:
  api-token:
    file: {secret_dir}/api
  git-bot:
    file: {secret_dir}/git
    scheme: basic
    username: x-access-token
  pip-index:
    file: {secret_dir}/pip
    scheme: basic
    username: pypi-user
  npm-token:
    file: {secret_dir}/npm
  cloud-key:                    # referenced by no rule: a tripwire only
    env: TEST_CLOUD_SECRET
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: secure.test
        ports: [{ports["api"]}]
        credential: api-token
      - host: git.test
        ports: [{ports["git"]}]
        paths: ["/app.git/*"]
        credential: git-bot
      - host: index.test
        ports: [{ports["pip"]}, {ports["npm"]}]
        credential: pip-index
        methods: [GET]
        paths: ["/simple/*", "/files/*"]
      - host: index.test
        ports: [{ports["npm"]}]
        credential: npm-token
      - host: web.test
        ports: [{ports["web"]}]
      - cidr: 127.0.0.1/32
        ports: [{", ".join(str(p) for p in ports.values())}]
"""


@pytest.fixture(scope="module")
def proxy(cli, tmp_path_factory, dns, test_ca, origins, secret_dir):
    running, _ = origins
    ports = {name: origin.port for name, origin in running.items()}
    proxy = RunningProxy(cli, tmp_path_factory.mktemp("proxy"), policy_for(secret_dir, ports),
                         "--upstream-dns", dns.address, "--upstream-ca", str(test_ca.ca_file),
                         env={"TEST_CLOUD_SECRET": SECRETS["cloud"]})
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def proxy_ca(cli, proxy) -> str:
    return subprocess.run([cli, "ca", "--state-dir", str(proxy.directory / "state")],
                          capture_output=True, text=True, check=True).stdout.strip()


def curl(proxy, *args):
    return subprocess.run(["curl", "-sS", "--max-time", "20", "-x", proxy.url, *args],
                          capture_output=True, text=True, timeout=30)


def test_curl_gets_the_api_token_added_replacing_the_dummy(proxy, proxy_ca, origins):
    running, guards = origins
    url = f"https://secure.test:{running['api'].port}/v1/items"
    done = curl(proxy, "--cacert", proxy_ca, "-H", "Authorization: Bearer dummy", url)
    assert done.stdout == "authorised\n", done.stderr
    assert guards["api"].seen[-1]["Authorization"] == f"Bearer {SECRETS['api']}"
    (event,) = proxy.wait_for_events(lambda e: e["event"] == "request"
                                     and e["host"] == "secure.test")
    assert (event["decision"], event["credential"]) == ("allow", "api-token")


def git_env(home: Path, proxy, proxy_ca: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(home), "https_proxy": proxy.url,
            "GIT_SSL_CAINFO": proxy_ca, "GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.test", "GIT_COMMITTER_EMAIL": "t@example.test",
            "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false"}


def test_git_push_to_the_one_repository_the_token_is_for(proxy, proxy_ca, origins, tmp_path,
                                                          repos):
    running, guards = origins
    env = git_env(tmp_path, proxy, proxy_ca)  # no credential anywhere in the account

    def git(*args, cwd=tmp_path):
        return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=60)

    base = f"https://git.test:{running['git'].port}"
    cloned = git("clone", f"{base}/app.git", "app")
    assert cloned.returncode == 0, cloned.stderr
    (tmp_path / "app" / "NEW").write_text("change\n")
    git("add", "NEW", cwd=tmp_path / "app")
    git("commit", "-qm", "change", cwd=tmp_path / "app")
    pushed = git("push", "origin", "main", cwd=tmp_path / "app")
    assert pushed.returncode == 0, pushed.stderr
    log = subprocess.run(["git", "-C", str(repos / "app.git"), "log", "--format=%s", "main"],
                         capture_output=True, text=True, check=True).stdout
    assert log.splitlines()[0] == "change"

    before = len(guards["git"].seen)
    other = git("push", f"{base}/other.git", "main", cwd=tmp_path / "app")
    assert other.returncode != 0
    assert "no rule matched" in other.stderr
    assert len(guards["git"].seen) == before  # nothing reached the origin
    assert "change" not in subprocess.run(
        ["git", "-C", str(repos / "other.git"), "log", "--format=%s", "main"],
        capture_output=True, text=True, check=True).stdout


def test_pip_installs_from_an_index_behind_basic_auth(proxy, origins, tmp_path):
    running, _ = origins
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--target",
         str(tmp_path / "t"), "--index-url",
         f"http://index.test:{running['pip'].port}/simple/", "--trusted-host", "index.test",
         "--proxy", proxy.url, "--retries", "0", "--timeout", "10", "egress-probe"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CONFIG_FILE": os.devnull})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "t" / "egress_probe.py").exists()


@pytest.mark.skipif(not shutil.which("npm"), reason="needs npm")
def test_npm_installs_from_a_registry_wanting_a_bearer_token(proxy, proxy_ca, origins,
                                                              tmp_path):
    running, guards = origins
    registry = f"https://index.test:{running['npm'].port}/"
    (tmp_path / ".npmrc").write_text(
        f"//index.test:{running['npm'].port}/:_authToken=dummy-not-the-token\n")
    (tmp_path / "package.json").write_text('{"name": "probe-user", "version": "1.0.0"}\n')
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--registry", registry, "--cafile",
         proxy_ca, "--https-proxy", proxy.url, "--cache", str(tmp_path / "cache"),
         "egress-probe"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
             "npm_config_userconfig": str(tmp_path / ".npmrc")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "node_modules" / "egress-probe" / "package.json").exists()
    assert all(seen["Authorization"] == f"Bearer {SECRETS['npm']}"
               for seen in guards["npm"].seen)


@pytest.mark.parametrize("where", ["header", "basic-header", "query", "encoded-query", "body",
                                   "json-body", "tripwire-only"])
def test_a_secret_sent_by_the_client_is_refused_before_the_origin(proxy, origins, where):
    running, _ = origins
    web = running["web"]
    secret = SECRETS["cloud"] if where == "tripwire-only" else SECRETS["api"]
    url = f"http://web.test:{web.port}/{where}"
    args = {
        "header": ["-H", f"X-Token: {secret}", url],
        "basic-header": ["-u", f"someone:{secret}", url],
        "query": [f"{url}?key={secret}"],
        "encoded-query": [f"{url}?key={''.join(f'%{b:02X}' for b in secret.encode())}"],
        "body": ["--data-binary", f"a=1&token={quote(secret)}", url],
        "json-body": ["-H", "Content-Type: application/json", "--data-binary",
                      '{"k": "' + base64.b64encode(secret.encode()).decode() + '"}', url],
        "tripwire-only": ["--data-binary", f"x={secret}", url],
    }[where]
    before = len(web.requests)
    done = curl(proxy, "-i", *args)
    name = "cloud-key" if where == "tripwire-only" else "api-token"
    assert done.stdout.startswith("HTTP/1.1 403"), done.stdout + done.stderr
    assert f"carries credential {name}" in done.stdout
    assert secret not in done.stdout
    assert len(web.requests) == before
    (event,) = proxy.wait_for_events(lambda e: e["path"] == f"/{where}")
    assert (event["decision"], event["credential"], event["reason"]) == (
        "deny", name, f"carries credential {name}")


def test_the_leaks_and_injections_are_counted(proxy):
    text = urllib.request.urlopen(proxy.metrics_url, timeout=10).read().decode()
    assert 'agent_egress_credential_leaks_total{account="tester",credential="api-token"}' in text
    assert 'agent_egress_credential_leaks_total{account="tester",credential="cloud-key"} 1.0' \
        in text
    assert 'agent_egress_credentials_injected_total{account="tester",credential="api-token"}' \
        in text


def test_a_rotated_secret_is_used_and_a_broken_one_keeps_the_old(proxy, proxy_ca, origins,
                                                                secret_dir):
    running, guards = origins
    url = f"https://secure.test:{running['api'].port}/v1/rotated"
    path = secret_dir / "api"
    path.write_text(ROTATED + "\n")
    guards["api"].expected = f"Bearer {ROTATED}"
    assert wait_until(lambda: curl(proxy, "--cacert", proxy_ca, url).stdout == "authorised\n")
    path.write_text("")  # empty: refused, the rotated secret stays in force
    proxy.wait_for(r"policy reload refused.*\n.*credential api-token: the secret is empty")
    assert curl(proxy, "--cacert", proxy_ca, url).stdout == "authorised\n"
    path.write_text(SECRETS["api"] + "\n")
    guards["api"].expected = f"Bearer {SECRETS['api']}"
    assert wait_until(lambda: curl(proxy, "--cacert", proxy_ca, url).stdout == "authorised\n")


def test_no_output_of_the_run_holds_a_secret(proxy, cli, secret_dir, tmp_path):
    """Last: every output of the run so far, and of the commands an operator runs on it."""
    outputs = [proxy.log(), proxy.audit_log.read_text(),
               urllib.request.urlopen(proxy.metrics_url, timeout=10).read().decode()]
    for command in (["validate", str(proxy.policy_file)],
                    ["check", "--policy", str(proxy.policy_file), "--account", "tester",
                     "https://secure.test/v1/items"],
                    ["report", str(proxy.audit_log)],
                    ["report", "--format", "json", str(proxy.audit_log)],
                    ["learn", "--policy", str(proxy.policy_file), str(proxy.audit_log)]):
        done = subprocess.run([cli, *command], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "TEST_CLOUD_SECRET": SECRETS["cloud"]})
        outputs += [done.stdout, done.stderr]
    forms = [v for value in [*SECRETS.values(), ROTATED]
             for v in (value, base64.b64encode(value.encode()).decode()[:12])]
    forms += [_basic("x-access-token", SECRETS["git"]), _basic("pypi-user", SECRETS["pip"])]
    for output in outputs:
        for form in forms:
            assert form not in output
    assert len(proxy.events()) > 10


def test_bad_credentials_are_each_a_file_line_col_problem(cli, tmp_path):
    secret = tmp_path / "open"
    secret.write_text("readable-by-all-123\n")
    secret.chmod(0o644)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""version: 1
credentials:
  both:
    file: {empty}
    env: X
  neither:
    header: X-Key
  nouser:
    env: HOME
    scheme: basic
  empty:
    file: {empty}
  unset:
    env: SURELY_NOT_SET_ANYWHERE
  open:
    file: {secret}
accounts:
  nobody:
    match: {{unix_users: [nobody]}}
    allow:
      - host: x.example.test
        credential: missing
""")
    done = subprocess.run([cli, "validate", str(policy)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == f"{policy}:4:5: credential both: expected exactly one of file (a path " \
                       "the proxy reads) or env (a variable of the proxy), found both"
    assert f"{policy}:6:3: credential neither: expected exactly one of file" in lines[1]
    assert lines[2] == f"{policy}:9:5: credential nouser: scheme basic needs a username; " \
                       "expected username: NAME"
    assert f"{policy}:22:21: credential 'missing' is not defined" in lines[3]
    assert len(lines) == 4  # the secrets are read only when the policy itself is valid
    policy.write_text(policy.read_text().split("  both:")[0] + policy.read_text().split(
        "    scheme: basic\n")[1].replace("credential: missing", "credential: empty"))
    done = subprocess.run([cli, "validate", str(policy)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{policy}:4:11: credential empty: the secret is empty",
        f"{policy}:6:10: credential unset: environment variable SURELY_NOT_SET_ANYWHERE is not "
        "set in the proxy's environment",
        f"{policy}:8:11: credential open: refused: {secret} is readable by every user, "
        "governed accounts included",
    ]
    assert "readable-by-all-123" not in done.stdout + done.stderr
