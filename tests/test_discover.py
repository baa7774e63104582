"""`agent-egress discover` on a made-up machine: a home and a root copied from
tests/fixtures/discover, repositories written here, and fake `pip`, `npm` and `go` commands as
the only programs on PATH, so nothing of the machine running the tests can leak in."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent_egress.discover import HEADER, discover
from agent_egress.discover.common import LocalEndpoint, url_endpoint
from agent_egress.rules import Policy, Query, Result, Stage, parse_policy

FIXTURES = Path(__file__).parent / "fixtures" / "discover"
PRESETS = ("pip", "npm", "apt", "cargo", "go", "maven", "gem", "docker", "git-remotes")

FAKE_PIP = """printf '%s\\n' 'Install Options:' \
'  -i, --index-url <url>       Base URL of the Python Package Index (default' \
'                              https://pypi.default.test/simple). This should point' \
'                              to a repository compliant with PEP 503.' \
'  --extra-index-url <url>     Extra URLs of package indexes to use in addition' \
'                              to --index-url. Should follow the same rules as' \
'                              --index-url.' \
'  --timeout <sec>             Set the socket timeout (default 15 seconds).'
"""
FAKE_NPM = "echo https://registry.npm-default.test/\n"
# Answers `go env NAME...` one line per name, as go does, and notes GOTOOLCHAIN.
FAKE_GO = """echo "GOTOOLCHAIN=$GOTOOLCHAIN" >> "${0%/*}/calls.log"
shift
for name in "$@"; do
  case "$name" in
    GOPROXY) echo "https://goproxy.default.test,direct" ;;
    GOSUMDB) echo "sum.default.test+a1b2c3" ;;
    GONOSUMDB) echo "git.private.test/team,*.corp.test" ;;
    *) echo ;;
  esac
done
"""


def fake_tools(bin_dir: Path, **bodies: str) -> Path:
    """Shell scripts that log their arguments to bin_dir/calls.log (builtins only: PATH holds
    nothing else)."""
    bin_dir.mkdir(exist_ok=True)
    for name, body in bodies.items():
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "${{0%/*}}/calls.log"\n{body}')
        script.chmod(0o755)
    return bin_dir


def calls(bin_dir: Path) -> list[str]:
    log = bin_dir / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def make_repositories(repos: Path) -> None:
    write(repos / "app/.git/config", """\
[core]
\tbare = false
[remote "origin"]
\turl = git@git.corp.test:team/app.git
\tfetch = +refs/heads/*:refs/remotes/origin/*
[remote "upstream"]
\turl = https://upstream.corp.test/team/app.git  ; rewritten by ~/.gitconfig
\tpushurl = "ssh://git@git.corp.test:2222/team/app.git"
""")
    # A submodule: its .git is a file pointing into the parent's .git/modules.
    write(repos / "app/vendor/lib/.git", "gitdir: ../../.git/modules/lib\n")
    write(repos / "app/.git/modules/lib/config", '[remote "origin"]\n\turl = corp:team/lib.git\n')
    write(repos / "work/tool/.git/config", """\
[remote "origin"]
\turl = gh-work:org/tool.git
[remote "local"]
\turl = /srv/git/tool.git
[remote "helper"]
\turl = codecommit::eu-west-1://tool
""")
    bare = repos / "mirror.git"
    write(bare / "HEAD", "ref: refs/heads/main\n")
    write(bare / "config", '[remote "origin"]\n\turl = git://git-daemon.corp.test/mirror.git\n')
    (bare / "objects").mkdir()
    write(repos / "deep/a/b/c/d/e/f/.git/config",
          '[remote "origin"]\n\turl = https://too-deep.corp.test/x.git\n')


@pytest.fixture
def machine(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES / "home", tmp_path / "home")
    shutil.copytree(FIXTURES / "root", tmp_path / "root")
    make_repositories(tmp_path / "repos")
    return tmp_path


def run(cli: str, tmp_path: Path, bin_dir: Path, **env: str) -> str:
    done = subprocess.run(
        [cli, "discover", "--home", str(tmp_path / "home"), "--root", str(tmp_path / "root"),
         "--repos", str(tmp_path / "repos")],
        capture_output=True, text=True, timeout=60,
        env={"HOME": str(tmp_path / "home"), "PATH": str(bin_dir), **env})
    assert (done.returncode, done.stderr) == (0, "")
    return done.stdout.replace(str(tmp_path), "TMP")


def as_policy(presets_yaml: str) -> Policy:
    """The output as the presets of a policy, with an account allowing every one of them."""
    uses = re.findall(r"^  (\S+):$", presets_yaml, re.MULTILINE)
    account = "accounts: {}\n" if not uses else (
        "accounts:\n  dev:\n    match: {uids: [1000]}\n    allow:\n"
        + "".join(f"      - preset: {name}\n" for name in uses))
    return Policy(parse_policy(f"version: 1\n{presets_yaml}{account}".encode(), "x.yaml"))


ENV = {
    "PIP_EXTRA_INDEX_URL": "https://env-index.corp.test/simple https://extra.corp.test/simple",
    "PIP_TRUSTED_HOST": "pypi-mirror.corp.test:8080",
    "npm_config_@env:registry": "https://npm-env.corp.test/",
    "NPM_TOKEN": "not-printed",
    "CARGO_REGISTRIES_ENVREG_INDEX": "sparse+https://cargo-env.corp.test/",
    "GOPROXY": "https://goproxy.corp.test|https://goproxy-backup.corp.test,direct",
    "GOPRIVATE": "*.corp.test,git.private.test/team/*",
}


def test_discovers_every_toolchain(cli, machine):
    bin_dir = fake_tools(machine / "bin", pip=FAKE_PIP, npm=FAKE_NPM, go=FAKE_GO)
    output = run(cli, machine, bin_dir, **ENV)
    assert output == (FIXTURES / "expected.yaml").read_text()
    # pip and npm have configured registries, so their defaults are not asked for; go is asked
    # only for what the environment does not set, and never allowed to fetch a toolchain.
    assert calls(bin_dir) == ["go env GOSUMDB GONOPROXY GONOSUMDB", "GOTOOLCHAIN=local"]


def test_nothing_of_the_real_machine_leaks_in(cli, machine):
    output = run(cli, machine, fake_tools(machine / "bin"), **ENV)
    hosts = re.findall(r"- host: (\S+)", output)
    assert hosts and all(h.strip('"').endswith(".test") for h in hosts)
    assert re.findall(r"- cidr: (\S+)", output) == ["10.20.30.40/32", '"fd00::5/128"']
    for path in re.findall(r"(?:^|\s)(/\S*)", output, re.MULTILINE):
        assert path.startswith(("TMP/", "/v1/", "/srv/", "//", "/etc/agent-egress/")), path
    assert "s3cret" not in output and "not-printed" not in output and "ci-token" not in output
    assert "credential: npm-npm-corp-test}" in output  # found, by file and key only


def test_output_is_a_valid_policy_that_allows_what_was_found(cli, machine):
    output = run(cli, machine, fake_tools(machine / "bin", go=FAKE_GO), **ENV)
    assert output.startswith(HEADER)
    assert re.findall(r"^  (\S+):$", output, re.MULTILINE) == list(PRESETS)
    policy = as_policy(output)
    for host, port in [("pypi-mirror.corp.test", 443), ("pypi-mirror.corp.test", 8080),
                       ("npm-scoped.corp.test", 8443), ("apt3.corp.test", 80),
                       ("cargo-git.corp.test", 2222), ("anything.corp.test", 443),
                       ("maven-snapshots.corp.test", 8081), ("xn--bcher-kva.corp.test", 80),
                       ("registry.lab.corp.test", 80), ("git-work.corp.test", 2200),
                       ("git.corp.test", 22), ("10.20.30.40", 8080)]:
        decision = policy.decide(Query("dev", host, port, Stage.CONNECT))
        assert decision.result is Result.ALLOW, (host, port, decision.reason)
    for host, port in [("pypi-mirror.corp.test", 22), ("localhost", 5000),
                       ("cargo-git.corp.test", 22)]:
        assert policy.decide(Query("dev", host, port, Stage.CONNECT)).result is Result.DENY
    # Commented out, disabled, not an apt source file, not pip install's, too deep.
    for name in ("commented-out", "apt-disabled", "apt-backup", "not-for-install", "too-deep"):
        assert name not in output


def test_tools_report_the_defaults_when_nothing_is_configured(cli, tmp_path):
    (tmp_path / "repos").mkdir()
    bin_dir = fake_tools(tmp_path / "bin", pip=FAKE_PIP, npm=FAKE_NPM, go=FAKE_GO)
    output = run(cli, tmp_path, bin_dir)
    assert output == HEADER + """\
presets:
  pip:
    - host: pypi.default.test  # command `pip install --help` (pip's default index)
      ports: [443]
  npm:
    - host: registry.npm-default.test  # command `npm config get registry` (npm's default)
      ports: [443]
  go:
    - host: goproxy.default.test  # command `go env GOPROXY`
      ports: [443]
    - host: sum.default.test      # command `go env GOSUMDB`
      ports: [443]
    - host: git.private.test      # command `go env GONOSUMDB`
      ports: [443]
    - host: "*.corp.test"         # command `go env GONOSUMDB`
      ports: [443]
"""
    assert calls(bin_dir) == [
        "pip install --help", "npm config get registry",
        "go env GOPROXY GOSUMDB GOPRIVATE GONOPROXY GONOSUMDB", "GOTOOLCHAIN=local"]
    as_policy(output)


def test_no_configuration_and_no_tools_finds_nothing(cli, tmp_path):
    output = run(cli, tmp_path, fake_tools(tmp_path / "bin"))
    assert output == HEADER + "# skipped TMP/repos: No such file or directory\npresets: {}\n"
    as_policy(output)


def test_broken_files_are_skipped_with_a_comment(cli, machine):
    home, root = machine / "home", machine / "root"
    write(home / ".npmrc", b"registry=https://npm.corp.test/\n\xff\xfe\n")
    write(home / ".cargo/config.toml", "[registries.corp\nindex = 1\n")
    write(home / ".cargo/config", "[source.x]\nregistry = 42\n[registries]\nbad = 'text'\n")
    write(home / ".m2/settings.xml", "<settings><mirrors><mirror>")
    write(home / ".docker/config.json", '{"auths": ')
    write(home / ".gemrc", ":sources: [https://gems.corp.test/\n")
    write(home / ".gitconfig", "[url \"x\"\n\tinsteadOf = y\n")
    write(root / "etc/pip.conf", "index-url = https://no-section.corp.test/\n")
    (home / ".pip/pip.conf").unlink()
    (home / ".pip/pip.conf").mkdir()
    write(root / "etc/apt/sources.list", "deb\nrpm https://yum.corp.test/ x\n"
                                         "deb https://apt.corp.test/debian bookworm main\n")
    write(root / "etc/apt/sources.list.d/bad.sources", "Types: deb\nSuites: x\nnot a field\n")
    write(root / "etc/docker/daemon.json", '["not", "an", "object"]')
    write(machine / "repos/app/.git/config", "[remote \"origin\"]\n\turl = https://bad host/x\n")
    os.mkfifo(home / ".ssh/config.fifo")
    (home / ".ssh/config").unlink()
    (home / ".ssh/config").symlink_to(home / ".ssh/config.fifo")
    output = run(cli, machine, fake_tools(machine / "bin"), GOPRIVATE="corp*.test,ok.corp.test")
    # The parsers' own words vary between Python versions; what failed to parse may not.
    skipped = [re.sub(r"(: invalid [\w ]+) \(.*\)$", r"\1 (...)", line)
               for line in output.splitlines() if line.startswith("# skipped")]
    assert skipped == [
        "# skipped TMP/home/.pip/pip.conf: not a regular file",
        "# skipped TMP/root/etc/pip.conf: invalid configuration (...)",
        "# skipped TMP/home/.npmrc: not UTF-8 text (invalid start byte at byte 32)",
        "# skipped TMP/root/etc/apt/sources.list:1: no URI",
        "# skipped TMP/root/etc/apt/sources.list:2: expected deb or deb-src, found 'rpm'",
        "# skipped TMP/root/etc/apt/sources.list.d/bad.sources:3: expected 'Field: value'",
        "# skipped TMP/root/etc/apt/sources.list.d/bad.sources:1: a stanza without URIs",
        "# skipped TMP/home/.cargo/config.toml: invalid TOML (...)",
        "# skipped TMP/home/.cargo/config registries.bad: expected a table",
        "# skipped TMP/home/.cargo/config source.x.registry: expected a URL string",
        "# skipped env GOPRIVATE: 'corp*.test': only a leading '*.' can be written as a "
        "policy host",
        "# skipped TMP/home/.m2/settings.xml: invalid XML (...)",
        "# skipped TMP/home/.gemrc: invalid YAML (...)",
        "# skipped TMP/home/.docker/config.json: invalid JSON (...)",
        "# skipped TMP/root/etc/docker/daemon.json: expected a JSON object",
        "# skipped TMP/home/.ssh/config: not a regular file",
        "# skipped TMP/home/.gitconfig: invalid git config (...)",
        "# skipped TMP/repos/app/.git/config:2 remote.origin.url: 'bad host' has an invalid "
        "label 'bad host' (expected letters, digits, '-' and '_', at most 63)",
        "# skipped TMP/repos/work/tool/.git/config:6 remote.helper.url: a remote helper "
        "(transport::address); check it by hand",
    ]
    # What could be read is still there, and still a valid policy.
    policy = as_policy(output)
    for host in ["apt.corp.test", "ok.corp.test", "pypi-mirror.corp.test"]:
        assert policy.decide(Query("dev", host, 443, Stage.CONNECT)).result is Result.ALLOW


def found_in(tmp_path: Path, env: dict[str, str] | None = None,
             files: dict[str, str] | None = None) -> str:
    """discover() in this process, on a machine made of `files` (relative to tmp_path)."""
    for name, text in (files or {}).items():
        write(tmp_path / name, text)
    output = discover(tmp_path / "home", tmp_path / "root", [tmp_path / "repos"],
                      {"PATH": "", **(env or {})})
    as_policy(output)
    return output.removeprefix(HEADER).replace(str(tmp_path), "TMP")


@pytest.mark.parametrize("remote, expected", [
    ("https://Git.Corp.Test/org/x.git", "host: git.corp.test  # TMP/repos/r/.git/config:2 "
                                        "remote.origin.url\n      ports: [443]"),
    ("http://git.corp.test:8080/x", "host: git.corp.test  # TMP/repos/r/.git/config:2 "
                                    "remote.origin.url\n      ports: [8080]"),
    ("ssh://git@git.corp.test/x", "ports: [22]"),
    ("git+ssh://git@git.corp.test:7999/x", "ports: [7999]"),
    ("git@git.corp.test:org/x.git", "ports: [22]"),
    ("git.corp.test:org/x.git", "ports: [22]"),
    ("git://git.corp.test/x", "ports: [9418]"),
    ("git@[2001:db8::7]:org/x.git", 'cidr: "2001:db8::7/128"  # IP address: '),
    ("https://192.0.2.7/x.git", "cidr: 192.0.2.7/32  # IP address: "),
    ("git@on:x.git", 'host: "on"  # '),
    ("https://null/x.git", 'host: "null"  # '),
    ("https://0x7f.1/x.git", None),
    ("git@localhost:x.git", None),
    ("file:///srv/git/x.git", None),
    ("../x.git", None),
    ("x", None),
])
def test_git_remote_forms(tmp_path, remote, expected):
    output = found_in(tmp_path, files={"repos/r/.git/config":
                                       f'[remote "origin"]\n\turl = {remote}\n'})
    if expected is None:
        assert output == "presets: {}\n"
    else:
        assert output.startswith("presets:\n  git-remotes:\n    - ") and expected in output


@pytest.mark.parametrize("env, expected", [
    ({"GOPRIVATE": "git.corp.test/*,*.corp.test/private"},
     ["git.corp.test  # env GOPRIVATE", '"*.corp.test"  # env GOPRIVATE']),
    ({"GOPRIVATE": "*.test"}, []),  # the policy refuses a wildcard over a public suffix
    ({"GOSUMDB": "sum.corp.test+key https://sumdb.corp.test:8443/"},
     ["sumdb.corp.test  # env GOSUMDB"]),
    ({"GOSUMDB": "off", "GOPROXY": "off"}, []),
    ({"PIP_INDEX_URL": "https://a.corp.test/simple", "PIP_CONFIG_FILE": os.devnull},
     ["a.corp.test  # env PIP_INDEX_URL"]),
    ({"NPM_CONFIG_REGISTRY": "https://npm.corp.test/"},
     ["npm.corp.test  # env NPM_CONFIG_REGISTRY"]),
    ({"DOCKER_CONFIG": "/nonexistent.test"}, []),
])
def test_environment_settings(tmp_path, env, expected):
    (tmp_path / "repos").mkdir()
    output = found_in(tmp_path, env)
    assert re.findall(r"- host: (.*)", output) == expected


def test_pip_config_file_devnull_means_no_files(tmp_path):
    files = {"home/.config/pip/pip.conf": "[global]\nindex-url = https://file.corp.test/s\n"}
    assert "file.corp.test" in found_in(tmp_path, {}, files)
    assert "file.corp.test" not in found_in(tmp_path, {"PIP_CONFIG_FILE": os.devnull})


def test_git_worktree_reads_the_main_repository_config(tmp_path):
    output = found_in(tmp_path, files={
        "main/.git/config": '[remote "origin"]\n\turl = https://wt.corp.test/x.git\n',
        "main/.git/worktrees/feature/commondir": "../..\n",
        "repos/feature/.git": f"gitdir: {tmp_path}/main/.git/worktrees/feature\n"})
    assert "host: wt.corp.test  # TMP/main/.git/config:2" in output


@pytest.mark.parametrize("url, endpoint", [
    ("https://pypi-mirror.corp.test/simple", ("pypi-mirror.corp.test", 443)),
    ("sparse+https://cargo.corp.test/index/", ("cargo.corp.test", 443)),
    ("tor+http://apt.corp.test:8080/", ("apt.corp.test", 8080)),
    ("ftp://ftp.corp.test/debian", ("ftp.corp.test", 21)),
    ("https://user:pw@[fd00::1]:8443/", ("fd00::1", 8443)),
    ("file:///srv/simple", LocalEndpoint),
    ("unix:///var/run/docker.sock", LocalEndpoint),
    ("http+unix://%2Fvar%2Frun%2Fdocker.sock/", LocalEndpoint),
    ("/srv/wheels", LocalEndpoint),
    ("pypi-mirror.corp.test/simple", "expected a URL like https://host/path"),
    ("gopher://x.corp.test/", "unsupported scheme 'gopher'; expected one of http, https, ssh, "
                              "git, ftp"),
    ("https://x.corp.test:99999/", "Port out of range 0-65535"),
    ("https:///path", "no host"),
])
def test_url_endpoint(url, endpoint):
    if endpoint is LocalEndpoint:
        with pytest.raises(LocalEndpoint):
            url_endpoint(url)
    elif isinstance(endpoint, str):
        with pytest.raises(ValueError, match=re.escape(endpoint)):
            url_endpoint(url)
    else:
        assert url_endpoint(url) == endpoint


def test_a_rejected_url_is_quoted_without_credentials(tmp_path):
    output = found_in(tmp_path, {"PIP_INDEX_URL": "gopher://dev:pw@x.corp.test/s?token=abc"})
    assert output.splitlines()[0] == (
        "# skipped env PIP_INDEX_URL: 'gopher://x.corp.test/s': unsupported scheme 'gopher'; "
        "expected one of http, https, ssh, git, ftp")
