"""The control socket (`run --control`): how an agent's account asks for access and an operator
answers, through the running proxy.

One JSON object per line, one question and one answer per connection. The kernel says who
the caller is (SO_PEERCRED, and SO_PEERGROUPS for its groups): a governed account reads only
its own denials and opens requests for itself; `pending`, `approve` and `reject` need root or
a member (primary or supplementary group) of `--operators`; nobody approves a request of their
own account. An approval is written into the policy file by the proxy itself (it owns the
file), with a comment naming the operator, the time, the request and its reason, and the
proxy reloads before the held connections are let go. A malformed or oversized message gets an
error answer; nothing a caller sends reaches the proxy's other work.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import shlex
import socket
import stat
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .approvals import (
    Approvals,
    Denial,
    RequestError,
    State,
    one_line,
    rfc3339,
)
from .gate import Gate
from .notify import Notifier
from .policyedit import NewRule, parse_duration, replace_policy, with_allow_rules
from .rules import (
    DEFAULT_ACCOUNT,
    Address,
    HostError,
    Identity,
    Name,
    Policy,
    PolicyError,
    Query,
    Result,
    Stage,
    host_text,
    normalize_host,
    parse_policy,
)
from .rules.addresses import internal_kind
from .rules.hosts import looks_encoded
from .target import parse_target

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024
MAX_CALLERS = 32  # connections served at once; more are closed at once
READ_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 5.0
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_CRED = struct.Struct("3i")  # pid, uid, gid
_DEFAULT_PORTS = (80, 443)


class ControlError(Exception):
    """Why the control socket cannot be set up; run exits 2."""


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


class _Refused(Exception):
    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def peer(sock: socket.socket) -> Caller:
    """The caller's process, user and groups, as the kernel recorded them at connect."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _CRED.size))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4]))
    except OSError:  # more groups than fit, or an old kernel: the group database then
        try:
            name = pwd.getpwuid(uid).pw_name
            groups = frozenset(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)
        except KeyError:
            groups = frozenset()
    return Caller(pid, uid, gid, groups)


class ControlServer:
    def __init__(self, path: Path, gate: Gate, approvals: Approvals,
                 operators: str | None = None) -> None:
        self.path = path
        self.gate = gate
        self.approvals = approvals
        self.operators = operators
        try:
            self.operators_gid = grp.getgrnam(operators).gr_gid if operators else None
        except KeyError:
            raise ControlError(f"--operators {operators}: no such group") from None
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._callers = 0

    async def start(self) -> None:
        """Listens on the path (its directory created; a stale socket of a process that is
        gone replaced). Raises ControlError."""
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            if path.is_symlink() or path.exists():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise ControlError(f"--control {path}: exists and is not a socket")
                if _listening(path):
                    raise ControlError(f"--control {path}: another agent-egress listens on "
                                       "it (use --control PATH or off)")
                path.unlink()
            self._server = await asyncio.start_unix_server(self._serve, path=str(path),
                                                           limit=MAX_MESSAGE)
            # who may connect is decided per caller by the kernel's credentials
            os.chmod(path, 0o666)  # noqa: S103
            self._inode = path.stat().st_ino
        except OSError as e:
            raise ControlError(f"--control {path}: {e.strerror or e}") from None

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._callers += 1
        try:
            if self._callers > MAX_CALLERS:
                answer: dict[str, Any] = _error("the control socket is busy; try again")
            else:
                answer = await self._answer(reader, writer)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except Exception:  # noqa: BLE001 - a caller that misbehaves affects only itself
            log.debug("control connection failed", exc_info=True)
        finally:
            self._callers -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> dict[str, Any]:
        try:
            caller = peer(writer.get_extra_info("socket"))
        except OSError:
            return _error("cannot identify the caller")
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                line = await reader.readline()
        except TimeoutError:
            return _error("no message in time", usage=True)
        except ValueError:  # longer than the limit
            return _error(f"message longer than {MAX_MESSAGE} bytes", usage=True)
        try:
            message = json.loads(line)
        except ValueError:
            return _error("not a JSON message", usage=True)
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            return _error("expected a JSON object with 'op'", usage=True)
        handler = {"why": self.why, "request": self.request, "pending": self.pending,
                   "approve": self.approve, "reject": self.reject}.get(message["op"])
        if handler is None:
            return _error(f"unknown op {one_line(message['op'], 40)!r}", usage=True)
        try:
            return {"ok": True, **await handler(caller, message)}
        except _Refused as e:
            return _error(str(e), usage=e.usage)
        except RequestError as e:
            return _error(str(e), usage=e.usage)
        except Exception:
            log.exception("control: %s failed", message["op"])
            return _error("internal error (see the agent-egress log)")

    # Who

    def account_of(self, caller: Caller) -> str | None:
        """The account the policy governs the caller's uid with (by uid or user name), or
        None: the default account governs nobody in particular."""
        identity = Identity(uid=caller.uid, user=caller.user)
        choice = self.gate.policy.account_for(identity)
        return choice.account if choice.account not in (None, DEFAULT_ACCOUNT) else None

    def check_operator(self, caller: Caller) -> None:
        if caller.uid == 0:
            return
        gid = self.operators_gid
        if gid is not None and (caller.gid == gid or gid in caller.groups):
            return
        who = f"{caller.user} is not root" + (
            f" nor in group {self.operators}" if self.operators else
            " (the proxy runs without --operators)")
        raise _Refused(f"only an operator may do this: {who}")

    # Commands

    async def why(self, caller: Caller, message: dict[str, Any]) -> dict[str, Any]:
        account = self.account_of(caller)
        if account is None:
            return {"account": None, "denials": [],
                    "note": f"{caller.user} is no account the policy governs: no denials"}
        since = _number(message.get("since"), 3600.0)
        now = self.approvals.clock()
        grouped: dict[tuple[str | None, int | None], list[Denial]] = {}
        for denial in self.approvals.denials(account, now - since):
            grouped.setdefault((denial.event.host, denial.event.port), []).append(denial)
        open_requests = self.approvals.pending()
        out = []
        for (host, port), denials in grouped.items():
            last = denials[-1]
            entry = last.to_json()
            entry.update(first=denials[0].event.ts, count=len(denials), request=None,
                         pending=None)
            if host is not None and last.unmatched:
                target = host if port is None else f"{host}:{port}"
                entry["request"] = f"agent-egress request {shlex.quote(target)} --reason " \
                                   "'WHY YOU NEED IT'"
                entry["pending"] = next((r.id for r in open_requests if r.account == account
                                         and r.covers(host, port)), None)
            out.append(entry)
        out.sort(key=lambda e: str(e["ts"]))
        return {"account": account, "denials": out}

    async def request(self, caller: Caller, message: dict[str, Any]) -> dict[str, Any]:
        account = self.account_of(caller)
        if account is None:
            raise _Refused(f"{caller.user} is no account the policy governs; `request` is "
                           "for a governed account's own access")
        host, port, path = _target(message.get("target"))
        duration = message.get("for")
        if duration is not None:
            try:
                parse_duration(str(duration))
            except ValueError as e:
                raise _Refused(f"--for: {e}", usage=True) from None
        decision = self.gate.policy.decide(Query(account, host_text(host), port or 443,
                                                 Stage.CONNECT))
        if decision.passes:
            return {"allowed": True, "message": f"{account} may reach "
                    f"{_destination(host, port)} already ({decision.reason})"}
        if not decision.unmatched:
            raise _Refused(f"{_destination(host, port)} is refused by "
                           f"{decision.rule or 'an address check'}: {decision.reason}; an "
                           "access request cannot change that (ask the policy's owner)")
        request, new = self.approvals.open(account, host_text(host), port, path,
                                           str(message.get("reason") or ""),
                                           str(duration) if duration else None, caller.user)
        return {"request": request.to_json(), "new": new}

    async def pending(self, caller: Caller, message: dict[str, Any]) -> dict[str, Any]:
        self.check_operator(caller)
        return {"requests": [r.to_json() for r in self.approvals.pending()]}

    async def reject(self, caller: Caller, message: dict[str, Any]) -> dict[str, Any]:
        self.check_operator(caller)
        request = self.approvals.find(str(message.get("id") or ""))
        self.approvals.settle(request, State.REJECTED, caller.user,
                              one_line(str(message.get("reason") or "")))
        return {"request": request.to_json()}

    async def approve(self, caller: Caller, message: dict[str, Any]) -> dict[str, Any]:
        self.check_operator(caller)
        request = self.approvals.find(str(message.get("id") or ""))
        if self.account_of(caller) == request.account:
            raise _Refused(f"{caller.user} is governed by account {request.account}: nobody "
                           "approves a request of their own account")
        policies = self.gate.runtime.policies
        if policies.path is None:
            raise _Refused("the proxy runs the embedded default policy: there is no file to "
                           "add the rule to (run it with --policy FILE)", usage=True)
        duration = message.get("for") or request.duration
        now = datetime.now(UTC).replace(microsecond=0)
        until = None
        if duration:
            try:
                until = rfc3339((now + parse_duration(str(duration))).timestamp())
            except ValueError as e:
                raise _Refused(f"--for: {e}", usage=True) from None
        host = normalize_host(request.host)
        internal = await self._internal_addresses(request.account, host, request.port)
        dangers = _dangers(host, internal)
        if dangers and not message.get("allow_dangerous"):
            raise _Refused(f"not approved: {'; '.join(dangers)}; approve it with "
                           "--allow-dangerous if that is intended")
        comment = (f"approved by {caller.user} at {rfc3339(now.timestamp())} (request "
                   f"{request.id}): {request.reason or 'no reason given'}")
        ports = [request.port] if request.port is not None else None
        rules = [_rule(host, ports, until, comment)]
        rules += [_rule(address, ports, until, comment) for address in internal
                  if address != host]
        file = policies.path
        try:
            text = await asyncio.to_thread(with_allow_rules, file, request.account, rules)
        except PolicyError as e:
            raise _Refused(f"not approved: the policy would not be valid: {e}") from None
        refused = _still_refused(Policy(parse_policy(text.encode(), str(file))),
                                 request.account, host, request.port)
        if refused:
            raise _Refused(f"not approved: {request.account} would still be refused: {refused}")
        try:
            await asyncio.to_thread(replace_policy, file, text)
        except OSError as e:
            raise _Refused(f"not approved: cannot write {file}: {e.strerror or e} (the proxy "
                           "writes approvals into its policy file; see deploy/README.md)") from None
        if not await policies.reload_off_loop():
            raise _Refused(f"the rule is in {file}, but the proxy refused to load the file (see "
                           "its log); the request stays open")
        answer = " ".join(r.flow() for r in rules) + f" added to {file}"
        self.approvals.settle(request, State.APPROVED, caller.user, answer)
        log.info("access request %s approved by %s: %s", request.id, caller.user, answer)
        return {"request": request.to_json(), "until": until, "file": str(file)}

    async def _internal_addresses(self, account: str, host: Name | Address,
                                  port: int | None) -> list[Address]:
        """The internal addresses the name resolves to (or the address itself) that the
        account may not reach now: what `learn` flags rather than proposes."""
        if isinstance(host, Name):
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT):
                    addresses = await self.gate.runtime.resolver.addresses(host.text)
            except Exception:  # noqa: BLE001 - a name that does not resolve opens nothing
                addresses = []
        else:
            addresses = [host]
        policy = self.gate.policy
        ports = [port] if port is not None else list(_DEFAULT_PORTS)
        return [address for address in dict.fromkeys(addresses)
                if internal_kind(address) is not None and not all(
                    policy.decide_address(account, host_text(host), address, at).passes
                    for at in ports)]


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True


def _error(message: str, usage: bool = False) -> dict[str, Any]:
    return {"ok": False, "error": message, "usage": usage}


def _number(value: object, default: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


def _target(value: object) -> tuple[Name | Address, int | None, str | None]:
    if not isinstance(value, str) or not value or len(value) > 2000:
        raise _Refused("expected a TARGET: a URL or host[:port]", usage=True)
    try:
        target = parse_target(value)
        host = normalize_host(target.host)
    except (ValueError, HostError) as e:
        raise _Refused(one_line(str(e)), usage=True) from None
    path = target.path.split("?", 1)[0] if target.path else None
    return host, target.port if target.port_given else None, None if path == "/" else path


def _destination(host: Name | Address, port: int | None) -> str:
    text = host_text(host)
    text = f"[{text}]" if ":" in text else text
    return f"{text}:{port}" if port is not None else text


def _rule(host: Name | Address, ports: list[int] | None, until: str | None,
          comment: str) -> NewRule:
    if isinstance(host, Name):
        return NewRule(host=host.text, ports=ports, expires=until, comment=comment)
    return NewRule(cidr=f"{host}/{host.max_prefixlen}", ports=ports, expires=until,
                   comment=comment)


def _dangers(host: Name | Address, internal: list[Address]) -> list[str]:
    """What `learn` would flag rather than propose."""
    out = []
    if not isinstance(host, Name):
        out.append(f"{host} is an address, not a name: the rule would be a cidr rule")
    elif looks_encoded(host.text):
        out.append(f"{host.text} looks like encoded data (high-entropy label)")
    for address in internal:
        if address != host:
            out.append(f"{host_text(host)} resolves to {address}, which is "
                       f"{internal_kind(address)}: the approval would add a cidr rule for it")
    return out


def _still_refused(policy: Policy, account: str, host: Name | Address,
                   port: int | None) -> str | None:
    for at in [port] if port is not None else _DEFAULT_PORTS:
        decision = policy.decide(Query(account, host_text(host), at, Stage.CONNECT))
        if decision.result is Result.DENY:
            return f"{_destination(host, at)}: {decision.reason}"
    return None



@dataclass
class Control:
    """The control socket and what it serves, as the runner starts and stops them."""

    server: ControlServer
    notifier: Notifier | None

    async def stop(self) -> None:
        self.server.gate.approvals = None
        await self.server.stop()
        if self.notifier is not None:
            await self.notifier.stop()


async def open_control(gate: Gate, path: Path, operators: str | None, notify: str | None,
                        lifetime: float) -> Control:
    """Access requests for `gate` (ask mode, `why`), served on `path`. Raises ControlError."""
    notifier = Notifier(notify) if notify else None
    approvals = Approvals(lifetime, on_open=notifier.announce if notifier else None)
    server = ControlServer(path, gate, approvals, operators)
    await server.start()
    if notifier is not None:
        notifier.start()
    gate.approvals = approvals
    gate.runtime.metrics.watch_requests(approvals.counts)
    return Control(server, notifier)
