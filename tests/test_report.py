"""`agent-egress report` over audit logs: plain, gzipped and standard input, damaged lines
reported with their numbers and skipped."""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess

import pytest

from agent_egress.auditevent import KEYS


def event(**fields):
    base = dict.fromkeys(KEYS)
    base.update(ts="2026-11-25T10:00:00.000Z", event="connect", account="codex", port=443,
                decision="allow", exe="/usr/bin/git")
    base.update(fields)
    return json.dumps(base)


LOG = [
    event(host="github.test"),
    event(host="github.test", ts="2026-11-25T10:05:00.000Z", exe="/usr/bin/curl"),
    event(host="evil.test", decision="deny", reason="no rule matched for evil.test:443"),
    event(host="new.test", decision="would_deny", account="learner"),
    event(host="github.test", event="dns", port=None, qtype="A"),
]


def run(cli, *args, stdin=None):
    return subprocess.run([cli, "report", *args], capture_output=True, text=True, input=stdin,
                          timeout=60)


def test_json_report_denials_first(cli, tmp_path):
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join(LOG) + "\n")
    done = run(cli, "--format", "json", str(log))
    assert done.returncode == 0 and done.stderr == ""
    rows = [(r["account"], r["destination"], r["events"], r["allow"], r["deny"],
             r["would_deny"]) for r in json.loads(done.stdout)]
    assert rows == [
        ("codex", "evil.test:443", 1, 0, 1, 0),
        ("codex", "github.test:443", 2, 2, 0, 0),
        ("codex", "github.test (dns)", 1, 1, 0, 0),
        ("learner", "new.test:443", 1, 0, 0, 1),
    ]
    github = json.loads(done.stdout)[1]
    assert (github["first_seen"], github["last_seen"], github["processes"]) == (
        "2026-11-25T10:00:00.000Z", "2026-11-25T10:05:00.000Z", ["git", "curl"])


def test_damaged_lines_are_reported_and_skipped(cli, tmp_path):
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join([LOG[0], "{not json", '["a list"]', event(host="x.test",
                   port="443"), '{"hello": 1}', LOG[2], LOG[1][:40]]))
    done = run(cli, "--format", "csv", str(log))
    assert done.returncode == 0
    assert done.stderr.splitlines() == [
        f"{log}:2: not a JSON object (truncated or corrupt line); line skipped",
        f"{log}:3: not a JSON object; line skipped",
        f"{log}:4: port is str, expected int; line skipped",
        f"{log}:5: not an agent-egress audit event (unknown keys ['hello']); line skipped",
        f"{log}:7: not a JSON object (truncated or corrupt line); line skipped",
    ]
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["destination"], r["events"]) for r in rows] == [("evil.test:443", "1"),
                                                               ("github.test:443", "1")]


def test_gzipped_and_stdin_and_table(cli, tmp_path):
    packed = tmp_path / "audit.jsonl.1.gz"
    packed.write_bytes(gzip.compress(("\n".join(LOG[:3]) + "\n").encode()))
    done = run(cli, str(packed), "-", stdin="\n".join(LOG[3:]) + "\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "account codex: 3 destinations, 4 events"
    assert lines[2].split()[:5] == ["evil.test:443", "1", "0", "1", "0"]
    assert lines[3].strip() == "why: no rule matched for evil.test:443"
    assert "account learner: 1 destinations, 1 events" in lines


def test_truncated_gzip_keeps_what_was_read(cli, tmp_path):
    packed = tmp_path / "cut.gz"
    data = gzip.compress(("\n".join(LOG * 50) + "\n").encode())
    packed.write_bytes(data[: len(data) // 2])
    done = run(cli, "--format", "json", str(packed))
    assert done.returncode == 0
    assert "the file ends early or is corrupt" in done.stderr


@pytest.mark.parametrize("missing", ["nope.jsonl"])
def test_missing_file(cli, tmp_path, missing):
    done = run(cli, str(tmp_path / missing))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip() == f"agent-egress: {tmp_path / missing}: cannot read: No such " \
                                  "file or directory"


def test_client_chosen_names_cannot_recolour_or_fake_report_lines(cli, tmp_path):
    """A governed account chooses its programs' names and paths (and so the reasons quoting
    them): none of their control characters reach the operator's terminal."""
    fake = "\x1b[2K\r  github.test:443        99     99      0      0\n\x1b[32m"
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join([
        event(host="evil.test", decision="deny", exe=f"/tmp/{fake}",
              reason=f"no rule matched for evil.test:443 GET /{fake}\u202egnp.exe"),
    ]) + "\n")
    for fmt in ("table", "csv"):
        done = run(cli, "--format", fmt, str(log))
        assert done.returncode == 0
        assert not any(c in done.stdout for c in "\x1b\r\u202e")
        assert not any("github.test" in line.partition("\\x1b[2K")[0]
                       for line in done.stdout.splitlines())
    table = run(cli, str(log)).stdout.splitlines()
    assert len(table) == 4 and table[3].startswith("  ") and "why: no rule matched" in table[3]
    assert "\\x1b[2K\\x0d" in table[2] and "\\u202egnp.exe" in table[3]
