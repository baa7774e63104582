"""The `agent-egress` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from . import __version__
from .loginenv import SHELLS
from .rules import (
    Address,
    Decision,
    HostError,
    Name,
    Policy,
    PolicyError,
    Query,
    Result,
    Stage,
    host_text,
    load_policy,
    normalize_host,
    parse_policy,
)
from .target import Target, parse_target
from .terminal import counted, printable

EXIT_DENIED = 1
EXIT_USAGE = 2
DEFAULT_PROXY_PORT = 8080
DEFAULT_DNS_PORT = 5353
DEFAULT_METRICS_PORT = 9464
DEFAULT_TRANSPARENT_PORT = 8081
DEFAULT_PORTS = (80, 443)  # what a rule without ports allows
RESOLVE_SECONDS = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.command(args))
    except PolicyError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-egress",
        description="Egress control for AI coding agents: per-account allowlists for a proxy "
                    "and a resolver.")
    parser.add_argument("--version", action="version", version=f"agent-egress {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate", help="check a policy file", description="Checks a policy file. Exit 0 when "
        "it is valid (warnings go to stderr), 2 with FILE:LINE:COL: message per problem.")
    validate.add_argument("file", metavar="F", help="the policy file")
    validate.set_defaults(command=_validate)

    check = commands.add_parser(
        "check", help="show what the policy decides for a destination",
        description="Prints the decision, rule and reason for TARGET (a URL or host[:port]). "
                    "Exit 0 if the traffic would pass (allow, would_deny), 1 if denied.")
    check.add_argument("--policy", required=True, metavar="F", help="the policy file")
    check.add_argument("--account", required=True, metavar="A",
                       help="the account whose traffic it would be")
    check.add_argument("--method", metavar="M", help="HTTP method (default GET for URLs)")
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.add_argument("--upstream-dns", metavar="ADDR", action="append", default=[],
                       help="also resolve the name with this DNS server, as the proxy would, "
                            "and check its addresses (internal ones need a cidr rule); "
                            "repeatable")
    check.add_argument("target", metavar="TARGET",
                       help="a URL (scheme://host[:port]/path) or host[:port]")
    check.set_defaults(command=_check)

    run = commands.add_parser(
        "run", help="run the proxy",
        description="Runs the proxy with the policy (or, without --policy, an embedded default: "
                    "learning mode for local clients, source control allowed) until SIGTERM or "
                    "SIGINT. SIGHUP or a change to the file reloads the policy; SIGUSR1 reopens "
                    "the audit log.")
    run.add_argument("--policy", metavar="F", type=Path,
                     help="the policy file (default: the embedded default, which "
                          "`agent-egress init` writes out)")
    run.add_argument("--proxy", metavar="ADDR", default=f"127.0.0.1:{DEFAULT_PROXY_PORT}",
                     help="explicit proxy listener, or 'off' (default %(default)s)")
    run.add_argument("--transparent", metavar="ADDR",
                     help="transparent listener for traffic nftables redirects to it (see "
                          "`agent-egress nftables`; default: off)")
    run.add_argument("--dns", metavar="ADDR", default=f"127.0.0.1:{DEFAULT_DNS_PORT}",
                     help="DNS resolver listener (UDP and TCP), or 'off' (default %(default)s)")
    run.add_argument("--metrics", metavar="ADDR", default=f"127.0.0.1:{DEFAULT_METRICS_PORT}",
                     help="Prometheus endpoint (/metrics), or 'off' (default %(default)s)")
    run.add_argument("--audit-log", metavar="F",
                     help="JSON-lines audit log; '-' for standard output (default "
                          "STATE_DIR/audit.jsonl)")
    run.add_argument("--audit-format", choices=("jsonl", "ocsf"), default="jsonl",
                     help="audit lines as agent-egress JSON lines (default) or OCSF 1.x events "
                          "(HTTP, Network and DNS Activity); learn, replay and report read both")
    run.add_argument("--on-audit-failure", choices=("deny", "allow"), default="deny",
                     help="when the audit log cannot be written: deny all traffic until it "
                          "can (default), or allow it unrecorded")
    run.add_argument("--upstream-dns", metavar="ADDR", action="append", default=[],
                     help="DNS server the proxy resolves destinations with, ADDR[:PORT]; "
                          "repeat for failover (default: the system's resolver)")
    run.add_argument("--proxy-auth", metavar="HTPASSWD", type=Path,
                     help="require proxy authentication against this htpasswd file (bcrypt); "
                          "needed for a non-loopback listener")
    run.add_argument("--state-dir", metavar="D", type=Path, default=_default_state_dir(),
                     help="CA and other state, kept owner-only (default %(default)s)")
    run.add_argument("--upstream-ca", metavar="PEM", type=Path,
                     help="trust these CA certificates (instead of the default bundle) when "
                          "inspected HTTPS connects upstream")
    run.add_argument("--workers", metavar="N", type=_workers, default=1,
                     help="processes accepting on the explicit proxy listener, or 'auto' for "
                          "one per CPU (default 1); the resolver, metrics and the transparent "
                          "listener stay in the first")
    run.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                     help="the event loop: uvloop where installed (auto, the default), or "
                          "asyncio's own")
    run.add_argument("--control", metavar="PATH",
                     help="the control socket for why/request/pending/approve/reject, or 'off' "
                          "(default /run/agent-egress/control.sock as root, else under "
                          "$XDG_RUNTIME_DIR)")
    run.add_argument("--operators", metavar="GROUP",
                     help="members of this group (primary or supplementary) may use pending, "
                          "approve and reject, besides root")
    run.add_argument("--notify", metavar="URL",
                     help="POST a JSON document to URL for every new access request")
    run.add_argument("--request-lifetime", metavar="DURATION", default="24h",
                     help="an access request nobody answers expires after this (default "
                          "%(default)s)")
    run.set_defaults(command=_run)

    learn = commands.add_parser(
        "learn", help="propose allow rules from audit logs",
        description="Proposes allow rules, per account, from deny and would_deny events in "
                    "audit logs ('-' is standard input), with the evidence for each; flags "
                    "rather than proposes what looks dangerous. --apply adds the proposals to "
                    "the policy file, keeping its comments and order.")
    learn.add_argument("--policy", required=True, metavar="F", type=Path,
                       help="the policy in force (and, with --apply, the file to edit)")
    learn.add_argument("--account", metavar="A", help="only this account (default: all)")
    learn.add_argument("--apply", action="store_true", help="add the proposals to F")
    learn.add_argument("--stale", metavar="DURATION",
                       help="also list allow rules nothing used in the last DURATION of the "
                            "logs (e.g. 30d)")
    learn.add_argument("logs", nargs="+", metavar="LOG",
                       help="audit logs: plain, gzipped, or '-' for standard input")
    learn.set_defaults(command=_learn)

    replay = commands.add_parser(
        "replay", help="evaluate recorded traffic against a candidate policy",
        description="Evaluates the events in audit logs against a candidate policy and prints, "
                    "per account, what would newly be denied or allowed. Exit 1 if anything "
                    "would newly be denied.")
    replay.add_argument("--policy", required=True, metavar="F", type=Path,
                        help="the candidate policy")
    replay.add_argument("logs", nargs="+", metavar="LOG",
                        help="audit logs: plain, gzipped, or '-' for standard input")
    replay.set_defaults(command=_replay)

    grant = commands.add_parser(
        "grant", help="add a time-limited allow rule",
        description="Adds an allow rule for TARGET (a URL or host[:port]; a bare host gets "
                    "ports 80 and 443, as a rule without ports) that expires after DURATION "
                    "(e.g. 30m, 2h, 1d). A running agent-egress picks it up at once. Exit 1, "
                    "writing nothing, when the access would still be refused (a deny rule "
                    "wins, or the name resolves to an internal address without a cidr rule), "
                    "decided as `check` decides.")
    grant.add_argument("--policy", required=True, metavar="F", type=Path,
                       help="the policy file to add the rule to")
    grant.add_argument("--account", required=True, metavar="A",
                       help="the account the rule is for")
    grant.add_argument("--for", required=True, metavar="DURATION", dest="duration",
                       help="how long the rule lasts, more than zero: 30m, 2h, 1d12h")
    grant.add_argument("--upstream-dns", metavar="ADDR", action="append", default=[],
                       help="the DNS server the proxy resolves with (default: the system's "
                            "resolver); repeatable")
    grant.add_argument("target", metavar="TARGET",
                       help="a URL (scheme://host[:port]/...) or host[:port]")
    grant.set_defaults(command=_grant)

    report = commands.add_parser(
        "report", help="destinations per account from audit logs, denials first",
        description="Summarises audit logs (plain, gzipped, or '-' for standard input): for "
                    "each account, every destination with its counts by decision, first and "
                    "last seen, and the processes that reached it. Unreadable lines are "
                    "reported with their line number and skipped. Logs may be JSON lines or "
                    "OCSF; --format ocsf converts the events themselves to OCSF lines.")
    report.add_argument("--format", choices=("table", "json", "csv", "ocsf"), default="table",
                        help="output format (default %(default)s); 'ocsf': every event as an "
                             "OCSF 1.x JSON line instead of a summary")
    report.add_argument("logs", nargs="+", metavar="LOG",
                        help="audit logs: plain, gzipped, or '-' for standard input")
    report.set_defaults(command=_report)

    discover = commands.add_parser(
        "discover", help="print registry presets found in this user's toolchain configuration",
        description="Reads the package-registry and source-control endpoints this user's "
                    "toolchains are configured to use (pip, npm, apt, cargo, go, maven, gem, "
                    "docker, git remotes) and prints them as policy presets, each host with "
                    "the file or command it came from.")
    discover.add_argument("--home", metavar="D", type=Path, default=Path.home(),
                          help="the home directory to read (default: yours)")
    discover.add_argument("--root", metavar="D", type=Path, default=Path("/"),
                          help="the system root for /etc (default /)")
    discover.add_argument("--repos", metavar="DIR", type=Path, action="append", default=[],
                          help="read the git remotes of the repositories under DIR (repeatable)")
    discover.set_defaults(command=_discover)

    nftables = commands.add_parser(
        "nftables", help="print the nftables ruleset that sends accounts through the proxy",
        description="Prints an nftables ruleset (apply with `nft -f`) that, for each account's "
                    "uids, redirects TCP to the transparent listener and DNS to the resolver, "
                    "allows loopback only where cidr rules say, and rejects all other egress.")
    nftables.add_argument("--policy", required=True, metavar="F", type=Path,
                          help="the policy whose accounts' traffic is redirected")
    nftables.add_argument("--account", metavar="A", help="only this account")
    nftables.add_argument("--transparent", metavar="ADDR",
                          default=f"127.0.0.1:{DEFAULT_TRANSPARENT_PORT}",
                          help="the proxy's transparent listener (default %(default)s)")
    nftables.add_argument("--proxy", metavar="ADDR", default=f"127.0.0.1:{DEFAULT_PROXY_PORT}",
                          help="the explicit listener, which stays reachable (default "
                               "%(default)s)")
    nftables.add_argument("--dns", metavar="ADDR", default=f"127.0.0.1:{DEFAULT_DNS_PORT}",
                          help="the resolver (default %(default)s)")
    nftables.add_argument("--proxy-user", metavar="USER", default=None,
                          help="the user agent-egress runs as, never redirected (default: "
                               "the user running this command)")
    nftables.set_defaults(command=_nftables)

    ca = commands.add_parser(
        "ca", help="print the path of the CA certificate for inspected HTTPS",
        description="Prints the path of the CA certificate that clients must trust for HTTPS "
                    "that a rule inspects (methods, paths, access: read-only), creating it if "
                    "needed.")
    ca.add_argument("--state-dir", metavar="D", type=Path, default=_default_state_dir(),
                    help="the state directory `run` uses (default %(default)s)")
    ca.set_defaults(command=_ca)

    env = commands.add_parser(
        "env", help="print the environment a governed account's login needs",
        description="Prints the environment a governed account's login needs: the proxy "
                    "variables in both cases, no_proxy/NO_PROXY for loopback, the CA bundle "
                    "variables of curl, git, pip, requests, Node, npm, cargo, Go and others "
                    "(for HTTPS a rule inspects), and AGENT_EGRESS_CONTROL. Writes the bundle "
                    "(the system's CAs and the proxy's) where every account can read it. For "
                    "/etc/profile.d (sh), fish, or systemd's EnvironmentFile= (systemd).")
    env.add_argument("--account", metavar="A",
                     help="the account it is for; with --policy, it must be one of its accounts")
    env.add_argument("--policy", metavar="F", type=Path,
                     help="the policy the proxy runs, to check --account against")
    env.add_argument("--shell", choices=SHELLS, default="sh",
                     help="output syntax: sh (export lines), fish (set -gx) or systemd "
                          "(NAME=value lines; default %(default)s)")
    env.add_argument("--proxy", metavar="ADDR", default=f"127.0.0.1:{DEFAULT_PROXY_PORT}",
                     help="the proxy's explicit listener (default %(default)s)")
    env.add_argument("--state-dir", metavar="D", type=Path, default=_default_state_dir(),
                     help="the state directory `run` uses, where its CA is (default "
                          "%(default)s)")
    env.add_argument("--ca-bundle", metavar="FILE", type=Path,
                     help="where to write the CA bundle (default STATE_DIR/ca-bundle.pem)")
    env.add_argument("--control", metavar="PATH", type=Path,
                     help="the control socket `run` listens on (default "
                          "/run/agent-egress/control.sock as root, else under "
                          "$XDG_RUNTIME_DIR)")
    env.set_defaults(command=_env)

    init = commands.add_parser(
        "init", help="write the embedded default policy as a starter file",
        description="Writes the embedded default policy (learning mode for every local "
                    "client, source control allowed), with comments, as a starter file to "
                    "edit: to FILE, never over an existing one, or to standard output.")
    init.add_argument("file", metavar="FILE", nargs="?", type=Path,
                      help="the file to create (default: standard output)")
    init.set_defaults(command=_init)

    from .controlclient import add_commands
    add_commands(commands)  # why, request, pending, approve, reject
    return parser


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "agent-egress"


def _workers(text: str) -> int:
    if text == "auto":
        return len(os.sched_getaffinity(0))
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 to 64, or 'auto'")
    return int(text)


def _run(args: argparse.Namespace) -> int:
    from .runner import (
        RunConfig,
        StartupError,
        event_loop,
        parse_listen,
        run_loop,
        serve,
        with_control,
    )

    logging.basicConfig(level=logging.INFO, format="agent-egress: %(levelname)s %(name)s: "
                                                   "%(message)s")
    # mitmproxy narrates every connection at INFO; the audit log is the record of those.
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    try:
        audit_log = None if args.audit_log == "-" else Path(
            args.audit_log or args.state_dir / "audit.jsonl")
        config = RunConfig(
            policy=args.policy,
            proxy=None if args.proxy == "off" else parse_listen(args.proxy, DEFAULT_PROXY_PORT),
            transparent=parse_listen(args.transparent, DEFAULT_TRANSPARENT_PORT)
            if args.transparent else None,
            dns=None if args.dns == "off" else parse_listen(args.dns, DEFAULT_DNS_PORT),
            metrics=None if args.metrics == "off" else parse_listen(args.metrics,
                                                                   DEFAULT_METRICS_PORT),
            audit_log=audit_log, upstream_dns=tuple(args.upstream_dns),
            proxy_auth=args.proxy_auth, state_dir=args.state_dir, upstream_ca=args.upstream_ca,
            on_audit_failure=args.on_audit_failure, workers=args.workers,
            audit_format=args.audit_format, loop=event_loop(args.loop))
        config = with_control(config, args)
        return run_loop(serve(config), config.loop)
    except StartupError as e:
        print(f"agent-egress: {e}", file=sys.stderr)
        return EXIT_USAGE


def _learn(args: argparse.Namespace) -> int:
    from .auditread import read_events
    from .learn import learn, stale_rules
    from .policyedit import add_allow_rules, parse_duration

    policy = Policy.load(args.policy)
    if args.account and args.account not in policy.accounts():
        print(f"agent-egress: no account {args.account!r} in {args.policy}", file=sys.stderr)
        return EXIT_USAGE
    try:
        window = parse_duration(args.stale) if args.stale else None
    except ValueError as e:
        print(f"agent-egress: --stale: {e}", file=sys.stderr)
        return EXIT_USAGE
    learned = learn(policy, read_events(args.logs), args.account, window)
    accounts = sorted(set(learned.proposals) | set(learned.flags))
    if not accounts:
        print(f"# nothing to propose ({counted(learned.events, 'event')} read)")
    for account in accounts:
        proposals = learned.proposals.get(account, [])
        print(printable(f"# account {account}: {counted(len(proposals), 'proposal')} from "
                        f"{counted(learned.events, 'event')}"))
        for proposal in proposals:
            covers = f"; covers {', '.join(proposal.covers)}" if len(proposal.covers) > 1 \
                or proposal.rule.preset else ""
            print(printable(f"- {proposal.rule.flow()}  # {proposal.evidence.describe()}"
                            f"{covers}"))
        for flag in learned.flags.get(account, []):
            print(printable(f"# flagged, not proposed: {flag.destination}: {flag.why} "
                            f"({flag.evidence.describe()})"))
    if window is not None:
        for account, rule, rule_id, description in stale_rules(policy, learned.used_rules,
                                                               args.account):
            print(printable(f"# stale: account {account}: rule {rule} [{rule_id}] "
                            f"({description}) was not used in the last {args.stale}"))
    if args.apply:
        for account, proposals in learned.proposals.items():
            if proposals:
                add_allow_rules(args.policy, account, [
                    replace(p.rule, comment=f"learned: {p.evidence.describe()}")
                    for p in proposals])
        applied = sum(len(p) for p in learned.proposals.values())
        print(f"# applied {counted(applied, 'rule')} to {args.policy}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from .auditread import read_events
    from .replay import replay

    replayed = replay(Policy.load(args.policy), read_events(args.logs))
    account = None
    for change in replayed.changes:
        if change.account != account:
            account = change.account
            print(printable(f"account {account}"))
        print(printable(f"  newly {change.newly + ':':9} {change.destination} "
                        f"({counted(change.events, 'event')}): {change.reason}"))
    denied = replayed.newly_denied
    allowed = sum(c.events for c in replayed.changes) - denied
    print(f"{denied} events would newly be denied and {allowed} newly allowed, of "
          f"{replayed.events} ({replayed.not_replayed} decided by address, TLS or "
          "authentication checks were not replayed)")
    return EXIT_DENIED if denied else 0


def _grant(args: argparse.Namespace) -> int:
    from .policyedit import NewRule, parse_duration, replace_policy, with_allow_rules

    try:
        duration = parse_duration(args.duration)
    except ValueError as e:
        print(f"agent-egress: --for: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        target = parse_target(args.target)
        host = normalize_host(target.host)
    except (ValueError, HostError) as e:
        print(f"agent-egress: {printable(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    policy = Policy.load(args.policy)
    if args.account not in policy.accounts():
        print(f"agent-egress: no account {args.account!r} in {args.policy}", file=sys.stderr)
        return EXIT_USAGE
    resolver = _resolver(args.upstream_dns)
    if resolver is None:
        return EXIT_USAGE
    now = datetime.now(UTC).replace(microsecond=0)
    until = (now + duration).isoformat().replace("+00:00", "Z")
    comment = f"granted {now.isoformat().replace('+00:00', 'Z')} for {args.duration}"
    # A bare host is granted what a rule without ports allows: 80 and 443.
    ports = [target.port] if target.port_given else None
    if isinstance(host, Name):
        rule = NewRule(host=host.text, ports=ports, expires=until, comment=comment)
    else:
        rule = NewRule(cidr=f"{host}/{host.max_prefixlen}", ports=ports, expires=until,
                       comment=comment)
    text = with_allow_rules(args.policy, args.account, [rule])
    granted = Policy(parse_policy(text.encode(), str(args.policy)))
    # The grant must make a difference: decided as `check` decides, on the policy with it.
    for port in ports or sorted(DEFAULT_PORTS):
        at_port = replace(target, port=port)
        decision, _stage = decide_target(granted, args.account, at_port, None, resolver)
        if decision.result is Result.DENY:
            print(printable(f"agent-egress: not granted: {args.account} would still be refused "
                            f"{host_text(host)}:{port}: {decision.reason}"
                            + (f" (rule {decision.rule})" if decision.rule else "")),
                  file=sys.stderr)
            if decision.hint:
                print(printable(f"agent-egress: {decision.hint}"), file=sys.stderr)
            return EXIT_DENIED
    replace_policy(args.policy, text)
    where = f"{host_text(host)}:{target.port}" if ports else \
        f"{host_text(host)} on ports {', '.join(str(p) for p in sorted(DEFAULT_PORTS))}"
    print(printable(f"agent-egress: account {args.account} may reach {where} until {until} "
                    f"(rule added to {args.policy})"))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import report

    for path in args.logs:
        if path == "-":
            continue
        try:
            open(path, "rb").close()
        except OSError as e:
            print(f"agent-egress: {printable(path)}: cannot read: {e.strerror or e}",
                  file=sys.stderr)
            return EXIT_USAGE
    return report(args.logs, args.format)


def _discover(args: argparse.Namespace) -> int:
    from .discover import discover

    print(discover(home=args.home, root=args.root, repos=args.repos, env=dict(os.environ)),
          end="")
    return 0


def _nftables(args: argparse.Namespace) -> int:
    import pwd

    from .nftables import Listeners, ruleset
    from .runner import StartupError, parse_listen

    policy = Policy.load(args.policy)
    if args.account and args.account not in policy.accounts():
        print(f"agent-egress: no account {args.account!r} in {args.policy}", file=sys.stderr)
        return EXIT_USAGE
    try:
        listeners = Listeners(
            transparent=parse_listen(args.transparent, DEFAULT_TRANSPARENT_PORT)[1],
            proxy=parse_listen(args.proxy, DEFAULT_PROXY_PORT)[1],
            dns=parse_listen(args.dns, DEFAULT_DNS_PORT)[1])
        proxy_uid = pwd.getpwnam(args.proxy_user).pw_uid if args.proxy_user else os.getuid()
    except (StartupError, KeyError) as e:
        print(f"agent-egress: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(ruleset(policy, listeners, proxy_uid, args.account), end="")
    return 0


def _ca(args: argparse.Namespace) -> int:
    from .runner import ca_certificate, prepare_state_dir

    prepare_state_dir(args.state_dir)
    print(ca_certificate(args.state_dir))
    return 0


def _env(args: argparse.Namespace) -> int:
    from .loginenv import (
        CA_BUNDLE_NAME,
        default_control_path,
        render,
        system_ca_file,
        variables,
        write_ca_bundle,
    )
    from .runner import StartupError, ca_certificate, parse_listen, prepare_state_dir

    if args.policy is not None and args.account is not None \
            and args.account not in Policy.load(args.policy).accounts():
        print(f"agent-egress: no account {args.account!r} in {args.policy}", file=sys.stderr)
        return EXIT_USAGE
    try:
        host, port = parse_listen(args.proxy, DEFAULT_PROXY_PORT)
    except StartupError as e:
        print(f"agent-egress: --proxy: {e}", file=sys.stderr)
        return EXIT_USAGE
    proxy_ca = ca_certificate(args.state_dir)
    if not proxy_ca.exists():
        prepare_state_dir(args.state_dir)
    bundle = args.ca_bundle or args.state_dir / CA_BUNDLE_NAME
    system_cas = system_ca_file()
    try:
        write_ca_bundle(proxy_ca, bundle, system_cas)
    except OSError as e:
        print(f"agent-egress: cannot write the CA bundle {bundle}: {e.strerror or e}",
              file=sys.stderr)
        return EXIT_USAGE
    if system_cas is None:
        print("agent-egress: warning: no system CA certificates found; the bundle holds only "
              "the proxy's CA, so HTTPS that is not inspected fails for clients that read it",
              file=sys.stderr)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    comments = [f"agent-egress environment{f' for account {args.account}' if args.account else ''}"
                f" (agent-egress env): proxy {url}",
                f"CA bundle {bundle}: {system_cas or 'no system CAs'} and the proxy's CA "
                f"{proxy_ca}"]
    print(render(variables(url, bundle, args.control or default_control_path()), args.shell,
                 comments), end="")
    return 0


def _init(args: argparse.Namespace) -> int:
    from importlib import resources

    text = resources.files(__package__).joinpath("default-policy.yaml").read_text()
    if args.file is None:
        print(text, end="")
        return 0
    try:
        with open(args.file, "x") as f:  # never over an existing file
            f.write(text)
    except FileExistsError:
        print(f"agent-egress: {args.file} exists; not overwriting it", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"agent-egress: cannot write {args.file}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"agent-egress: wrote the default policy to {args.file}; edit it, check it with "
          f"`agent-egress validate {args.file}`, run it with `agent-egress run --policy "
          f"{args.file}`", file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .credentials import load_secrets
    from .nftables import governed_accounts
    from .policylint import lint

    document = load_policy(args.file)
    governed = governed_accounts(Policy(document))
    governed.pop(os.getuid(), None)
    load_secrets(document, governed)  # as the proxy will: each one readable, and trusted
    for warning in (*document.warnings, *lint(document)):
        print(printable(str(warning)), file=sys.stderr)
    rules = sum(len(a.allow) + len(a.deny) for a in document.accounts.values())
    print(f"{args.file}: valid ({len(document.accounts)} accounts, {rules} rules, "
          f"policy {document.digest})")
    return 0


def _check(args: argparse.Namespace) -> int:
    policy = Policy.load(args.policy)
    if args.account not in policy.accounts():
        print(f"agent-egress: no account {args.account!r} in {args.policy}; expected one of "
              f"{', '.join(policy.accounts()) or '(none)'}", file=sys.stderr)
        return EXIT_USAGE
    try:
        target = parse_target(args.target)
        normalize_host(target.host)
    except (ValueError, HostError) as e:
        print(f"agent-egress: {printable(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    resolver = _resolver(args.upstream_dns) if args.upstream_dns else None
    if args.upstream_dns and resolver is None:
        return EXIT_USAGE
    method = args.method.upper() if args.method else None
    decision, stage = decide_target(policy, args.account, target, method, resolver)
    if args.json:
        print(json.dumps(_as_json(decision, stage, target.host, target.port, method,
                                  target.path)))
    else:
        _print_decision(decision, stage)
    return EXIT_DENIED if decision.result is Result.DENY else 0


Resolve = Callable[[str], list[Address]]


def decide_target(policy: Policy, account: str, target: Target, method: str | None,
                  resolve: Resolve | None) -> tuple[Decision, Stage]:
    """What the proxy decides for `target`: the connection, then the request where the proxy
    sees it, then (with `resolve`) every address the name resolves to, which must not be
    internal without a cidr rule. `check` and `grant` decide by it."""
    # Plain HTTP is decided request by request, as the proxy does (no CONNECT to decide on).
    plain_request = not target.tls and target.path is not None
    stage = Stage.REQUEST if plain_request else Stage.CONNECT
    decision = policy.decide(Query(account, target.host, target.port, stage,
                                   (method or "GET") if plain_request else None,
                                   target.path if plain_request else None))
    # A request is visible to the proxy for plain HTTP, and for HTTPS the rule inspects.
    sees_request = not target.tls or decision.inspect
    if stage is Stage.CONNECT and decision.passes and sees_request and (
            target.path is not None or method):
        stage = Stage.REQUEST
        decision = policy.decide(Query(account, target.host, target.port, stage,
                                       method or "GET", target.path or "/"))
    host = normalize_host(target.host)
    if decision.passes and resolve is not None:
        addresses = [host] if not isinstance(host, Name) else resolve(host.text)
        for address in addresses:
            by_address = policy.decide_address(account, host_text(host), address, target.port)
            if by_address.result is Result.DENY:
                return by_address, Stage.CONNECT
    return decision, stage


def _resolver(servers: list[str]) -> Resolve | None:
    """Resolves as the proxy does (--upstream-dns, else the system's resolver), at most
    RESOLVE_SECONDS; a name that does not resolve has no addresses to check. None (after
    saying why) for a server that is not an address."""
    from .upstream import DnsServers, ResolveError, SystemResolver, parse_server

    try:
        upstream: DnsServers | SystemResolver = (
            DnsServers([parse_server(s) for s in servers]) if servers else SystemResolver())
    except ValueError as e:
        print(f"agent-egress: --upstream-dns: {e}", file=sys.stderr)
        return None

    def resolve(name: str) -> list[Address]:
        async def bounded() -> list[Address]:
            async with asyncio.timeout(RESOLVE_SECONDS):
                return await upstream.addresses(name)
        try:
            return asyncio.run(bounded())
        except (ResolveError, TimeoutError):
            return []

    return resolve


def _as_json(decision: Decision, stage: Stage, host: str, port: int, method: str | None,
             path: str | None) -> dict[str, object]:
    return {
        "decision": decision.result.value, "rule": decision.rule, "rule_id": decision.rule_id,
        "reason": decision.reason,
        "account": decision.account, "mode": decision.mode.value, "stage": stage.value,
        "host": host, "port": port,
        "method": (method or "GET") if stage is Stage.REQUEST else None,
        "path": path.split("?", 1)[0] if stage is Stage.REQUEST and path else None,
        "inspect": decision.inspect, "hint": decision.hint,
    }


def _print_decision(decision: Decision, stage: Stage) -> None:
    print(f"decision  {decision.result.value}")
    print(f"rule      {decision.rule or 'no rule matched'}"
          + (f" (id {decision.rule_id})" if decision.rule_id else ""))
    print(f"reason    {printable(decision.reason)}")  # it quotes the path as given
    print(f"account   {printable(decision.account)} ({decision.mode.value}), checked at the "
          f"{stage.value} stage")
    if decision.inspect:
        print("note      TLS to this destination is inspected: clients must trust the proxy's "
              "CA (agent-egress ca)")
    if decision.hint:
        print(f"next      {printable(decision.hint)}")


if __name__ == "__main__":
    sys.exit(main())
