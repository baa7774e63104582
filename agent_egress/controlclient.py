"""The commands that talk to a running proxy over its control socket (control.py): `why` and
`request` for a governed account, `pending`, `approve` and `reject` for an operator.

Each sends one JSON line and prints the answer. Exit 0 when done, 1 when the proxy refuses
(not an operator, one's own account, a rule that would still refuse), 2 for bad input or no
proxy to ask (unknown or closed request id, a target that is not a URL or host, no socket).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from .loginenv import default_control_path
from .policyedit import parse_duration
from .rules import HostError, normalize_host
from .target import parse_target
from .terminal import printable

EXIT_REFUSED = 1
EXIT_USAGE = 2
ANSWER_TIMEOUT = 60.0  # an approval writes the policy and waits for the reload
MAX_ANSWER = 8 * 1024 * 1024
ENVIRONMENT = "AGENT_EGRESS_CONTROL"


def add_commands(commands: Any) -> None:
    """The client commands, on `agent-egress`'s subparsers."""
    why = commands.add_parser(
        "why", help="your recent denials, and how to ask for access",
        description="Run by a governed account: its recent denials from the running proxy "
                    "(time, destination, reason, rule, what would allow it) and the "
                    "`agent-egress request` command that asks an operator for each.")
    why.add_argument("--since", metavar="DURATION", default="1h",
                     help="how far back (default %(default)s; the proxy keeps 24h)")
    why.add_argument("--json", action="store_true", help="print a JSON array")
    _control_flag(why)
    why.set_defaults(command=_why)

    request = commands.add_parser(
        "request", help="ask an operator for access to a destination",
        description="Run by a governed account: asks an operator for access to TARGET (a URL "
                    "or host[:port]; a bare host is ports 80 and 443), opening an access "
                    "request or joining the open one for the same destination, with the "
                    "denied attempts behind it. Prints the request's id first. Grants "
                    "nothing by itself.")
    request.add_argument("target", metavar="TARGET", help="a URL or host[:port]")
    request.add_argument("--reason", metavar="TEXT", default="",
                         help="why the access is needed, for the operator")
    request.add_argument("--for", metavar="DURATION", dest="duration",
                         help="how long the access is needed (e.g. 2h); the operator decides")
    _control_flag(request)
    request.set_defaults(command=_request)

    pending = commands.add_parser(
        "pending", help="operator: open access requests",
        description="Operator (root or --operators group): the open access requests, each "
                    "with account, destination, reason and the denied attempts behind it.")
    pending.add_argument("--json", action="store_true", help="print a JSON array")
    _control_flag(pending)
    pending.set_defaults(command=_pending)

    approve = commands.add_parser(
        "approve", help="operator: approve an access request",
        description="Operator: writes the allow rule for request ID into the policy file "
                    "(time-limited with --for, else for as long as the request asked, else "
                    "lasting), with a comment naming you, the time, the request and its "
                    "reason; the proxy reloads and the connections waiting for it proceed. "
                    "Refuses what `learn` would flag (an address, an internal address, "
                    "encoded-looking names) unless given --allow-dangerous.")
    approve.add_argument("id", metavar="ID", help="the request's id (`agent-egress pending`)")
    approve.add_argument("--for", metavar="DURATION", dest="duration",
                         help="the rule expires after this (e.g. 30m, 2h, 1d)")
    approve.add_argument("--allow-dangerous", action="store_true",
                         help="write the rule even where `learn` would flag it")
    _control_flag(approve)
    approve.set_defaults(command=_approve)

    reject = commands.add_parser(
        "reject", help="operator: reject an access request",
        description="Operator: closes request ID; connections waiting for it are denied with "
                    "the reason.")
    reject.add_argument("id", metavar="ID", help="the request's id (`agent-egress pending`)")
    reject.add_argument("--reason", metavar="TEXT", default="", help="why, for the requester")
    _control_flag(reject)
    reject.set_defaults(command=_reject)


def _control_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="PATH", type=Path,
                        help=f"the proxy's control socket (default ${ENVIRONMENT}, else "
                             "/run/agent-egress/control.sock as root, else under "
                             "$XDG_RUNTIME_DIR)")


def control_path(given: Path | None) -> Path:
    if given is not None:
        return given
    from_environment = os.environ.get(ENVIRONMENT)
    return Path(from_environment) if from_environment else default_control_path()


class _Failed(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def ask(path: Path, message: dict[str, Any]) -> dict[str, Any]:
    """The proxy's answer to `message`; raises _Failed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            received = bytearray()
            while not received.endswith(b"\n") and len(received) < MAX_ANSWER:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            raise _Failed(f"the proxy did not answer on {path} in time", EXIT_USAGE) from None
        except OSError as e:
            raise _Failed(f"cannot reach the proxy's control socket {path}: "
                          f"{e.strerror or e} (is `agent-egress run` running? set "
                          f"{ENVIRONMENT} or --control)", EXIT_USAGE) from None
    try:
        answer = json.loads(received)
    except ValueError:
        raise _Failed(f"no answer from the proxy on {path}", EXIT_USAGE) from None
    if not isinstance(answer, dict):
        raise _Failed(f"no answer from the proxy on {path}", EXIT_USAGE)
    if not answer.get("ok"):
        raise _Failed(str(answer.get("error") or "refused"),
                      EXIT_USAGE if answer.get("usage") else EXIT_REFUSED)
    return answer


def _run(args: argparse.Namespace, message: dict[str, Any]) -> dict[str, Any] | int:
    try:
        return ask(control_path(args.control), message)
    except _Failed as e:
        print(printable(f"agent-egress: {e}"), file=sys.stderr)
        return e.code


def _usage(message: str) -> int:
    print(printable(f"agent-egress: {message}"), file=sys.stderr)
    return EXIT_USAGE


def _duration(text: str | None) -> str | None:
    if text is not None:
        parse_duration(text)  # raises ValueError
    return text


def _why(args: argparse.Namespace) -> int:
    try:
        since = parse_duration(args.since).total_seconds()
    except ValueError as e:
        return _usage(f"--since: {e}")
    answer = _run(args, {"op": "why", "since": since})
    if isinstance(answer, int):
        return answer
    denials = answer.get("denials") or []
    if args.json:
        print(json.dumps(denials))
        return 0
    if answer.get("note"):
        print(printable(f"agent-egress: {answer['note']}"))
        return 0
    account = answer.get("account")
    if not denials:
        print(printable(f"agent-egress: no denials of account {account} in the last "
                        f"{args.since}"))
        return 0
    print(printable(f"agent-egress: {len(denials)} destination(s) denied to account {account} "
                    f"in the last {args.since}, oldest first"))
    for d in denials:
        where = d["host"] if d.get("port") is None else f"{d['host']}:{d['port']}"
        what = d["event"] + (f" {d['method']} {d['path']}" if d.get("method") else "")
        times = f"{d['count']} times, last" if d.get("count", 1) > 1 else "at"
        by = f" by {d['exe']}" if d.get("exe") else ""
        print(printable(f"{where}  {times} {d['ts']} ({what}{by})"))
        print(printable(f"  reason   {d['reason']}"))
        print(printable(f"  rule     {d.get('rule') or 'no rule matched'}"))
        if d.get("hint"):
            print(printable(f"  allow    {d['hint']}"))
        if d.get("pending"):
            print(printable(f"  pending  access request {d['pending']} is open; retry once an "
                            "operator approves it"))
        elif d.get("request"):
            print(printable(f"  ask      {d['request']}"))
        else:
            print("  ask      an access request cannot change this (a deny rule or an "
                  "address check); ask the policy's owner")
    return 0


def _request(args: argparse.Namespace) -> int:
    try:
        target = parse_target(args.target)
        normalize_host(target.host)
    except (ValueError, HostError) as e:
        return _usage(f"{e}")
    try:
        duration = _duration(args.duration)
    except ValueError as e:
        return _usage(f"--for: {e}")
    answer = _run(args, {"op": "request", "target": args.target, "reason": args.reason,
                         "for": duration})
    if isinstance(answer, int):
        return answer
    if answer.get("allowed"):
        print(printable(f"agent-egress: {answer['message']}; nothing to request"))
        return 0
    request = answer["request"]
    verb = "opened" if answer.get("new") else "joined"
    attempts = len(request.get("attempts") or [])
    print(printable(f"{request['id']} {verb}: access request of account {request['account']} "
                    f"for {_where(request)}, with {attempts} denied attempt(s) as evidence; "
                    "an operator answers it (`agent-egress pending`)"))
    print("retry once it is approved; `agent-egress why` shows whether it is still pending")
    return 0


def _pending(args: argparse.Namespace) -> int:
    answer = _run(args, {"op": "pending"})
    if isinstance(answer, int):
        return answer
    requests = answer.get("requests") or []
    if args.json:
        print(json.dumps(requests))
        return 0
    if not requests:
        print("agent-egress: no open access requests")
        return 0
    for r in requests:
        held = f", {r['held']} connection(s) waiting" if r.get("held") else ""
        asked = f", for {r['for']}" if r.get("for") else ""
        print(printable(f"{r['id']}  account {r['account']}  {_where(r)}  opened {r['opened']}"
                        f"{asked}{held}"))
        print(printable(f"  reason    {r['reason'] or '(none given)'}"))
        for attempt in r.get("attempts") or []:
            what = attempt["event"] + (f" {attempt['method']} {attempt['path']}"
                                       if attempt.get("method") else "")
            by = f" by {attempt['exe']}" if attempt.get("exe") else ""
            print(printable(f"  attempt   {attempt['ts']} {what}{by}: {attempt['reason']}"))
        print(printable(f"  approve   agent-egress approve {r['id']} [--for 2h]   or   "
                        f"agent-egress reject {r['id']} --reason TEXT"))
    return 0


def _approve(args: argparse.Namespace) -> int:
    try:
        duration = _duration(args.duration)
    except ValueError as e:
        return _usage(f"--for: {e}")
    answer = _run(args, {"op": "approve", "id": args.id, "for": duration,
                         "allow_dangerous": args.allow_dangerous})
    if isinstance(answer, int):
        return answer
    request = answer["request"]
    until = f"until {answer['until']}" if answer.get("until") else "with no end (a lasting rule)"
    print(printable(f"{request['id']} approved: account {request['account']} may reach "
                    f"{_where(request)} {until}; {request['answer']}"))
    return 0


def _reject(args: argparse.Namespace) -> int:
    answer = _run(args, {"op": "reject", "id": args.id, "reason": args.reason})
    if isinstance(answer, int):
        return answer
    request = answer["request"]
    print(printable(f"{request['id']} rejected: account {request['account']}, {_where(request)}"))
    return 0


def _where(request: dict[str, Any]) -> str:
    host = str(request["host"])
    host = f"[{host}]" if ":" in host else host
    where = f"{host}:{request['port']}" if request.get("port") is not None \
        else f"{host} (ports 80 and 443)"
    return where + (f" {request['path']}" if request.get("path") else "")
