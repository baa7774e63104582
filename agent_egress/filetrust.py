"""Whether an account the policy governs could have written a file the proxy trusts (the policy,
a credential): the file and every directory and symbolic link on the way to it.

The path is walked one component at a time from `/`, each directory opened without following a
link (`O_NOFOLLOW`, relative to the one before) and checked as opened; a symbolic link is read
where it lies and followed by hand. The file checked is the descriptor then read: nothing can be
swapped in between the check and the read, and no directory can be renamed under the walk.

An object is untrusted when a governed uid owns it (an owner can chmod, or, for a directory or
a link, replace what it names), or when a governed uid can write it (world-writable; writable by
a group a governed uid belongs to; a POSIX ACL entry granting a governed user or group write) —
except that a sticky directory (`/tmp`) lets others remove or rename only their own entries.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import struct
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MAX_LINKS = 40  # as the kernel's ELOOP limit
_ACL_XATTR = "system.posix_acl_access"
_ACL_HEADER = struct.Struct("=I")
_ACL_ENTRY = struct.Struct("=HHI")
_ACL_USER, _ACL_GROUP = 0x02, 0x08
_WRITE = 0x2
_READ = 0x4


@dataclass(frozen=True, slots=True)
class Step:
    """One object the path passes through, as found: a directory, a link, or the file."""

    path: str
    st: os.stat_result
    acl_writers: tuple[tuple[str, int], ...] = ()  # ("user" | "group", id) with write access
    acl_readers: tuple[tuple[str, int], ...] = ()  # ("user" | "group", id) with read access


@dataclass(frozen=True, slots=True)
class Chain:
    """Every object from `/` to the file (or directory) opened, in that order."""

    steps: tuple[Step, ...]

    def untrusted_reason(self, governed: Mapping[int, str]) -> str | None:
        """Why one of the accounts (uid: account name) could have changed what was read, or
        None."""
        groups = _groups_of(governed)
        for step in self.steps:
            reason = _step_reason(step, governed, groups)
            if reason is not None:
                return reason
        return None

    def readable_reason(self, governed: Mapping[int, str]) -> str | None:
        """Why one of the accounts could read the file itself (a secret), or None."""
        step = self.steps[-1]
        st = step.st
        if st.st_uid in governed:
            return (f"{step.path} belongs to uid {st.st_uid}, which account "
                    f"{governed[st.st_uid]} governs: that account could read it")
        if st.st_mode & stat.S_IROTH:
            return f"{step.path} is readable by every user, governed accounts included"
        if not st.st_mode & stat.S_IRGRP:
            return None
        groups = _groups_of(governed)
        for uid, account in governed.items():
            if st.st_gid in groups.get(uid, ()):
                return (f"{step.path} is readable by group {_group_name(st.st_gid)}, which uid "
                        f"{uid} of account {account} is in: that account could read it")
            for kind, ident in step.acl_readers:
                if (kind == "user" and ident == uid) or (kind == "group" and
                                                         ident in groups.get(uid, ())):
                    return (f"{step.path} is readable by uid {uid} of account {account} "
                            "through its access ACL")
        return None


def read_checked(path: str | os.PathLike[str]) -> tuple[bytes, Chain]:
    """The file's content and the chain it was read through (to be checked with
    `Chain.untrusted_reason` before the content is used). Raises OSError."""
    fd, chain = open_chain(path)
    try:
        if not stat.S_ISREG(chain.steps[-1].st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts), chain
    finally:
        os.close(fd)


def untrusted_reason(path: str | os.PathLike[str], governed: Mapping[int, str]) -> str | None:
    """Why an account in `governed` (uid: account name) could rewrite the file or directory at
    `path` or anything on the way to it, or None. Raises OSError (no such file, say)."""
    fd, chain = open_chain(path)
    os.close(fd)
    return chain.untrusted_reason(governed)


def open_chain(path: str | os.PathLike[str]) -> tuple[int, Chain]:
    """Opens `path` (read-only) walking it from `/` as described above; returns the
    descriptor, for the caller to close, and what was passed through."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        text = os.path.join(os.getcwd(), text)
    pending = deque(text.split("/"))
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    directories = [(root, "")]  # open descriptors from `/` down, with their paths
    steps = [_step("/", root)]
    links = 0
    try:
        while True:
            name = _next_name(pending)
            if name is None:  # the path named `/` itself, or ended in `..`
                fd = os.dup(directories[-1][0])
                return fd, Chain(tuple(steps))
            if name == "..":
                if len(directories) > 1:
                    os.close(directories.pop()[0])
                continue
            parent, parent_path = directories[-1]
            here = f"{parent_path}/{name}"
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), text)
                steps.append(Step(f"{here} (a symbolic link)", st))
                target = os.readlink(name, dir_fd=parent)
                if target.startswith("/"):
                    while len(directories) > 1:
                        os.close(directories.pop()[0])
                pending.extendleft(reversed(target.split("/")))
                continue
            last = _next_name(pending, peek=True) is None
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            try:
                fd = os.open(name, flags if last else flags | os.O_DIRECTORY, dir_fd=parent)
            except PermissionError:
                if last:
                    raise
                # a directory this process may pass through but not list: its mode and owner
                # are still known, its ACL is not
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                             dir_fd=parent)
            try:
                steps.append(_step(here, fd))
            except BaseException:
                os.close(fd)
                raise
            if last:
                return fd, Chain(tuple(steps))
            directories.append((fd, here))
    finally:
        for fd, _ in directories:
            os.close(fd)


def _next_name(pending: deque[str], peek: bool = False) -> str | None:
    """The next component that is not empty or `.` (dropping those), or None at the end."""
    while pending and pending[0] in ("", "."):
        pending.popleft()
    if not pending:
        return None
    return pending[0] if peek else pending.popleft()


def _step(path: str, fd: int) -> Step:
    return Step(path, os.fstat(fd), *_acl_named(fd))


def _acl_named(fd: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
    """Named users and groups that an access ACL lets write, and those it lets read (the
    mask is the group bits)."""
    try:
        data = os.getxattr(fd, _ACL_XATTR)
    except OSError:
        return (), ()  # no ACL (ENODATA), or none supported here
    writers, readers = [], []
    for offset in range(_ACL_HEADER.size, len(data) - _ACL_ENTRY.size + 1, _ACL_ENTRY.size):
        tag, perm, ident = _ACL_ENTRY.unpack_from(data, offset)
        if tag in (_ACL_USER, _ACL_GROUP):
            entry = ("user" if tag == _ACL_USER else "group", ident)
            if perm & _WRITE:
                writers.append(entry)
            if perm & _READ:
                readers.append(entry)
    return tuple(writers), tuple(readers)


def _groups_of(governed: Iterable[int]) -> dict[int, set[int]]:
    """The groups (primary and supplementary) of each governed uid that has a user entry."""
    groups: dict[int, set[int]] = {}
    for uid in governed:
        try:
            user = pwd.getpwuid(uid)
            groups[uid] = set(os.getgrouplist(user.pw_name, user.pw_gid))
        except (KeyError, OSError):
            groups[uid] = set()
    return groups


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _step_reason(step: Step, governed: Mapping[int, str],
                 groups: Mapping[int, set[int]]) -> str | None:
    st = step.st
    if st.st_uid in governed:
        return (f"{step.path} belongs to uid {st.st_uid}, which account "
                f"{governed[st.st_uid]} governs: that account could rewrite it")
    if stat.S_ISLNK(st.st_mode):
        return None  # a link's own mode means nothing; its directory was checked
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return None  # others may change only their own entries, and the next one is checked
    if st.st_mode & stat.S_IWOTH:
        return f"{step.path} is writable by every user, governed accounts included"
    if not st.st_mode & stat.S_IWGRP:
        return None  # neither the owning group nor (the mask being these bits) any ACL entry
    for uid, account in governed.items():
        if st.st_gid in groups.get(uid, ()):
            return (f"{step.path} is writable by group {_group_name(st.st_gid)}, which uid "
                    f"{uid} of account {account} is in: that account could rewrite it")
        for kind, ident in step.acl_writers:
            if (kind == "user" and ident == uid) or (kind == "group" and
                                                     ident in groups.get(uid, ())):
                return (f"{step.path} is writable by uid {uid} of account {account} through "
                        "its access ACL: that account could rewrite it")
    return None
