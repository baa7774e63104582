"""Secrets out of recorded command lines: a table of the command lines real clients are run
with, and the ones an attacker (or an unlucky user) would write to get a secret past it."""

from __future__ import annotations

import os
import string
import subprocess
import sys

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from support.proxy import RunningProxy

from agent_egress.identity import MAX_CMDLINE, describe_cmdline
from agent_egress.redact import REDACTED, is_secret_name, redact_cmdline, redact_text

R = REDACTED

REAL = [
    # curl
    (["curl", "--user=agent:hunter2", "https://x.test/"],
     ["curl", f"--user=agent:{R}", "https://x.test/"]),
    (["curl", "-u", "agent:hunter2", "https://x.test/"],
     ["curl", "-u", f"agent:{R}", "https://x.test/"]),
    (["curl", "-uagent:hunter2", "https://x.test/"], ["curl", f"-uagent:{R}", "https://x.test/"]),
    (["curl", "-sSuagent:hunter2", "x.test"], ["curl", f"-sSuagent:{R}", "x.test"]),
    (["curl", "-u", "agent", "x.test"], ["curl", "-u", "agent", "x.test"]),
    (["curl", "-H", "Authorization: Bearer hunter2", "https://x.test/"],
     ["curl", "-H", f"Authorization: Bearer {R}", "https://x.test/"]),
    (["curl", "-H", "Authorization: Basic U0VDUkVU"], ["curl", "-H", f"Authorization: Basic {R}"]),
    (["curl", "--header=Authorization: token hunter2"],
     ["curl", f"--header=Authorization: token {R}"]),
    (["curl", "-H", "Accept: application/json", "-H", "X-Api-Key: hunter2"],
     ["curl", "-H", "Accept: application/json", "-H", f"X-Api-Key: {R}"]),
    (["curl", "-H", "PRIVATE-TOKEN: hunter2"], ["curl", "-H", f"PRIVATE-TOKEN: {R}"]),
    (["curl", "--oauth2-bearer", "hunter2"], ["curl", "--oauth2-bearer", R]),
    (["curl", "-b", "session=hunter2", "x.test"], ["curl", "-b", R, "x.test"]),
    (["curl", "--proxy-user", "me:hunter2", "x.test"],
     ["curl", "--proxy-user", f"me:{R}", "x.test"]),
    (["curl", "-d", "user=me&password=hunter2&x=1"], ["curl", "-d", f"user=me&password={R}&x=1"]),
    (["curl", "-d", '{"password": "hunter2", "name": "x"}'],
     ["curl", "-d", f'{{"password": "{R}", "name": "x"}}']),
    (["curl", "https://x.test/cb?code=hunter2&state=1"], ["curl", f"https://x.test/cb?{R}"]),
    (["curl", "https://x.test/#access_token=hunter2"], ["curl", f"https://x.test/#{R}"]),
    # git
    (["git", "clone", "https://oauth2:hunter2@gitlab.test/g/r.git"],
     ["git", "clone", f"https://{R}@gitlab.test/g/r.git"]),
    (["git", "clone", "https://hunter2@github.test/o/r"], ["git", "clone", f"https://{R}@github.test/o/r"]),
    (["git", "-c", "http.extraHeader=Authorization: Bearer hunter2", "fetch"],
     ["git", "-c", f"http.extraHeader=Authorization: Bearer {R}", "fetch"]),
    (["git", "push", "origin", "main"], ["git", "push", "origin", "main"]),
    (["git", "commit", "-m", "fix: the thing"], ["git", "commit", "-m", "fix: the thing"]),
    # pip
    (["pip", "install", "--index-url", "https://__token__:hunter2@index.test/simple", "pkg"],
     ["pip", "install", "--index-url", f"https://{R}@index.test/simple", "pkg"]),
    (["pip", "install", "-i", "https://me:hunter2@index.test/simple/", "-U", "pkg"],
     ["pip", "install", "-i", f"https://{R}@index.test/simple/", "-U", "pkg"]),
    (["pip", "config", "set", "global.password", "hunter2"],
     ["pip", "config", "set", "global.password", R]),
    # npm
    (["npm", "config", "set", "//registry.test/:_authToken", "hunter2"],
     ["npm", "config", "set", "//registry.test/:_authToken", R]),
    (["npm", "publish", "--//registry.test/:_authToken=hunter2"],
     ["npm", "publish", f"--//registry.test/:_authToken={R}"]),
    (["npm", "install", "--_auth=hunter2"], ["npm", "install", f"--_auth={R}"]),
    # wget
    (["wget", "--http-user=u", "--http-password=hunter2", "https://x.test/"],
     ["wget", "--http-user=u", f"--http-password={R}", "https://x.test/"]),
    (["wget", "--password", "hunter2", "--user", "me", "ftp://x.test/f"],
     ["wget", "--password", R, "--user", "me", "ftp://x.test/f"]),
    (["wget", "--header=X-Auth-Token: hunter2", "x.test"],
     ["wget", f"--header=X-Auth-Token: {R}", "x.test"]),
    # database clients
    (["mysql", "-u", "root", "-phunter2", "db"], ["mysql", "-u", "root", f"-p{R}", "db"]),
    (["mysql", "--user=root", "--password=hunter2", "-h", "db.test"],
     ["mysql", "--user=root", f"--password={R}", "-h", "db.test"]),
    (["psql", "postgresql://app:hunter2@db.test:5432/app?sslmode=require"],
     ["psql", f"postgresql://{R}@db.test:5432/app?{R}"]),
    (["psql", "host=db.test user=app password=hunter2 dbname=app"],
     ["psql", f"host=db.test user=app password={R} dbname=app"]),
    (["redis-cli", "-a", "hunter2", "ping"], ["redis-cli", "-a", R, "ping"]),
    (["sshpass", "-p", "hunter2", "ssh", "h.test"], ["sshpass", "-p", R, "ssh", "h.test"]),
    (["docker", "login", "-u", "me", "-p", "hunter2", "reg.test"],
     ["docker", "login", "-u", "me", "-p", R, "reg.test"]),
    # environment assignments
    (["env", "AWS_SECRET_ACCESS_KEY=hunter2", "GIT_AUTHOR_NAME=me", "aws", "s3", "ls"],
     ["env", f"AWS_SECRET_ACCESS_KEY={R}", "GIT_AUTHOR_NAME=me", "aws", "s3", "ls"]),
    (["env", "GITHUB_TOKEN=hunter2", "PGPASSWORD=hunter2", "MYSQL_PWD=hunter2",
      "NPM_CONFIG__AUTH=hunter2", "HTTP_AUTH=hunter2", "DB_CREDENTIALS=hunter2",
      "OPENAI_API_KEY=hunter2", "PATH=/usr/bin", "tool"],
     ["env", f"GITHUB_TOKEN={R}", f"PGPASSWORD={R}", f"MYSQL_PWD={R}", f"NPM_CONFIG__AUTH={R}",
      f"HTTP_AUTH={R}", f"DB_CREDENTIALS={R}", f"OPENAI_API_KEY={R}", "PATH=/usr/bin", "tool"]),
    (["docker", "run", "-e", "API_KEY=hunter2", "-p", "8080:80", "img"],
     ["docker", "run", "-e", f"API_KEY={R}", "-p", "8080:80", "img"]),
    (["java", "-Dapp.db.password=hunter2", "-jar", "a.jar"],
     ["java", f"-Dapp.db.password={R}", "-jar", "a.jar"]),
]

TOKENS = [
    "ghp_" + "a1B2" * 9, "gho_" + "x" * 36, "ghs_" + "Z9" * 18, "github_pat_11ABCDEFG0" + "x" * 40,
    "glpat-" + "AbCdEf" * 4, "xoxb-1234567890-abcdefghij", "xoxp-1234-5678-abcdefghijkl",
    "AKIAIOSFODNN7EXAMPLE", "npm_" + "a" * 36, "sk-proj-" + "x" * 40, "sk-ant-api03-" + "y" * 30,
    "pypi-AgEIcHlwaS5vcmc" + "q" * 40, "hf_" + "k" * 34, "AIza" + "S" * 35,
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
]


@pytest.mark.parametrize("argv, expected", REAL, ids=lambda v: " ".join(v)[:60])
def test_real_command_lines(argv, expected):
    assert redact_cmdline(argv) == expected
    assert "hunter2" not in " ".join(redact_cmdline(argv))


@pytest.mark.parametrize("token", TOKENS)
def test_token_shapes_anywhere(token):
    for argv in (["tool", token], ["tool", f"--x={token}"], ["tool", f"see {token}."],
                 ["tool", f"X-Anything: {token}"], ["tool", f"{token}:x@"]):
        out = " ".join(redact_cmdline(argv))
        assert token not in out and token[8:] not in out and R in out


ATTACKS = [
    # option names in another case: some programs accept them, and the value is a secret anyway
    (["curl", "--PASSWORD", "hunter2"], ["curl", "--PASSWORD", R]),
    (["curl", "--User=agent:hunter2"], ["curl", f"--User=agent:{R}"]),
    (["curl", "--HEADER", "authorization: bearer hunter2"],
     ["curl", "--HEADER", f"authorization: bearer {R}"]),
    (["curl", "-H", "AUTHORIZATION:hunter2"], ["curl", "-H", f"AUTHORIZATION: {R}"]),
    # '=' and ':' inside values
    (["tool", "--token=a=b=hunter2"], ["tool", f"--token={R}"]),
    (["curl", "--user", "agent:pa:ss=hunter2"], ["curl", "--user", f"agent:{R}"]),
    (["tool", "TOKEN=abc=hunter2"], ["tool", f"TOKEN={R}"]),
    (["tool", "--data=token=hunter2&x=1"], ["tool", f"--data=token={R}&x=1"]),
    # '@', '?' and '#' inside URL passwords do not end the userinfo early
    (["curl", "https://u:p@hunter2@h.test/x"], ["curl", f"https://{R}@h.test/x"]),
    (["curl", "https://u:p?hunter2@h.test/x"], ["curl", f"https://{R}@h.test/x"]),
    # Unicode: a non-breaking space or a non-ASCII letter inside a value does not end it
    (["tool", "TOKEN=pä\u00a0hunter2"], ["tool", f"TOKEN={R}"]),
    (["tool", "--password=пароль hunter2"], ["tool", f"--password={R}"]),
    (["curl", "-u", "ägent:hunter2"], ["curl", "-u", f"ägent:{R}"]),
    # a whole command line in one argument
    (["sh", "-c",
      'curl -H "Authorization: Bearer hunter2" -u a:hunter2 https://x.test/ && TOKEN=hunter2 make'],
     ["sh", "-c",
      f"curl -H 'Authorization: Bearer {R}' -u a:{R} https://x.test/ && TOKEN={R} make"]),
    (["bash", "-lc", "mysql -phunter2 db"], ["bash", "-lc", f"mysql -p{R} db"]),
    (["ssh", "h.test", "curl --password hunter2 x"], ["ssh", "h.test", f"curl --password {R} x"]),
    # quoted values with spaces
    (["sh", "-c", "TOKEN='a b hunter2' run"], ["sh", "-c", f"TOKEN={R} run"]),
    # the option is the last argument: nothing to hide, nothing breaks
    (["curl", "--password"], ["curl", "--password"]),
    (["curl", "-H"], ["curl", "-H"]),
]


@pytest.mark.parametrize("argv, expected", ATTACKS, ids=lambda v: " ".join(v)[:60])
def test_attacker_command_lines(argv, expected):
    assert redact_cmdline(argv) == expected
    assert "hunter2" not in " ".join(redact_cmdline(argv))


def test_configured_secret_values_are_hidden_wherever_they_appear():
    secret = "s3kr1t-not-shaped-like-anything"
    argv = ["tool", f"--opt={secret}", f"x{secret}y", secret, f"https://h.test/{secret}/p",
            f"sh -c 'echo {secret}'"]
    out = redact_cmdline(argv, secrets=[secret, ""])
    assert secret not in " ".join(out)
    assert out[:4] == ["tool", f"--opt={R}", f"x{R}y", R]
    # a secret holding another: the longer is replaced whole
    assert redact_cmdline(["t", "abcdef"], ["abc", "abcdef"]) == ["t", R]
    # a value read from a file with its newline still matches
    assert redact_cmdline(["t", "v4lue"], ["v4lue\n"]) == ["t", R]


@given(st.text(alphabet=string.ascii_letters + string.digits + "äß€-_.~!$%^*()+,", min_size=6,
               max_size=40),
       st.sampled_from(["{s}", "--x={s}", "-H", "X: {s}", "https://h.test/?a={s}", "a{s}b"]))
def test_a_configured_secret_never_survives(secret, template):
    assume(secret not in "tool -H X: https://h.test/?a= a b --x= [redacted] [truncated]")
    argv = ["tool", template.format(s=secret)]
    assert secret not in " ".join(redact_cmdline(argv, [secret]))
    assert secret not in redact_text(" ".join(argv), [secret])


@pytest.mark.parametrize("name, secret", [
    ("AWS_SECRET_ACCESS_KEY", True), ("GITHUB_TOKEN", True), ("PGPASSWORD", True),
    ("MYSQL_PWD", True), ("_authToken", True), ("apiKey", True), ("x-api-key", True),
    ("HTTP_AUTH", True), ("GOOGLE_APPLICATION_CREDENTIALS", True), ("passwd", True),
    ("GIT_AUTHOR_NAME", False), ("keep-alive", False), ("PATH", False), ("HOME", False),
    ("monkey", False), ("bypass", False), ("sslmode", False), ("user", False),
])
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret


def test_harmless_command_lines_are_kept():
    for argv in (["python3", "-m", "pip", "install", "requests==2.0"],
                 ["git", "fetch", "--depth=1", "origin"],
                 ["curl", "-sS", "--max-time", "20", "-x", "http://127.0.0.1:8080",
                  "https://x.test/a/b"],
                 ["npm", "ci", "--prefer-offline"], ["/usr/bin/codex", "exec", "make test"]):
        assert redact_cmdline(argv) == argv


def test_a_cut_argument_is_dropped_not_kept_in_part():
    token = "ghp_" + "a" * 36
    data = b"tool\0" + b"x" * (MAX_CMDLINE - 5 - 20) + b"\0" + token.encode() + b"\0"
    described = describe_cmdline(data)
    assert described.endswith(" [truncated]") and "ghp_" not in described
    assert describe_cmdline(b"curl\0-u\0a:hunter2\0") == f"curl -u a:{R}"
    assert describe_cmdline(b"tool\0v4lue\0", secrets=["v4lue"]) == f"tool {R}"


CLIENT = """
import socket, sys, time
port, origin = int(sys.argv[1]), int(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port))
time.sleep(1)  # lets the proxy find this process before the request is decided
sock.sendall(f"GET http://web.test:{origin}/redact HTTP/1.1\\r\\nHost: web.test:{origin}\\r\\n"
             "Connection: close\\r\\n\\r\\n".encode())
while sock.recv(65536):
    pass
"""


@pytest.mark.e2e
def test_the_audit_log_keeps_no_secret_of_a_client_command_line(cli, tmp_path, dns, web):
    """A real client whose command line is full of secrets, through the real proxy: its event
    names it, with every secret redacted."""
    policy = (f"version: 1\naccounts:\n  tester:\n    match: {{uids: [{os.getuid()}]}}\n"
              f"    allow:\n      - host: web.test\n        ports: [{web.port}]\n"
              f"      - cidr: 127.0.0.1/32\n        ports: [{web.port}]\n")
    proxy = RunningProxy(cli, tmp_path, policy, "--upstream-dns", dns.address)
    secrets = ["hunter2", "ghp_" + "Q" * 36, "s3cr3t-key-value", "b4sic-pass"]
    try:
        subprocess.run([sys.executable, "-c", CLIENT, str(proxy.port), str(web.port),
                        "--password", secrets[0], f"--token={secrets[1]}",
                        f"AWS_SECRET_ACCESS_KEY={secrets[2]}",
                        f"https://user:{secrets[3]}@web.test/?api_key={secrets[2]}",
                        "-H", f"Authorization: Bearer {secrets[1]}"],
                       check=True, timeout=30)
        (event,) = proxy.wait_for_events(lambda e: e["path"] == "/redact")
    finally:
        proxy.stop()
    assert event["pid"] is not None and "python" in os.path.basename(event["exe"])
    assert event["cmdline"].endswith(
        f"--password {R} --token={R} AWS_SECRET_ACCESS_KEY={R} https://{R}@web.test/?{R} -H "
        f"Authorization: Bearer {R}")
    log = proxy.audit_log.read_text()
    assert not [s for s in secrets if s in log]
