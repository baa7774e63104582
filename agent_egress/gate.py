"""The gate: every decision and every audit event pass through here.

One sequence, written once, for every path that lets traffic through — the mitmproxy hooks,
the fast path for allowed tunnels, transparent raw TCP and the resolver:

    identity -> account -> decision (timed for metrics) -> refusal while the audit log is
    failing -> room promised for its audit line before traffic flows -> one audit event

Checks that refine a decision (the SNI, the Host header, the pinned address) hand the gate a
reason; only the gate (and the pure engine in rules/) turns a reason into a denial, and only
the gate writes audit events. Nothing here knows mitmproxy or dnslib: the adapters in addons/
and dns/ translate their hooks and packets into these calls.

No traffic flows on a decision whose line the audit log could not take: where traffic starts
(a connection opened, a request about to be forwarded, a DNS query about to be answered or
forwarded) the gate has the audit log promise room for its line, reserved on disk ahead of the
file (agent_egress/auditspace.py), and refuses when there is none; the line hands the promise
back when it is written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .approvals import AccessRequest, Approvals, RequestError, State
from .auditevent import AuditEvent, timestamp
from .auditspace import LINE_PROMISE
from .checks import host_header_refusal, host_or_none, target_refusal
from .clients import Client, ClientIdentifier
from .connections import Exchange, Tunnel
from .livetunnels import LiveTunnels
from .pinning import pin
from .rules import (
    AccountChoice,
    Address,
    Decision,
    Host,
    Identity,
    Mode,
    Name,
    Policy,
    Query,
    Result,
    Stage,
    address_text,
    host_text,
)
from .rules.operations import operation
from .runtime import Runtime
from .upstream import ResolveError

log = logging.getLogger(__name__)

UNRECORDED = ("the audit log cannot be written (disk full?); denying until it can "
              "(--on-audit-failure=deny)")
ACCOUNT_MEMO = 4096
ATTRIBUTION_WAIT = 0.5  # seconds a denial or DNS answer waits for the client's process


RequestOutcome = tuple[Decision, Host, Address | None, bool]  # see Gate.request


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A request the gate has decided but could not finish without waiting (Gate.request_now):
    an operator to ask, or its name to resolve."""

    client: Client
    decision: Decision
    host: Host
    host_raw: str
    port: int
    method: str
    path: str
    identity: Identity
    tunnel: Tunnel | None  # the client's connection when the request came
    asked: bool = False  # ask mode's wait is behind it (or was not needed): only a name to
    # resolve is left


class Gate:
    approvals: Approvals | None = None  # access requests (ask mode, `why`); set by the runner

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.clients = ClientIdentifier(runtime.owners,
                                        lambda: runtime.policies.secrets.values)
        self._accounts: dict[Identity, AccountChoice] = {}
        self._accounts_policy: Policy | None = None
        self._held: list[tuple[AuditEvent, int]] | None = None
        # CONNECTs the fast path decided and then handed to mitmproxy, by client address
        self._handed_over: dict[tuple[str, int], tuple[str, int, Tunnel]] = {}
        self.live = LiveTunnels(self)  # allowed tunnels, decided again when rules change

    def close(self) -> None:
        self.clients.close()
        self.live.close()

    @property
    def policy(self) -> Policy:
        return self.runtime.policies.current

    # Who

    def client(self, peername: tuple[str, int], sockname: tuple[str, int],
               transparent: bool = False) -> Client:
        return self.clients.identify(peername, sockname, transparent)

    def account(self, policy: Policy, identity: Identity) -> AccountChoice:
        """The account of `identity` under `policy`, worked out once per policy."""
        if policy is not self._accounts_policy or len(self._accounts) >= ACCOUNT_MEMO:
            self._accounts.clear()
            self._accounts_policy = policy
        choice = self._accounts.get(identity)
        if choice is None:
            choice = self._accounts[identity] = policy.account_for(identity)
        return choice

    # Decisions

    def decide(self, policy: Policy, identity: Identity, host: str, port: int | None,
               stage: Stage, method: str | None = None, path: str | None = None) -> Decision:
        """The policy's decision for `identity` reaching `host`, refused while the audit log
        fails."""
        choice = self.account(policy, identity)
        if choice.account is None:
            return Decision(Result.DENY, None, choice.reason, "", Mode.ENFORCE)
        metrics = self.runtime.metrics
        started = time.perf_counter()
        decision = policy.decide(Query(choice.account, host, port, stage, method, path))
        metrics.decision_seconds.observe(time.perf_counter() - started)
        return self._recordable(decision)

    def refuse(self, decision: Decision, reason: str, rule: str | None = None) -> Decision:
        """A denial for the same account and mode as `decision`, for `reason`."""
        return Decision(Result.DENY, rule, reason, decision.account, decision.mode,
                        rule_id=decision.rule_id if rule is not None and rule == decision.rule
                        else None)

    # Credentials: the header a rule injects, and the tripwire on every visible request

    def credential_header(self, decision: Decision) -> tuple[str, str] | Decision:
        """The header to set on a request `decision` allows with a credential (counted as
        injected), or the denial when the proxy holds no such secret."""
        name = decision.credential
        header = self.runtime.policies.secrets.header(name) if name else None
        if header is None:
            return self.refuse(decision, f"credential {name} is not loaded")
        self.runtime.metrics.credentials_injected.labels(decision.account, name).inc()
        return header

    def carried(self, decision: Decision, parts: Iterable[bytes]) -> Decision:
        """`decision`, or a denial naming the credential when one of `parts` (of a request as
        the client sent it: URL, headers, start of the body) carries a credential's value."""
        secrets = self.runtime.policies.secrets
        name = secrets.carried(parts) if secrets and decision.account else None
        if name is None:
            return decision
        self.runtime.metrics.credential_leaks.labels(decision.account, name).inc()
        return Decision(Result.DENY, None, f"carries credential {name}", decision.account,
                        decision.mode, credential=name)

    def refuse_client(self, reason: str) -> Decision:
        """A denial before any account is known (proxy authentication failed)."""
        return Decision(Result.DENY, None, reason, "", Mode.ENFORCE)

    def promise(self, decision: Decision, size: int = LINE_PROMISE) -> tuple[Decision, int]:
        """Room for the audit line of a passing `decision`, set aside before its traffic
        flows: the decision and the bytes promised (to be handed to `record`), or the refusal
        when the audit log has no room (with --on-audit-failure=deny, the default)."""
        if not decision.passes or self.runtime.on_audit_failure != "deny":
            return decision, 0
        if not self.runtime.audit.promise(size):
            return self.refuse(decision, UNRECORDED), 0
        return decision, size

    def _recordable(self, decision: Decision) -> Decision:
        """With --on-audit-failure=deny (the default), nothing passes while the audit log
        cannot be written: traffic nobody can review is traffic nobody allowed."""
        if decision.passes and self.runtime.audit.failing and \
                self.runtime.on_audit_failure == "deny":
            return self.refuse(decision, UNRECORDED)
        return decision

    async def pinned(self, client: Client, decision: Decision, host: Host, port: int,
                     original: Address | None = None) -> tuple[Decision, Address | None]:
        """The address to dial for an allowed `decision`, or the denial when there is none.
        A name this client already reaches on `port` keeps its address (rechecked), so that
        requests kept alive on one upstream connection were each decided on it. Raises
        ResolveError."""
        known = self.pinned_now(client, decision, host, port, original)
        if known is not None:
            return known
        outcome = await pin(self.runtime.resolver, self.policy, decision.account, host, port,
                            original)
        if isinstance(outcome, str):
            return self.refuse(decision, outcome), None
        if isinstance(outcome, Decision):
            return outcome, None
        client.pinned[(host_text(host), port)] = outcome
        return decision, outcome

    def pinned_now(self, client: Client, decision: Decision, host: Host, port: int,
                   original: Address | None = None) -> tuple[Decision, Address | None] | None:
        """`pinned` for a name this client already reaches on `port` (its address rechecked),
        without waiting; None when the name must be resolved first."""
        key = (host_text(host), port)
        known = client.pinned.get(key)
        if known is None or original not in (None, known):
            return None
        checked = self.policy.decide_address(decision.account, key[0], known, port)
        return (decision, known) if checked.passes else (checked, None)

    async def connection(self, client: Client, host_raw: str, port: int,
                         proxy_user: str | None = None,
                         original: Address | None = None) -> Tunnel:
        """The decision for a connection to `host_raw`:`port` (a CONNECT, or the SNI of a
        transparent connection to `original`), its upstream address resolved and checked."""
        policy = self.policy
        identity = _with_proxy_user(client.identity, proxy_user)
        decision = self.decide(policy, identity, host_raw, port, Stage.CONNECT)
        if decision.unmatched and decision.mode is Mode.ASK:
            decision = await self.ask(decision, identity, host_raw, port, Stage.CONNECT)
        host = host_or_none(host_raw)
        ip, unresolved = None, False
        if decision.passes and host is not None:
            try:
                decision, ip = await self.pinned(client, decision, host, port, original)
            except ResolveError as e:
                decision, unresolved = self.refuse(decision, str(e), decision.rule), True
        return Tunnel(host if host is not None else Name(host_raw, ()), port, decision, ip,
                      unresolved=unresolved, identity=identity, policy=policy)

    def raw_tcp(self, client: Client, address: Address, port: int) -> Tunnel:
        """Raw TCP (SSH, databases) names no host: it may reach an address only if the resolver
        gave this account that address, in time, for a name it may reach on this port."""
        policy = self.policy
        choice = self.account(policy, client.identity)
        if choice.account is None:
            return Tunnel(address, port, self.refuse_client(choice.reason), None)
        names = self.runtime.memory.names_for(choice.account, address)
        if not names:
            mode = policy.accounts()[choice.account].mode
            decision = Decision(Result.DENY, None, f"raw TCP to {host_text(address)}:{port}: "
                                "the resolver gave this account that address for no allowed "
                                "name", choice.account, mode)
            return Tunnel(address, port, decision, None)
        # the first name (most recently resolved first) that allows it, else the first's denial
        tried: list[tuple[str, Decision]] = []
        for name in names:
            decision = self.decide(policy, client.identity, name, port, Stage.CONNECT)
            if decision.inspect:
                decision = self.refuse(decision, f"{name}:{port} may only be reached by "
                                       "requests the proxy can inspect, not by raw TCP",
                                       decision.rule)
            tried.append((name, decision))
            if decision.passes:
                break
        name, decision = tried[-1] if tried[-1][1].passes else tried[0]
        return Tunnel(host_or_none(name) or address, port, decision,
                      address if decision.passes else None, policy=policy)

    # Ask mode: where no rule matched, a person may still say yes

    async def ask(self, decision: Decision, identity: Identity, host_raw: str, port: int,
                  stage: Stage, method: str | None = None,
                  path: str | None = None) -> Decision:
        """Holds an unmatched connection or request (ask mode) up to the account's
        ask_timeout while its access request waits for an operator. Approved (the rule is in
        the policy by then): decided again, on the new policy, with the request's id in
        `approval`. Otherwise the denial says what became of the request."""
        approvals = self.approvals
        account = self.policy.accounts().get(decision.account)
        host = host_or_none(host_raw)
        if approvals is None or account is None or host is None:
            return replace(decision, reason=f"{decision.reason}; nobody can be asked from "
                           "here (ask mode needs the control socket, run --control, and holds "
                           "connections in the first process only): denied")
        try:
            request = await approvals.hold(decision.account, host_text(host), port,
                                           path.split("?", 1)[0] if path else None,
                                           account.ask_timeout)
        except RequestError as e:
            return replace(decision, reason=f"{decision.reason}; {e}")
        if request.state is State.APPROVED:
            again = self.decide(self.policy, identity, host_raw, port, stage, method, path)
            return replace(again, approval=request.id) if again.passes else again
        return _asked(decision, request, account.ask_timeout)

    def ask_later(self, decision: Decision, host: str) -> Decision:
        """A DNS query in ask mode is answered at once; it opens (or joins) the access
        request, so that a retry after approval works."""
        if self.approvals is None:
            return decision
        try:
            request, _ = self.approvals.open(decision.account, host, None, None)
        except RequestError as e:
            return replace(decision, reason=f"{decision.reason}; {e}")
        return _asked(decision, request, None)

    # Connections: opened, refused after the fact, closed

    def open(self, client: Client, tunnel: Tunnel) -> Tunnel:
        """`tunnel` is the client's connection now: counted if allowed, recorded at once if
        denied (an allowed one is recorded when it closes, with its bytes, in the room promised
        to it here; without room it is denied)."""
        client.tunnel = tunnel
        if not tunnel.promised:  # the tunnel fast path promised it before answering 200
            tunnel.decision, tunnel.promised = self.promise(tunnel.decision)
        if tunnel.decision.passes:
            self.live.add(client, tunnel)
            tunnel.active = True
            self.runtime.metrics.active_connections.labels(tunnel.decision.account).inc()
        else:
            self.record_connection(client, tunnel)
        return tunnel

    def refuse_tunnel(self, client: Client, tunnel: Tunnel, reason: str) -> None:
        """An allowed connection turned out not to be what was decided (its SNI, or raw TCP
        where requests must be inspected): denied and recorded now."""
        self.live.remove(tunnel)
        tunnel.decision = self.refuse(tunnel.decision, reason)
        self.record_connection(client, tunnel, promised=tunnel.promised)
        tunnel.promised = 0

    def withdraw(self, client: Client, tunnel: Tunnel, reason: str) -> None:
        """An open connection that the policy no longer allows (a rule expired, or a reload
        withdrew it; livetunnels.py): denied and recorded now, with what it carried so far,
        before its adapter closes it."""
        tunnel.decision = self.refuse(tunnel.decision, reason, tunnel.decision.rule)
        self.record_connection(client, tunnel, bytes_up=tunnel.bytes_up,
                               bytes_down=tunnel.bytes_down, duration_ms=tunnel.duration_ms(),
                               promised=tunnel.promised)
        tunnel.promised = 0

    def finish(self, client: Client) -> None:
        """The client has gone: counts its connection's bytes and records it."""
        if client.promised:  # a request decided and never forwarded
            self.runtime.audit.release(client.promised)
            client.promised = 0
        tunnel = client.tunnel
        if tunnel is None:
            return
        client.tunnel = None
        self.live.remove(tunnel)
        metrics, account = self.runtime.metrics, tunnel.decision.account
        if tunnel.active:
            metrics.active_connections.labels(account).dec()
        metrics.bytes.labels(account or "none", "up").inc(tunnel.bytes_up)
        metrics.bytes.labels(account or "none", "down").inc(tunnel.bytes_down)
        if tunnel.decision.passes:  # denials were recorded when they happened
            self.record_connection(client, tunnel, bytes_up=tunnel.bytes_up,
                                   bytes_down=tunnel.bytes_down,
                                   duration_ms=tunnel.duration_ms(), promised=tunnel.promised)

    def hand_over(self, peer: tuple[str, int], host_raw: str, port: int,
                  tunnel: Tunnel) -> None:
        """The fast path decided this CONNECT and gives it to mitmproxy, which takes the
        decision (and the audit room promised to it) rather than deciding again."""
        self._handed_over[peer] = (host_raw, port, tunnel)

    def handed_over(self, peer: tuple[str, int], host_raw: str, port: int) -> Tunnel | None:
        decided = self._handed_over.pop(peer, None)
        if decided is None:
            return None
        if decided[:2] != (host_raw, port):
            self.unpromise(decided[2])
            return None
        return decided[2]

    def forget(self, peer: tuple[str, int]) -> None:
        decided = self._handed_over.pop(peer, None)
        if decided is not None:
            self.unpromise(decided[2])

    def unpromise(self, tunnel: Tunnel) -> None:
        """Hands back the audit room promised to a tunnel that never opened."""
        if tunnel.promised:
            self.runtime.audit.release(tunnel.promised)
            tunnel.promised = 0

    # Requests: plain HTTP, inspected HTTPS

    async def request(self, client: Client, host_raw: str, port: int, method: str, path: str,
                      host_header: str | None, authority: str = "",
                      proxy_user: str | None = None) -> RequestOutcome:
        """The decision for one request to `host_raw`:`port` (on the client's connection, if
        it has one), its Host header and absolute-form target (`authority`) checked, and the
        address to dial for it; last, whether it was refused because the name could not be
        resolved (the client gets a 502)."""
        outcome = self.request_now(client, host_raw, port, method, path, host_header,
                                   authority, proxy_user)
        if isinstance(outcome, PendingRequest):
            outcome = await self.request_later(outcome)
        return outcome

    def request_now(self, client: Client, host_raw: str, port: int, method: str, path: str,
                    host_header: str | None, authority: str = "",
                    proxy_user: str | None = None) -> RequestOutcome | PendingRequest:
        """`request` as far as it goes without waiting: most requests on a kept-alive
        connection, whose destination is pinned already, are decided here to the end (no task,
        no coroutine); the rest (ask mode, a name to resolve) are finished by
        `request_later`."""
        host = host_or_none(host_raw)
        identity = _with_proxy_user(client.identity, proxy_user)
        if host is None:
            decision = self.decide(self.policy, identity, host_raw, port, Stage.REQUEST)
            return decision, Name(host_raw, ()), None, False
        decision = self.decide(self.policy, identity, host_raw, port, Stage.REQUEST, method,
                               path)
        reason = self._target_refusal(client, host_raw, host, port, authority, host_header)
        if reason and decision.account:
            decision = self.refuse(decision, reason)
        tunnel = client.tunnel
        if decision.unmatched and decision.mode is Mode.ASK:
            return PendingRequest(client, decision, host, host_raw, port, method, path,
                                  identity, tunnel)
        outcome = self._request_address(client, tunnel, decision, host, port, path)
        if outcome is None:
            return PendingRequest(client, decision, host, host_raw, port, method, path,
                                  identity, tunnel, asked=True)
        return outcome

    def _target_refusal(self, client: Client, host_raw: str, host: Host, port: int,
                        authority: str, host_header: str | None) -> str | None:
        """Why the request's target or Host header do not name `host`:`port`, if they do not.
        Worked out once for the spellings a connection sends on every request (the last ones
        are kept, compared exactly)."""
        spelled = (host_raw, port, authority, host_header)
        last = client.last_target
        if last is not None and last[0] == spelled:
            return last[1]
        reason = target_refusal(authority, host, port)
        if client.original is None:
            reason = reason or host_header_refusal(host_header, host, port)
        client.last_target = (spelled, reason)
        return reason

    async def request_later(self, pending: PendingRequest) -> RequestOutcome:
        """The rest of a request `request_now` could not finish: the operator asked (ask
        mode), the name resolved."""
        decision, client, host, port = pending.decision, pending.client, pending.host, pending.port
        if not pending.asked:
            decision = await self.ask(decision, pending.identity, pending.host_raw, port,
                                      Stage.REQUEST, pending.method, pending.path)
            outcome = self._request_address(client, pending.tunnel, decision, host, port,
                                            pending.path)
            if outcome is not None:
                return outcome
        original = client.original[0] if client.original else None
        try:
            decision, ip = await self.pinned(client, decision, host, port, original)
        except ResolveError as e:
            return self.refuse(decision, str(e), decision.rule), host, None, True
        return self._promise_request(client, decision, pending.path), host, ip, False

    def _request_address(self, client: Client, tunnel: Tunnel | None, decision: Decision,
                         host: Host, port: int, path: str) -> RequestOutcome | None:
        """A decided request with the address to dial for it, if there is one to give without
        waiting (the tunnel's, the pinned one; none for a denial); None when its name must be
        resolved first."""
        if tunnel is not None or not decision.passes:
            decision = self._promise_request(client, decision, path)
            return decision, host, tunnel.ip if tunnel is not None else None, False
        original = client.original[0] if client.original else None
        pinned = self.pinned_now(client, decision, host, port, original)
        if pinned is None:
            return None
        decision, ip = pinned
        return self._promise_request(client, decision, path), host, ip, False

    def _promise_request(self, client: Client, decision: Decision, path: str) -> Decision:
        """Room for the line of a request about to be forwarded, kept on the client until
        begin_exchange takes it (the path goes into the line, escaped at worst 6 bytes for 1)."""
        if client.promised:  # an earlier request's, never forwarded
            self.runtime.audit.release(client.promised)
        decision, client.promised = self.promise(decision, LINE_PROMISE + 6 * len(path))
        return decision

    def begin_exchange(self, client: Client, decision: Decision, host: Host, port: int,
                       ip: Address | None) -> Exchange:
        if client.tunnel is None:
            self.runtime.metrics.active_connections.labels(decision.account).inc()
        promised, client.promised = client.promised, 0
        return Exchange(decision, host, port, ip, promised=promised)

    def end_exchange(self, client: Client, exchange: Exchange, method: str, path: str,
                     bytes_up: int | None, bytes_down: int | None,
                     body: bytes | None = None) -> None:
        tunnel = client.tunnel
        if tunnel is not None:  # inspected: the tunnel's total is the sum of its requests
            tunnel.bytes_up += bytes_up or 0
            tunnel.bytes_down += bytes_down or 0
        else:
            metrics, account = self.runtime.metrics, exchange.decision.account
            metrics.active_connections.labels(account).dec()
            up, down = metrics.bytes.labels(account, "up"), metrics.bytes.labels(account, "down")
            if bytes_up:  # most requests have no body: nothing to add (the series exists)
                up.inc(bytes_up)
            if bytes_down:
                down.inc(bytes_down)
        self.record(Stage.REQUEST, client, exchange.decision, exchange.host, exchange.port,
                    exchange.ip, method=method, path=path, bytes_up=bytes_up,
                    bytes_down=bytes_down, duration_ms=exchange.duration_ms(), body=body,
                    promised=exchange.promised)

    # The record

    async def attribute(self, client: Client) -> None:
        """Waits (a bounded time) until the client's process is known, so that the event about
        to be written names it: the client is still waiting for its answer, so its process
        still exists. Denials and DNS queries wait; allowed connections are recorded when they
        close, long after the lookup."""
        lookup = client.process
        if lookup is None or lookup.done():
            return
        try:
            async with asyncio.timeout(ATTRIBUTION_WAIT):
                await asyncio.wrap_future(lookup)
        except (TimeoutError, concurrent.futures.CancelledError):
            pass

    def record_connection(self, client: Client, tunnel: Tunnel, *, bytes_up: int | None = None,
                          bytes_down: int | None = None, duration_ms: int | None = None,
                          promised: int = 0) -> None:
        self.record(Stage.CONNECT, client, tunnel.decision, tunnel.host, tunnel.port, tunnel.ip,
                    bytes_up=bytes_up, bytes_down=bytes_down, duration_ms=duration_ms,
                    promised=promised)

    def record(self, stage: Stage, client: Client, decision: Decision, host: Host | str,
               port: int | None, ip: Address | None, *, policy: Policy | None = None,
               reason: str | None = None, method: str | None = None, path: str | None = None,
               qtype: str | None = None, bytes_up: int | None = None,
               bytes_down: int | None = None, duration_ms: float | None = None,
               body: bytes | None = None, promised: int = 0) -> None:
        """Counts the decision and writes its one audit event (`reason` overrides the
        decision's, to add what happened after it) into the room `promised` to it. `body`: the
        request's body when it was read, for the operations only it tells apart
        (rules/operations.py)."""
        self.runtime.metrics.count(decision, stage)
        process = client.known_process()
        identity = client.identity
        event = AuditEvent(
            ts=timestamp(), event=stage, account=decision.account or None,
            client=client.address, uid=identity.uid, user=identity.user,
            pid=process.pid if process else None, exe=process.exe if process else None,
            cmdline=process.cmdline if process else None, host=str(host), port=port,
            ip=address_text(ip) if ip is not None else None, method=method, path=path, qtype=qtype,
            decision=decision.result, rule=decision.rule, reason=reason or decision.reason,
            mode=decision.mode if decision.account else None,
            policy=(policy or self.policy).digest, bytes_up=bytes_up, bytes_down=bytes_down,
            duration_ms=duration_ms, rule_id=decision.rule_id,
            op=operation(method, path, body) if stage is Stage.REQUEST else None,
            ancestry=list(process.ancestry) if process and process.ancestry else None,
            credential=decision.credential if stage is Stage.REQUEST else None,
            approval=decision.approval)
        if self.approvals is not None and decision.result is Result.DENY:
            self.approvals.note_denial(event, decision)
        if self._held is None:
            self.runtime.audit.record(event, promised)
        else:
            self._held.append((event, promised))

    def begin_batch(self) -> None:
        """Until end_batch, events are held, to be queued together (a batch of DNS queries:
        the audit thread then wakes once per batch, not once per query)."""
        self._held = []

    def end_batch(self) -> None:
        held, self._held = self._held, None
        if held:
            self.runtime.audit.record_all(held)


def _asked(decision: Decision, request: AccessRequest, waited: float | None) -> Decision:
    """The denial of an unmatched destination in ask mode, naming its access request."""
    hint: str | None
    if request.state is State.PENDING:
        what = f"access request {request.id} is pending" + (
            f" (waited {waited:g}s for an operator)" if waited is not None else "")
        hint = (f"an operator approves it with `agent-egress approve {request.id}`; retry "
                "then (`agent-egress why` shows your denials)")
    else:
        by = f" by {request.closed_by}" if request.closed_by else ""
        answer = f": {request.answer}" if request.answer else ""
        what = f"access request {request.id} was {request.state}{by}{answer}"
        hint = decision.hint
    return replace(decision, reason=f"{decision.reason}; {what}", hint=hint)


def _with_proxy_user(identity: Identity, proxy_user: str | None) -> Identity:
    return identity if proxy_user is None else replace(identity, proxy_user=proxy_user)

