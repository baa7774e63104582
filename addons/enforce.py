"""The mitmproxy addon that enforces the policy at every layer mitmproxy shows us.

CONNECT: account, host and port, then the upstream address (resolved here, checked, and pinned
so that mitmproxy dials exactly that address). Inside the tunnel: the TLS ClientHello's SNI
must name the CONNECT host; TLS passes through unless a rule needs to see requests. Requests
(plain HTTP, or inspected HTTPS): Host must name the destination, then method and path.

mitmproxy logs a hook's exception and lets the flow go on; every hook here denies instead.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mitmproxy import connection, http, tcp, tls
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import events, layer, layers, mode_specs, server_hooks
from mitmproxy.proxy.layers.tls import parse_client_hello

from agent_egress.addons.denial import denial
from agent_egress.identity import Process, find_process, user_name
from agent_egress.rules import (
    Address,
    Decision,
    Host,
    HostError,
    Identity,
    Mode,
    Name,
    Policy,
    Query,
    Result,
    Stage,
    host_text,
    normalize_host,
)
from agent_egress.runtime import Runtime
from agent_egress.upstream import ResolveError

log = logging.getLogger(__name__)

Hooked = TypeVar("Hooked")
_HTTP_REQUEST = re.compile(rb"[A-Z]{3,10} [/*]")  # the start of an HTTP/1 request line
MAX_PENDING_LOOKUPS = 16
UNRESOLVED_STATUS = 502  # as mitmproxy answers when it cannot connect upstream


@dataclass(eq=False)
class Tunnel:
    """A CONNECT and what was decided for it."""

    host: Host
    port: int
    decision: Decision
    ip: Address | None
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0
    bytes_down: int = 0
    active: bool = False  # counted in agent_egress_active_connections
    unresolved: bool = False  # refused because the name could not be resolved, not by policy

    @property
    def destination(self) -> str:
        return f"{host_text(self.host)}:{self.port}"


@dataclass(eq=False)
class ClientState:
    client: str
    identity: Identity
    original: tuple[Address, int] | None = None  # transparent mode: where the client dialled
    process: Future[Process | None] | None = None
    tunnel: Tunnel | None = None
    pinned: dict[tuple[str, int], Address] = field(default_factory=dict)


class _Counted:
    """A response body's `stream`: passes each chunk on as it arrives, counting it."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.total += len(chunk)
        return chunk


@dataclass(frozen=True)
class RequestRecord:
    decision: Decision
    host: str
    port: int
    ip: Address | None
    started: float
    received: _Counted = field(default_factory=_Counted)


def _deny_on_error(refuse: Callable[[Any, str], None]) -> Callable[
        [Callable[[Enforcer, Hooked], Coroutine[Any, Any, None] | None]],
        Callable[[Enforcer, Hooked], Coroutine[Any, Any, None]]]:
    """Runs a hook; if it raises, logs the error and refuses the connection or flow."""

    def wrap(hook: Callable[[Enforcer, Hooked], Coroutine[Any, Any, None] | None]) -> Callable[
            [Enforcer, Hooked], Coroutine[Any, Any, None]]:
        @functools.wraps(hook)
        async def guarded(self: Enforcer, obj: Hooked) -> None:
            try:
                result = hook(self, obj)
                if result is not None:
                    await result
            except Exception:
                log.exception("policy hook %s failed; denying", hook.__name__)
                refuse(obj, "internal policy error (denied; see the agent-egress log)")

        return guarded

    return wrap


def _refuse_flow(flow: http.HTTPFlow, reason: str) -> None:
    flow.response = http.Response.make(403, f"agent-egress: {reason}\n".encode(),
                                       {"Content-Type": "text/plain"})


def _refuse_client(client: connection.Client, reason: str) -> None:
    client.error = reason


def _refuse_server(data: server_hooks.ServerConnectionHookData, reason: str) -> None:
    data.server.error = reason


def _refuse_hello(data: tls.ClientHelloData, reason: str) -> None:
    data.ignore_connection = True
    data.context.server.error = reason


def _refuse_next_layer(nextlayer: layer.NextLayer, reason: str) -> None:
    nextlayer.context.server.error = reason
    nextlayer.layer = layers.TCPLayer(nextlayer.context, ignore=True)


def _refuse_tcp(flow: tcp.TCPFlow, reason: str) -> None:
    flow.server_conn.error = reason
    flow.kill()


class _CountingTCPLayer(layers.TCPLayer):
    """mitmproxy's own pass-through (no flow, so no hook per chunk) counting the bytes."""

    def __init__(self, context: Any, tunnel: Tunnel) -> None:
        super().__init__(context, ignore=True)
        self.tunnel = tunnel

    def relay_messages(self, event: Any) -> Any:
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.tunnel.bytes_up += len(event.data)
            else:
                self.tunnel.bytes_down += len(event.data)
        yield from super().relay_messages(event)


class Enforcer:
    runtime: Runtime  # given, or set in configure when loaded by mitmdump -s

    def __init__(self, runtime: Runtime | None = None) -> None:
        if runtime is not None:
            self.runtime = runtime
        self.clients: dict[str, ClientState] = {}
        # One thread: scanning /proc is slow, and best effort is enough for who-ran-what.
        self._process_lookups = ThreadPoolExecutor(1, thread_name_prefix="process-lookup")
        self._pending_lookups = 0
        # CONNECTs the fast path decided and then handed over, by client address: decided once
        self.handed_over: dict[tuple[str, int], tuple[str, int, Tunnel]] = {}

    def _lookup_done(self, _: Future[Process | None]) -> None:
        self._pending_lookups -= 1

    def done(self) -> None:
        self._process_lookups.shutdown(wait=False, cancel_futures=True)

    # Connections

    @_deny_on_error(_refuse_client)
    def client_connected(self, client: connection.Client) -> None:
        transparent = isinstance(client.proxy_mode, mode_specs.TransparentMode)
        self.clients[client.id] = self.client_state(client.peername, client.sockname,
                                                    transparent)

    def client_state(self, peername: tuple[str, int], sockname: tuple[str, int],
                     transparent: bool = False) -> ClientState:
        """Who the client is (and, in the background, which process); for a transparent
        connection `sockname` is where the client dialled (mitmproxy put SO_ORIGINAL_DST
        there)."""
        peer_ip, peer_port = peername[:2]
        source = normalize_host(peer_ip)
        assert not isinstance(source, Name)
        state = ClientState(f"{host_text(source)}:{peer_port}", Identity(source=source))
        if transparent:
            original = normalize_host(sockname[0])
            assert not isinstance(original, Name)
            state.original = (original, sockname[1])
        owners = self.runtime.owners
        if owners is not None:  # finds nothing for a client that is not on this machine
            owner = (owners.redirected_owner(peername[:2], sockname[:2]) if transparent
                     else owners.owner(peername[:2], sockname[:2]))
            if owner is not None:
                state.identity = Identity(uid=owner.uid, user=user_name(owner.uid),
                                          source=source)
                if owner.inode and self._pending_lookups < MAX_PENDING_LOOKUPS:
                    self._pending_lookups += 1
                    state.process = self._process_lookups.submit(find_process, owner.inode,
                                                                 owner.uid)
                    state.process.add_done_callback(self._lookup_done)
        return state

    def client_disconnected(self, client: connection.Client) -> None:
        self.handed_over.pop(client.peername[:2], None)
        state = self.clients.pop(client.id, None)
        if state is not None:
            self.finish(state)

    def finish(self, state: ClientState) -> None:
        """The client has gone: counts its tunnel's bytes and records the tunnel."""
        if state.process is not None and state.process.cancel():
            state.process = None  # not started, and the socket is gone: nothing to find
        if state.tunnel is None:
            return
        tunnel = state.tunnel
        metrics, account = self.runtime.metrics, tunnel.decision.account
        if tunnel.active:
            metrics.active_connections.labels(account).dec()
        metrics.bytes.labels(account or "none", "up").inc(tunnel.bytes_up)
        metrics.bytes.labels(account or "none", "down").inc(tunnel.bytes_down)
        if tunnel.decision.passes:  # denials were written when they happened
            self._audit("connect", state, tunnel.decision, tunnel.host, tunnel.port, tunnel.ip,
                        bytes_up=tunnel.bytes_up, bytes_down=tunnel.bytes_down,
                        duration_ms=round((time.monotonic() - tunnel.started) * 1000))

    # CONNECT

    @_deny_on_error(_refuse_flow)
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        state = self.clients[flow.client_conn.id]
        policy = self.runtime.policies.current
        if flow.response is not None:  # proxy authentication failed
            self._audit_auth_failure(state, flow, policy)
            return
        decided = self.handed_over.pop(flow.client_conn.peername[:2], None)
        if decided is not None and decided[:2] == (flow.request.host, flow.request.port):
            tunnel = self.start_tunnel(state, decided[2])
        else:
            tunnel = await self._open_tunnel(state, self._identity(state, flow),
                                             flow.request.host, flow.request.port)
        if not tunnel.decision.passes:
            flow.response = denial(tunnel.decision, tunnel.destination,
                                   UNRESOLVED_STATUS if tunnel.unresolved else 403)

    async def _open_tunnel(self, state: ClientState, identity: Identity, host_raw: str,
                           port: int, original: Address | None = None) -> Tunnel:
        return self.start_tunnel(state, await self.decide_tunnel(identity, host_raw, port,
                                                                 original))

    async def decide_tunnel(self, identity: Identity, host_raw: str, port: int,
                            original: Address | None = None) -> Tunnel:
        """The decision for a connection to `host_raw`:`port` (a CONNECT, or the SNI of a
        transparent connection to `original`), its upstream address resolved and checked."""
        policy = self.runtime.policies.current
        choice = policy.account_for(identity)
        if choice.account is None:
            decision = Decision(Result.DENY, None, choice.reason, "", Mode.ENFORCE)
        else:
            decision = self.runtime.metrics.decide(
                policy, Query(choice.account, host_raw, port, Stage.CONNECT))
        decision = self._unrecorded_refusal(decision) or decision
        host, ip, unresolved = self._host_or_none(host_raw), None, False
        if decision.passes and host is not None:
            try:
                decision, ip = await self._pin(policy, decision, host, port, original)
            except ResolveError as e:
                decision, unresolved = _unresolved(decision, e), True
        return Tunnel(host if host is not None else Name(host_raw, ()), port, decision, ip,
                      unresolved=unresolved)

    def start_tunnel(self, state: ClientState, tunnel: Tunnel) -> Tunnel:
        state.tunnel = tunnel
        if tunnel.decision.passes:
            tunnel.active = True
            self.runtime.metrics.active_connections.labels(tunnel.decision.account).inc()
        else:
            self._audit("connect", state, tunnel.decision, tunnel.host, tunnel.port, tunnel.ip)
        return tunnel

    @_deny_on_error(_refuse_next_layer)
    async def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Takes allowed pass-through TLS tunnels, so their bytes are counted: mitmproxy's own
        pass-through has no flow to count on. Everything else goes on to tls_clienthello,
        requestheaders or tcp_start. In transparent mode, decides first what the connection
        is for: the TLS SNI, the Host of each request, or for raw TCP, the name this account
        was given the address for."""
        if nextlayer.layer is not None:
            return
        state = self.clients.get(nextlayer.context.client.id)
        if state is not None and state.original is not None and state.tunnel is None:
            await self._transparent(nextlayer, state, state.original)
            return
        tunnel = state.tunnel if state else None
        if tunnel is None or not tunnel.decision.passes or tunnel.decision.inspect:
            return
        data = nextlayer.data_client()
        if not starts_like_tls_record(data):
            return
        try:
            hello = parse_client_hello(data)
        except ValueError:
            return  # mitmproxy's TLS layer will refuse it
        if hello is None:
            return  # wait for the rest of the ClientHello
        assert state is not None
        refusal = self.sni_refusal(hello.sni, tunnel)
        if refusal:
            self._deny_tunnel(state, tunnel, refusal)
            _refuse_next_layer(nextlayer, refusal)
        else:
            nextlayer.layer = _CountingTCPLayer(nextlayer.context, tunnel)

    async def _transparent(self, nextlayer: layer.NextLayer, state: ClientState,
                           original: tuple[Address, int]) -> None:
        data = nextlayer.data_client()
        if not data:
            return  # wait until the client speaks
        address, port = original
        if starts_like_tls_record(data):
            try:
                hello = parse_client_hello(data)
            except ValueError:
                _refuse_next_layer(nextlayer, "not a TLS ClientHello")
                return
            if hello is None:
                return
            target = hello.sni if hello.sni else str(address)
            tunnel = await self._open_tunnel(state, state.identity, target, port, address)
        elif _HTTP_REQUEST.match(data):
            return  # each request is judged by its Host in requestheaders
        else:
            tunnel = self.start_tunnel(state, self._raw_tcp(state, address, port))
        if not tunnel.decision.passes:
            _refuse_next_layer(nextlayer, tunnel.decision.reason)
        elif not tunnel.decision.inspect:
            nextlayer.layer = layers.TCPLayer(nextlayer.context)

    def _raw_tcp(self, state: ClientState, address: Address, port: int) -> Tunnel:
        """Raw TCP (SSH, databases) names no host: it may reach an address only if the resolver
        gave this account that address, in time, for a name it may reach on this port."""
        policy = self.runtime.policies.current
        choice = policy.account_for(state.identity)
        name = self.runtime.memory.name_for(choice.account, address) if choice.account else None
        if choice.account is None:
            decision = Decision(Result.DENY, None, choice.reason, "", Mode.ENFORCE)
        elif name is None:
            mode = policy.accounts()[choice.account].mode
            decision = Decision(Result.DENY, None, f"raw TCP to {host_text(address)}:{port}: the "
                                "resolver gave this account that address for no allowed name",
                                choice.account, mode)
        else:
            decision = self.runtime.metrics.decide(
                policy, Query(choice.account, name, port, Stage.CONNECT))
            if decision.inspect:
                decision = Decision(Result.DENY, decision.rule, f"{name}:{port} may only be "
                                    "reached by requests the proxy can inspect, not by raw TCP",
                                    decision.account, decision.mode)
        host = normalize_host(name) if name else address
        return Tunnel(host, port, decision, address if decision.passes else None)

    @_deny_on_error(_refuse_hello)
    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        state = self.clients[data.context.client.id]
        tunnel = state.tunnel
        if tunnel is None:
            _refuse_hello(data, "TLS without a CONNECT")
            return
        refusal = self.sni_refusal(data.client_hello.sni, tunnel)
        if refusal:
            self._deny_tunnel(state, tunnel, refusal)
            _refuse_hello(data, refusal)
        elif not tunnel.decision.inspect:
            data.ignore_connection = True

    def sni_refusal(self, sni: str | None, tunnel: Tunnel) -> str | None:
        if sni is None:
            if isinstance(tunnel.host, Name):
                return f"TLS without SNI in a CONNECT to {tunnel.destination}"
            return None
        try:
            named = normalize_host(sni)
        except HostError as e:
            return f"invalid TLS SNI: {e}"
        if named != tunnel.host:
            return (f"TLS SNI {host_text(named)} does not match the CONNECT host "
                    f"{host_text(tunnel.host)} (domain fronting?)")
        return None

    def _deny_tunnel(self, state: ClientState, tunnel: Tunnel, reason: str) -> None:
        decision = tunnel.decision
        tunnel.decision = Decision(Result.DENY, None, reason, decision.account, decision.mode)
        self._audit("connect", state, tunnel.decision, tunnel.host, tunnel.port, tunnel.ip)

    @_deny_on_error(_refuse_tcp)
    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        state = self.clients[flow.client_conn.id]
        tunnel = state.tunnel
        if tunnel is None:
            _refuse_tcp(flow, "TCP without a CONNECT")
        elif tunnel.decision.inspect:
            reason = (f"{tunnel.destination} may only be reached by requests the proxy can "
                      "inspect, not by raw TCP")
            self._deny_tunnel(state, tunnel, reason)
            _refuse_tcp(flow, reason)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        state = self.clients.get(flow.client_conn.id)
        message = flow.messages[-1]
        if state is not None and state.tunnel is not None:
            if message.from_client:
                state.tunnel.bytes_up += len(message.content)
            else:
                state.tunnel.bytes_down += len(message.content)
        flow.messages.clear()  # counted; keeping them would hold the whole stream in memory

    # Requests: plain HTTP, and HTTPS that a rule inspects

    @_deny_on_error(_refuse_flow)
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self.clients[flow.client_conn.id]
        policy = self.runtime.policies.current
        if flow.response is not None:  # proxy authentication failed
            self._audit_auth_failure(state, flow, policy)
            return
        request = flow.request
        tunnel = state.tunnel
        original = state.original if tunnel is None else None
        if original is not None:  # transparent plain HTTP: the Host header names the target
            destination_host = _host_header_name(request.host_header or "") or str(original[0])
            port = original[1]
        else:
            destination_host = request.host if tunnel is None else host_text(tunnel.host)
            port = request.port if tunnel is None else tunnel.port
        host = self._host_or_none(destination_host)
        choice = policy.account_for(self._identity(state, flow))
        decision: Decision
        if choice.account is None:
            decision = Decision(Result.DENY, None, choice.reason, "", Mode.ENFORCE)
        elif host is None:
            decision = self.runtime.metrics.decide(
                policy, Query(choice.account, destination_host, port, Stage.REQUEST))
        else:
            decision = (None if original else self._host_header_refusal(
                request, host, choice.account, policy)) or self.runtime.metrics.decide(
                policy, Query(
                    choice.account, destination_host, port, Stage.REQUEST, request.method,
                    request.path))
        decision = self._unrecorded_refusal(decision) or decision
        ip = tunnel.ip if tunnel is not None else None
        status = 403
        if decision.passes and tunnel is None and host is not None:
            try:
                decision, ip = await self._pin(policy, decision, host, port,
                                               original[0] if original else None)
            except ResolveError as e:
                decision, status = _unresolved(decision, e), UNRESOLVED_STATUS
            if ip is not None:
                # mitmproxy reuses an upstream connection for a request whose host and port
                # match its address: make that the checked address (Host keeps the name).
                request.data.host = str(ip)
                state.pinned[(request.host, port)] = ip
        shown = host if host is not None else Name(destination_host, ())
        if not decision.passes:
            self._audit("request", state, decision, shown, port, ip, method=request.method,
                        path=request.path)
            flow.response = denial(decision, f"{host_text(shown)}:{port}", status)
            return
        flow.metadata["agent_egress"] = RequestRecord(decision, host_text(shown), port, ip,
                                                      time.monotonic())
        if tunnel is None:
            self.runtime.metrics.active_connections.labels(decision.account).inc()

    def _unrecorded_refusal(self, decision: Decision) -> Decision | None:
        """With --on-audit-failure=deny (the default), nothing passes while the audit log
        cannot be written: traffic nobody can review is traffic nobody allowed."""
        if not decision.passes or not self.runtime.audit.failing or \
                self.runtime.on_audit_failure != "deny":
            return None
        return Decision(Result.DENY, None, "the audit log cannot be written (disk full?); "
                        "denying until it can (--on-audit-failure=deny)", decision.account,
                        decision.mode)

    def _host_header_refusal(self, request: http.Request, host: Host, account: str,
                             policy: Policy) -> Decision | None:
        header = request.host_header
        if header is None:
            return None
        name = _host_header_name(header)
        try:
            named = normalize_host(name)
        except HostError as e:
            reason = f"invalid Host header: {e}"
        else:
            if named == host:
                return None
            reason = f"Host header {header} does not match the destination {host_text(host)}"
        mode = policy.accounts()[account].mode
        return Decision(Result.DENY, None, reason, account, mode)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Streams every response body on as it arrives: an origin that breaks off mid-body
        is then a broken transfer for the client too (not a complete-looking 502 or a
        truncated body), and the audit counts the bytes that really came."""
        record = flow.metadata.get("agent_egress")
        if isinstance(record, RequestRecord) and flow.response is not None:
            flow.response.stream = record.received

    def response(self, flow: http.HTTPFlow) -> None:
        self._audit_request(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._audit_request(flow)

    def _audit_request(self, flow: http.HTTPFlow) -> None:
        record = flow.metadata.pop("agent_egress", None)
        state = self.clients.get(flow.client_conn.id)
        if not isinstance(record, RequestRecord) or state is None:
            return
        response = flow.response
        bytes_up = _body_size(flow.request)
        bytes_down = record.received.total if response is not None else None
        if state.tunnel is not None:  # inspected: the tunnel's total is the sum of its requests
            state.tunnel.bytes_up += bytes_up or 0
            state.tunnel.bytes_down += bytes_down or 0
        else:
            metrics, account = self.runtime.metrics, record.decision.account
            metrics.active_connections.labels(account).dec()
            metrics.bytes.labels(account, "up").inc(bytes_up or 0)
            metrics.bytes.labels(account, "down").inc(bytes_down or 0)
        self._audit("request", state, record.decision, self._host_or_name(record.host),
                    record.port, record.ip, method=flow.request.method, path=flow.request.path,
                    bytes_up=bytes_up, bytes_down=bytes_down,
                    duration_ms=round((time.monotonic() - record.started) * 1000))

    # Upstream

    @_deny_on_error(_refuse_server)
    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Dials exactly the address that was checked for this destination, and nothing
        that was not checked."""
        state = self.clients[data.client.id]
        if data.server.address is None:
            data.server.error = "no destination"
            return
        host, port = data.server.address
        tunnel = state.tunnel
        if tunnel is not None:
            if not tunnel.decision.passes or tunnel.ip is None:
                data.server.error = tunnel.decision.reason
                return
            ip = tunnel.ip
        elif (host, port) in state.pinned:
            ip = state.pinned[(host, port)]
        else:
            data.server.error = f"no policy decision for {host}:{port}"
            return
        if data.server.sni is None and isinstance(self._host_or_none(host), Name):
            data.server.sni = host
        data.server.address = (str(ip), port)

    async def _pin(self, policy: Policy, decision: Decision, host: Host, port: int,
                   original: Address | None = None) -> tuple[Decision, Address | None]:
        """Resolves `host` and picks the first address the account may reach; the decision
        becomes a denial when none is allowed. In transparent mode the client already chose
        `original`: it must be one of the addresses the name resolves to. Raises ResolveError."""
        account = decision.account
        if not isinstance(host, Name):
            if original is not None and host != original:
                return Decision(Result.DENY, None, f"the connection is to "
                                f"{host_text(original)}, not {host_text(host)}", account,
                                decision.mode), None
            checked = policy.decide_address(account, host_text(host), host, port)
            return (decision, host) if checked.passes else (checked, None)
        addresses = await self.runtime.resolver.addresses(host.text)
        if original is not None:
            if original not in addresses:
                return Decision(Result.DENY, None, f"{host.text} does not resolve to "
                                f"{host_text(original)}, where the connection goes (spoofed "
                                "name?)", account, decision.mode), None
            addresses = [original]
        first_refusal = None
        for address in addresses:
            checked = policy.decide_address(account, host.text, address, port)
            if checked.passes:
                return decision, address
            first_refusal = first_refusal or checked
        assert first_refusal is not None
        return first_refusal, None

    # Audit

    def _identity(self, state: ClientState, flow: http.HTTPFlow) -> Identity:
        proxy_auth = flow.metadata.get("proxyauth")
        if not proxy_auth:
            return state.identity
        identity = state.identity
        return Identity(identity.uid, identity.user, str(proxy_auth[0]), identity.source)

    def _audit_auth_failure(self, state: ClientState, flow: http.HTTPFlow,
                            policy: Policy) -> None:
        tried = "Proxy-Authorization" in flow.request.headers
        reason = "proxy authentication failed" if tried else "proxy authentication required"
        decision = Decision(Result.DENY, None, reason, "", Mode.ENFORCE)
        event = "connect" if flow.request.method == "CONNECT" else "request"
        self._audit(event, state, decision, self._host_or_name(flow.request.host),
                    flow.request.port, None, method=None if event == "connect" else
                    flow.request.method, path=None if event == "connect" else flow.request.path)

    def _audit(self, event: str, state: ClientState, decision: Decision, host: Host, port: int,
               ip: Address | None, **fields: Any) -> None:
        self.runtime.metrics.count(decision, event)
        process = state.process.result() if state.process and state.process.done() else None
        identity = state.identity
        self.runtime.audit.record(
            event=event, account=decision.account or None, client=state.client,
            uid=identity.uid, user=identity.user,
            pid=process.pid if process else None, exe=process.exe if process else None,
            cmdline=process.cmdline if process else None,
            host=str(host), port=port,
            ip=str(ip) if ip is not None else None, decision=decision.result.value,
            rule=decision.rule, reason=decision.reason,
            mode=decision.mode.value if decision.account else None,
            policy=self.runtime.policies.current.digest, **fields)

    @staticmethod
    def _host_or_none(raw: str) -> Host | None:
        try:
            return normalize_host(raw)
        except HostError:
            return None

    def _host_or_name(self, raw: str) -> Host:
        return self._host_or_none(raw) or Name(raw, ())


def _unresolved(decision: Decision, error: ResolveError) -> Decision:
    """Not a policy denial: nothing can be dialled. The client gets UNRESOLVED_STATUS."""
    return Decision(Result.DENY, decision.rule, str(error), decision.account, decision.mode)


def _host_header_name(header: str) -> str:
    """The host in a Host header, `host[:port]`. Anything else after the last colon stays part
    of the name, so that it fails to parse: an obs-folded `Host: allowed.test:80\r\n evil.test`
    must not pass as allowed.test and reach the origin, which may read it differently."""
    name, _, port = header.rpartition(":")
    if header.endswith("]") or not (port.isascii() and port.isdigit()):
        return header
    return name


def _body_size(message: http.Message) -> int | None:
    if message.raw_content is not None:
        return len(message.raw_content)
    length = message.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None

