"""Disk space reserved for audit lines before the traffic they record may flow.

The rule (DESIGN.md): no traffic flows on a decision whose audit line the kernel has not
accepted. An allowed connection's line is written when the connection closes, since it carries
the bytes that went each way; one event, one line. So the line itself cannot be written before
the traffic, and neither of the obvious substitutes holds:

- a flag "the last write failed" lets through everything decided between the disk filling and
  the next write, and those are exactly the connections whose lines are then lost;
- waiting for the writer's next successful `write()` (a barrier) proves that the disk had room
  for that write, not for the line written at close, minutes later; and with nothing else
  queued there is nothing to write (a write of no bytes succeeds on a full disk).

What the kernel accepts before traffic flows is therefore room for the line: the writer keeps
disk blocks allocated to the audit file beyond its end (`fallocate` with
`FALLOC_FL_KEEP_SIZE`: the blocks are the file's, its size is unchanged, readers see whole
lines only). An append into blocks allocated this way cannot fail for lack of space: ENOSPC is
raised when blocks are allocated, and these already are. The gate lets a decision's traffic
flow only after `promise` has set aside LINE_PROMISE bytes of that room for its line, in this
ledger: a lock and some arithmetic on the event loop, no system call, no waiting. The writer
thread, once per batch (however many connections the batch serves), looks at the file's size
and, when the room beyond the promised lines falls below half of SLACK_BYTES, asks the
filesystem for more: one `fstat`, and now and then one `fallocate`. When the filesystem has no
more to give, new promises fail and the gate refuses (`UNRECORDED`), while every line already
promised still has its blocks; lines nobody was promised room for (denials: no traffic flowed
on them) are written only into room that no promise needs, and otherwise dropped and counted
as write errors.

Where this holds and where it does not (docs/threat-model.md):
- on filesystems that allocate blocks ahead with `fallocate` (ext4, XFS, btrfs, tmpfs). Where
  they cannot (`EOPNOTSUPP`: some network and FUSE filesystems) or the log is not a regular
  file (`--audit-log -` into a pipe, which blocks rather than fills), traffic is refused only
  once a write has failed, as before, and a warning says so at start;
- for lines no longer than their promise. A line is about 0.6 KiB; a command line at its cap
  with every byte escaped makes one longer than LINE_PROMISE, and the excess comes out of the
  slack, which covers it unless the disk fills while more than SLACK_BYTES of such excess is
  outstanding;
- within one process. `--workers` processes each reserve ahead of the same file and write into
  each other's reservations; the slack covers the others' lines written in between unless the
  disk fills while more than SLACK_BYTES of them are outstanding.
- Rotation by renaming (SIGUSR1) starts a new file: the lines still promised are reserved
  there before anything else is written; rotation by `copytruncate` frees the blocks, which is
  noticed (the file shrank) and reserved again.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading

log = logging.getLogger(__name__)

SLACK_BYTES = 4 << 20  # reserved beyond the promised lines: about 6,000 lines
LINE_PROMISE = 8 << 10  # set aside for each line that traffic flowed on
_FALLOC_FL_KEEP_SIZE = 1
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV}
_FULL = {errno.ENOSPC, errno.EDQUOT}

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate_keep_size(fd: int, offset: int, length: int) -> None:
    """Allocates `length` bytes of `fd` from `offset` without changing its size."""
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class ReservedSpace:
    """The room reserved ahead of the audit file, and how much of it is promised. `promise`
    runs on the event loop; `reset` and `plan` on the writer thread."""

    def __init__(self, slack: int = SLACK_BYTES) -> None:
        self.slack = slack
        self.reservable = False  # False: promises are not kept here (see the module)
        self.short = False  # the filesystem gave less than was asked, last time it was asked
        self._lock = threading.Lock()  # the ledger; held for a few operations at a time
        self._growing = threading.Lock()  # the reservation: whoever changes where it ends
        self._fd = -1
        self._promised = 0  # bytes set aside for lines not yet written
        self._room = 0  # bytes reserved beyond the end of the file and what is being written
        self._end = 0  # where the reservation ends, as a file offset
        self._size = 0  # the file's size when last looked at

    # The event loop's side

    def promise(self, size: int) -> bool | None:
        """Sets `size` bytes aside for a line: True when done, False when there is not that
        much room left, None when this file keeps no promises (not a regular file, or a
        filesystem that cannot allocate ahead)."""
        if not self.reservable:
            return None
        with self._lock:
            if self._room - self._promised >= size:
                self._promised += size
                return True
        if self.short:
            return False
        # The writer has not kept up with a burst (it reserves ahead once per batch): reserve
        # here, rarely, rather than refuse traffic while the filesystem has room.
        with self._growing:
            with self._lock:
                end = self._end + max(self.slack, size + self._promised - self._room)
            self._grow(self._fd, end)
        with self._lock:
            if self._room - self._promised < size:
                return False
            self._promised += size
            return True

    def release(self, size: int) -> None:
        """Hands back room promised to a line that will not be written."""
        with self._lock:
            self._promised -= size

    def running_low(self) -> bool:
        """Less than half the slack is left beyond the promised lines: time to reserve more."""
        return self.reservable and self._room - self._promised < self.slack // 2

    # The writer's side

    def reset(self, fd: int) -> None:
        """`fd` is a newly opened audit file: reserves ahead of it (the lines still promised,
        and the slack)."""
        info = os.fstat(fd)
        with self._growing:
            self._fd = fd
            self.reservable = stat.S_ISREG(info.st_mode)
            if not self.reservable:
                return
            with self._lock:
                self._size = self._end = info.st_size
                self._room = 0
                owed = self._promised
            self._grow(fd, self._size + owed + self.slack)

    def plan(self, fd: int, lines: list[tuple[bytes, int]]) -> tuple[bytes, int]:
        """The bytes to write of a batch of (line, bytes promised to it): every promised line,
        and the others as far as room that no promise needs allows; then the number of lines
        left out (in lines). The ledger counts the batch as written from here on."""
        with self._growing:
            return self._plan(fd, lines)

    def _plan(self, fd: int, lines: list[tuple[bytes, int]]) -> tuple[bytes, int]:
        size = os.fstat(fd).st_size
        with self._lock:
            if size < self._size:  # truncated (logrotate's copytruncate): the blocks are gone
                self._end = size
            self._size = size
            self._end = max(self._end, size)
        promised_here = sum(promised for _, promised in lines)
        promised_bytes = sum(len(line) for line, promised in lines if promised)
        others = sum(len(line) for line, promised in lines if not promised)
        with self._lock:
            owed = self._promised - promised_here  # to lines not in this batch
        needed = size + promised_bytes + others + owed
        if self._end < needed + self.slack // 2:
            self._grow(fd, needed + self.slack)
        free = self._end - size - owed - promised_bytes
        kept: list[bytes] = []
        dropped = 0
        for line, promised in lines:
            if promised:
                kept.append(line)
            elif len(line) <= free:
                kept.append(line)
                free -= len(line)
            else:
                dropped += line.count(b"\n")
        data = b"".join(kept)
        with self._lock:
            self._promised -= promised_here
            self._room = self._end - size - len(data)
        return data, dropped

    def _grow(self, fd: int, end: int) -> None:
        """Extends the reservation to `end`, or as far as the filesystem allows. Called with
        `_growing` held."""
        if end <= self._end or not self.reservable:
            return
        try:
            fallocate_keep_size(fd, self._end, end - self._end)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                self.reservable = False
                log.warning("audit log: this filesystem cannot reserve space ahead (%s): "
                            "traffic is refused only once a write has failed, so the first "
                            "connections after the disk fills may pass unrecorded", e)
                return
            if e.errno not in _FULL:
                log.error("audit log: cannot reserve space: %s", e)
            self._grow_into_what_is_left(fd, end)
            return
        with self._lock:
            self._room += end - self._end
            self._end = end
        if self.short:
            log.warning("audit log: space could be reserved again")
        self.short = False

    def _grow_into_what_is_left(self, fd: int, end: int) -> None:
        info = os.fstatvfs(fd)
        blocks = info.f_bfree if os.geteuid() == 0 else info.f_bavail
        length = min((blocks - 1) * info.f_frsize, end - self._end)  # one block: alignment
        if length > 0:
            try:
                fallocate_keep_size(fd, self._end, length)
            except OSError:
                pass
            else:
                with self._lock:
                    self._room += length
                    self._end += length
        if not self.short:
            with self._lock:
                left = self._end - self._size - self._promised
            log.error("audit log: the filesystem has no more room to reserve; %d bytes are left "
                      "beyond the lines already promised, then new traffic is refused",
                      max(left, 0))
        self.short = True
