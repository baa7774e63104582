"""The audit writer's reserved room (agent_egress/auditspace.py): promised lines are written
whatever happens to the disk meanwhile, other lines only into room nobody was promised."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from support.proxy import wait_until

from agent_egress import auditspace
from agent_egress.audit import AuditLog
from agent_egress.auditevent import AuditEvent
from agent_egress.auditspace import LINE_PROMISE
from agent_egress.rules import Result, Stage


def event(path: str, decision: Result = Result.ALLOW) -> AuditEvent:
    return AuditEvent(ts="2026-12-01T00:00:00.000Z", event=Stage.REQUEST, account="agent",
                      host="allowed.test", port=443, method="GET", path=path, decision=decision)


@pytest.fixture
def fill_disk(monkeypatch):
    """Call it, and from then on the filesystem gives no more room."""
    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    return lambda: monkeypatch.setattr(auditspace, "fallocate_keep_size", no_room)


def lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_room_is_reserved_ahead_without_changing_the_size(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", slack=1 << 20)
    try:
        assert log.space.reservable
        assert (tmp_path / "audit.jsonl").stat().st_size == 0
        assert (tmp_path / "audit.jsonl").stat().st_blocks * 512 >= 1 << 20
        assert log.promise(LINE_PROMISE)
    finally:
        log.close()


def test_promised_lines_are_written_after_the_disk_fills(tmp_path, fill_disk):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, slack=4 * LINE_PROMISE)  # reserved before the disk fills
    fill_disk()
    promised = [log.promise(LINE_PROMISE) for _ in range(5)]
    assert promised == [True] * 4 + [False]  # no more room: the gate refuses the fifth
    for i in range(20):  # denials: no traffic flowed, and no room is theirs
        log.record(event(f"/denied-{i}", Result.DENY))
    assert wait_until(lambda: log.write_errors > 0)  # dropped, not written into promised room
    for i in range(4):
        log.record(event(f"/allowed-{i}"), LINE_PROMISE)
    log.close()
    written = lines(path)
    assert [e["path"] for e in written if e["decision"] == "allow"] == [
        f"/allowed-{i}" for i in range(4)]
    assert len(written) == 4


def test_the_slack_is_kept_ahead_as_lines_are_written(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, slack=64 * 1024)
    try:
        for i in range(2000):  # far more than the slack
            assert log.promise(LINE_PROMISE // 8)
            log.record(event(f"/{i}"), LINE_PROMISE // 8)
    finally:
        log.close()
    assert len(lines(path)) == 2000 and log.write_errors == 0


def test_a_truncated_file_is_reserved_again(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, slack=64 * 1024)
    log.record(event("/before"))
    log.record(event("/before, again"))
    log.close()  # drains
    log = AuditLog(path, slack=64 * 1024)
    path.write_bytes(b"")  # logrotate's copytruncate: the blocks ahead are freed too
    assert path.stat().st_blocks == 0
    log.record(event("/after"))
    log.close()
    assert path.stat().st_blocks * 512 >= 64 * 1024
    assert [e["path"] for e in lines(path)] == ["/after"]
