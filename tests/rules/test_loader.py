"""The loader against a corpus of broken files (tests/rules/broken/*.yaml), each of which
states, in `# expect:` lines, every problem `validate` must report for it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent_egress.rules import PolicyError, load_policy, parse_policy

BROKEN = sorted((Path(__file__).parent / "broken").glob("*.yaml"))


def expected_problems(path: Path) -> list[str]:
    return [line.removeprefix("# expect: ") for line in path.read_text().splitlines()
            if line.startswith("# expect: ")]


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_policy_reports_every_problem(path: Path):
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    reported = [f"{p.line}:{p.col}: {p.message}" for p in raised.value.problems]
    assert reported == expected_problems(path)


@pytest.mark.parametrize("path", BROKEN[:3], ids=lambda p: p.stem)
def test_validate_prints_file_line_col_and_exits_2(cli, path: Path):
    done = subprocess.run([cli, "validate", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"{path}:{e}" for e in expected_problems(path)]
    assert "Traceback" not in done.stderr


def load_bytes(data: bytes) -> list[str]:
    with pytest.raises(PolicyError) as raised:
        parse_policy(data, "p.yaml")
    return [str(p) for p in raised.value.problems]


def test_oversized_file_is_refused_before_parsing():
    data = b"version: 1\naccounts: {}\n" + b"# padding\n" * (5 * 2**20)
    assert load_bytes(data) == [
        "p.yaml:1:1: file is 50.0 MiB; a policy may be at most 16 MiB"]


def test_binary_garbage():
    assert load_bytes(b"version: 1\n\x00\x01\x02\xff") == [
        "p.yaml:2:1: binary data (a NUL byte); expected a YAML text file"]


def test_not_utf8():
    assert load_bytes(b"version: 1\naccounts:\n  caf\xe9: {}\n") == [
        "p.yaml:3:6: not UTF-8 (byte 0xe9); expected a UTF-8 YAML text file"]


def test_deep_nesting_is_an_answer_not_a_crash():
    problems = load_bytes(b"[" * 100_000)
    assert len(problems) == 1 and problems[0].startswith("p.yaml:")


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError) as raised:
        load_policy(tmp_path / "nope.yaml")
    assert str(raised.value) == f"{tmp_path / 'nope.yaml'}:1:1: cannot read the policy: " \
                                "No such file or directory"


def test_valid_policy_rules_carry_their_lines():
    document = parse_policy(b"""version: 1
accounts:
  codex:
    match: {unix_users: [codex]}
    allow:
      - host: API.Example.TEST.
      - preset: gitlab
    deny:
      - host: "*.bad.example.test"
""", "p.yaml")
    codex = document.accounts["codex"]
    assert [(r.source, r.host, r.ports) for r in codex.allow[:1]] == [
        ("p.yaml:6", "api.example.test", frozenset({80, 443}))]
    assert {r.source for r in codex.allow[1:]} == {"p.yaml:7"}
    assert {r.preset_source for r in codex.allow[1:]} == {"builtin:gitlab.yaml:4",
                                                          "builtin:gitlab.yaml:6"}
    assert [(r.source, r.host, r.ports) for r in codex.deny] == [
        ("p.yaml:9", "*.bad.example.test", None)]


def test_shared_suffix_wildcard_is_a_warning():
    document = parse_policy(b"""version: 1
accounts:
  codex:
    match: {uids: [1001]}
    allow:
      - host: "*.githubusercontent.com"
""", "p.yaml")
    assert [str(w) for w in document.warnings] == [
        "p.yaml:6:15: warning: host '*.githubusercontent.com': the Public Suffix List marks "
        "'githubusercontent.com' as a shared suffix, so names under it belong to different "
        "owners"]


def test_builtin_presets_are_valid_and_commented():
    from agent_egress.rules import builtin_presets

    presets = builtin_presets()
    assert set(presets) == {"github", "gitlab", "bitbucket", "github-actions"}
    preset_dir = Path(__file__).parents[2] / "rules" / "presets"
    for name in presets:
        text = (preset_dir / f"{name}.yaml").read_text()
        assert "Source:" in text
        for line in text.splitlines():
            if line.startswith("- host:"):
                assert " # " in line, f"{name}: every entry says what it is for: {line}"
