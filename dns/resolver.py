"""The per-account DNS policy: a name is answered only if the client's account may reach it.

Denied names get NXDOMAIN with an Extended DNS Error (RFC 8914) naming the account and rule, and
are never forwarded. Allowed (and, in learning mode, would-be-denied) names are forwarded, and
A/AAAA answers pointing at internal addresses are removed unless a `cidr` rule allows them, so
that an allowed name cannot be rebound to the inside. Answers are cached packed, per account and
policy, for their TTL.

Every query costs one identity lookup and one audit event, so the hot path does little else: a
packet already seen (whatever its id) is not parsed again, a client's identity and account are
worked out once per policy, and a cached answer is sent with its TTLs counted down in place,
without dnslib. The UDP server hands datagrams over in batches (`begin_batch`/`end_batch`): a
client asking several questions in one batch is looked up once, and the batch's audit events are
queued together, so that the audit thread wakes once per batch rather than once per query.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import ip_address
from typing import Any

from dnslib import (
    CLASS,
    EDNS0,
    QTYPE,
    RCODE,
    RR,
    DNSError,
    DNSHeader,
    DNSQuestion,
    DNSRecord,
    EDNSOption,
)

from agent_egress.identity import SocketOwner, SocketOwners, user_name
from agent_egress.rules import (
    AccountChoice,
    Address,
    Decision,
    HostError,
    Identity,
    Mode,
    Name,
    Policy,
    Query,
    Result,
    Stage,
    normalize_host,
)
from agent_egress.runtime import Runtime
from agent_egress.upstream import DnsServers, ResolveError

from .signals import TunnelSignals
from .wire import (
    HEADER,
    RD,
    REFUSED,
    SERVFAIL,
    Malformed,
    Question,
    error_reply,
    parse_query,
    records_offset,
    truncated,
    ttl_offsets,
)

log = logging.getLogger(__name__)

EDE_OPTION = 15
EDE_BLOCKED = 15  # the operator's policy blocks the name
EDE_PROHIBITED = 18  # the client itself is not allowed to ask
EDE_NO_REACHABLE_AUTHORITY = 22  # no upstream server gave a usable answer
UPSTREAM_PAYLOAD = 1232
ADDRESS_TYPES = (QTYPE.A, QTYPE.AAAA)
NEGATIVE_TTL = 30
MAX_TTL = 3600
CACHE_ENTRIES = 10_000
MEMO_ENTRIES = 4096  # parsed packets, client addresses and identities kept; cleared when full

Reply = bytes | None | Coroutine[Any, Any, bytes | None]


@dataclass(eq=False, slots=True)
class _Cached:
    """An answer packed once, without its id and question; its TTLs are rewritten in place as
    they count down, which gives the bytes dnslib would pack with the lowered TTLs."""

    head: bytes  # the header after the id, question count 1, RD clear
    head_rd: bytes  # the same with RD set
    body: bytes  # everything after the header, TTLs as received
    ttl_offsets: list[int]  # where each record's TTL is in `body` (OPT records aside)
    ttls: list[int]
    stored: float
    lifetime: int
    notes: str
    current: bytes  # `body` as of `current_second` seconds after `stored`
    current_second: int = 0

    def reply(self, now: float, packet: bytes, question: Question, protocol: int) -> bytes | None:
        """The answer to `packet` with its TTLs counted down, or None once it has expired."""
        elapsed = int(now - self.stored)
        if elapsed >= self.lifetime:
            return None
        if elapsed != self.current_second:
            body = bytearray(self.body)
            for offset, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
                _TTL.pack_into(body, offset, max(ttl - elapsed, 0))
            self.current, self.current_second = bytes(body), elapsed
        reply = packet[:2] + (self.head_rd if question.flags & RD else self.head) \
            + question.question + self.current
        if protocol == socket.IPPROTO_UDP and len(reply) > question.udp_payload:
            return truncated(reply, question)
        return reply


_TTL = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class _Asked:
    """A query's question (of class IN) and what follows from it alone, worked out once per
    packet."""

    question: Question
    qtype: str  # the type's name, or its number
    host: Name | None  # the name normalised, None if it is not a valid host name
    name_key: str  # the name in lower case, for the answer cache


class PolicyResolver:
    def __init__(self, runtime: Runtime, upstream: DnsServers) -> None:
        self.runtime = runtime
        self.upstream = upstream
        self.memory = runtime.memory  # shared with the proxy, for raw TCP in transparent mode
        self.signals = TunnelSignals()
        self._cache: OrderedDict[tuple[object, ...], _Cached] = OrderedDict()
        self._asked: dict[bytes, _Asked] = {}  # packet without its id -> what it asks
        self._queries: dict[tuple[str, str], Query] = {}  # (account, name) -> its DNS query
        self._sources: dict[str, Address] = {}  # client addresses, normalised
        self._clients: dict[tuple[int | None, str | None, str],
                            tuple[Identity, AccountChoice]] = {}
        self._clients_policy: Policy | None = None  # the policy `_clients` was worked out for
        self._batch_owners: dict[tuple[object, ...], SocketOwner | None] | None = None
        self._held: list[dict[str, Any]] | None = None

    def begin_batch(self) -> None:
        """Until end_batch: queries that the caller had all received before this call. Their
        socket owners are looked up once per client address, and their audit events held.

        Looking a client up once for all its queries in the batch is as exact as a lookup per
        query: every lookup already comes after the datagram arrived (the kernel can only say
        who holds the client's port now, not who sent it), and these datagrams had all arrived
        before the first lookup. A port that changed hands meanwhile misleads a lookup per
        query just the same, and one that changes hands later cannot have sent any of them."""
        self._batch_owners = {}
        self._held = []

    def end_batch(self) -> None:
        """Queues the batch's audit events, in order, each with the time of its query."""
        held, self._held, self._batch_owners = self._held, None, None
        record = self.runtime.audit.record
        for fields in held or ():
            record(**fields)

    def handle(self, packet: bytes, client: tuple[str, int], server: tuple[str, int],
               protocol: int) -> Reply:
        """The reply to `packet`, at once or as a coroutine that forwards it. Never raises."""
        started = time.monotonic()
        packet = bytes(packet)  # no copy for bytes; a bytearray could not be a memo key
        asked = self._asked.get(packet[2:])
        if asked is None:
            try:
                question = parse_query(packet)
            except Malformed as e:
                return error_reply(packet, e.rcode)
            except ValueError:
                return None  # no id to answer, or not a query: silence
        else:
            question = asked.question
        try:
            if asked is None:
                if question.qclass != CLASS.IN:
                    return error_reply(packet, REFUSED, question)
                asked = _Asked(question, QTYPE.get(question.qtype, str(question.qtype)),
                               _name_or_none(question.name), question.name.lower())
                if len(self._asked) >= MEMO_ENTRIES:
                    self._asked.clear()
                self._asked[packet[2:]] = asked
            return self._decide(packet, asked, client, server, protocol, started)
        except Exception:
            log.exception("resolver failed on a query for %r", question.name)
            return error_reply(packet, SERVFAIL, question)

    def _decide(self, packet: bytes, asked: _Asked, client: tuple[str, int],
                server: tuple[str, int], protocol: int, started: float) -> Reply:
        question, qtype, host = asked.question, asked.qtype, asked.host  # class IN only
        policy = self.runtime.policies.current
        identity, choice = self._client(policy, client, server, protocol)
        if choice.account is None:
            decision = Decision(Result.DENY, None, choice.reason, "", Mode.ENFORCE)
        else:
            decision = self.runtime.metrics.decide(policy, self._query(choice.account, question))
        event = _Event(self, policy, identity, client, host or question.name, qtype, started)
        if host is not None and decision.account:
            event.signals = self.signals.observe(decision.account, host.text,
                                                 host.parents[0] if host.parents else None, qtype)
            for signal in event.signals:
                self.runtime.metrics.dns_suspicious.labels(decision.account, signal).inc()
        if not decision.passes:
            event.write(decision)
            code = EDE_PROHIBITED if choice.account is None else EDE_BLOCKED
            return _denial(packet, question, decision, code)
        key = (policy.digest, decision.account, asked.name_key, question.qtype,
               question.dnssec_ok, question.edns)
        cached = self._cache.get(key)
        if cached is not None:
            reply = cached.reply(time.monotonic(), packet, question, protocol)
            if reply is not None:
                self._cache.move_to_end(key)
                event.write(decision, cached.notes)
                return reply
            del self._cache[key]
        return self._forward(packet, question, decision, policy, key, event, protocol)

    async def _forward(self, packet: bytes, question: Question, decision: Decision,
                       policy: Policy, key: tuple[object, ...], event: _Event,
                       protocol: int) -> bytes | None:
        name = _forwarded_name(question)
        if name is None:  # the policy never allows these; should one pass, it is not forwarded
            refused = Decision(Result.DENY, None, f"{question.name!r} is not the name that was "
                               "decided (an IP address, or another spelling): not forwarded",
                               decision.account, decision.mode)
            event.write(refused)
            return _denial(packet, question, refused, EDE_BLOCKED)
        try:
            upstream = DNSRecord(DNSHeader(id=random.getrandbits(16), rd=1),
                                 q=DNSQuestion(name, question.qtype, question.qclass))
            upstream.add_ar(EDNS0(udp_len=UPSTREAM_PAYLOAD,
                                  flags="do" if question.dnssec_ok else ""))
            answer = DNSRecord.parse(await self.upstream.exchange(upstream.pack()))
        except (ResolveError, DNSError, ValueError, struct.error) as e:
            event.write(decision, f"upstream failed: {e}")
            return _upstream_failure(packet, question)
        except Exception:
            log.exception("forwarding %r failed", question.name)
            return error_reply(packet, SERVFAIL, question)
        record, removed, outside = self._filtered(answer, decision.account, question, name,
                                                  policy)
        notes = "; ".join(
            [f"removed internal answers: {', '.join(removed)}"] * bool(removed)
            + [f"removed records outside the question's name chain: {_listed(outside)}"]
            * bool(outside))
        event.write(decision, notes)
        entry = _cache_entry(record, notes)
        reply = entry.reply(time.monotonic(), packet, question, protocol)
        if reply is None:
            return _for_client(record.pack(), packet, question, protocol)
        self._cache[key] = entry
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return reply

    def _filtered(self, answer: DNSRecord, account: str, question: Question, name: str,
                  policy: Policy) -> tuple[DNSRecord, list[str], list[str]]:
        """The answer for the client: only records on the question's name chain (`name` and
        the CNAME targets reached from it), without internal addresses the account may not
        reach, the rest remembered for transparent mode; in the authority section only what
        a negative answer needs (the zone's SOA, and for DNSSEC its denial records); nothing
        in the additional section but the OPT record. Returns the addresses removed and the
        records dropped as outside the chain."""
        removed: list[str] = []
        chain = _name_chain(name, answer.rr)
        kept: list[RR] = []
        outside: list[str] = []
        for rr in answer.rr:
            if rr.rtype == QTYPE.OPT:
                continue
            owner = _owner(rr)
            if owner not in chain and not (
                    rr.rtype == QTYPE.DNAME and any(_at_or_below(n, owner) for n in chain)):
                outside.append(f"{owner or '.'} {QTYPE.get(rr.rtype, rr.rtype)}")
                continue
            if rr.rtype in ADDRESS_TYPES:
                address = ip_address(str(rr.rdata))
                if not policy.decide_address(account, name, address, None).passes:
                    removed.append(str(address))
                    continue
                self.memory.remember(account, name, address, rr.ttl)
            kept.append(rr)
        negative = answer.header.rcode == RCODE.NXDOMAIN or not any(
            rr.rtype == question.qtype or question.qtype == QTYPE.ANY for rr in kept)
        zones = [_owner(rr) for rr in answer.auth if rr.rtype == QTYPE.SOA
                 and any(_at_or_below(n, _owner(rr)) for n in chain)][:1] if negative else []
        proofs = (QTYPE.SOA, QTYPE.NSEC, QTYPE.NSEC3, QTYPE.RRSIG) if question.dnssec_ok \
            else (QTYPE.SOA,)
        auth = [rr for rr in answer.auth if rr.rtype in proofs and zones
                and _at_or_below(_owner(rr), zones[0])]
        header = DNSHeader(id=0, qr=1, ra=1, rd=1, rcode=answer.header.rcode,
                           ad=answer.header.ad)
        # Packed with the question as forwarded: compression pointers into it then point into
        # the client's question, which is the same name but for letter case.
        record = DNSRecord(header, q=DNSQuestion(name, question.qtype, question.qclass),
                           rr=kept, auth=auth)
        if question.edns:  # a client that sent no OPT record must not get one (RFC 6891)
            record.add_ar(EDNS0(udp_len=UPSTREAM_PAYLOAD))
        return record, removed, outside

    def _query(self, account: str, question: Question) -> Query:
        query = self._queries.get((account, question.name))
        if query is None:
            if len(self._queries) >= MEMO_ENTRIES:
                self._queries.clear()
            query = self._queries[(account, question.name)] = Query(
                account, question.name, None, Stage.DNS)
        return query

    def _client(self, policy: Policy, client: tuple[str, int], server: tuple[str, int],
                protocol: int) -> tuple[Identity, AccountChoice]:
        """Who the client is (the kernel's word on the socket's owner) and its account."""
        source = self._sources.get(client[0])
        if source is None:
            host = normalize_host(client[0])
            assert not isinstance(host, Name)
            if len(self._sources) >= MEMO_ENTRIES:
                self._sources.clear()
            source = self._sources[client[0]] = host
        owners = self.runtime.owners
        owner = None if owners is None else self._owner(owners, client, server, protocol)
        uid = None if owner is None else owner.uid
        user = None if uid is None else user_name(uid)
        if policy is not self._clients_policy:
            self._clients.clear()
            self._clients_policy = policy
        key = (uid, user, client[0])
        found = self._clients.get(key)
        if found is None:
            identity = Identity(source=source) if uid is None else Identity(
                uid=uid, user=user, source=source)
            found = (identity, policy.account_for(identity))  # depends on these alone
            if len(self._clients) >= MEMO_ENTRIES:
                self._clients.clear()
            self._clients[key] = found
        return found

    def _owner(self, owners: SocketOwners, client: tuple[str, int], server: tuple[str, int],
               protocol: int) -> SocketOwner | None:
        batch = self._batch_owners
        key = (client, server, protocol)
        if batch is not None and key in batch:
            return batch[key]
        # A query nftables redirected here comes from a socket whose peer is the server it
        # asked for, not this one: then only its own address finds it.
        owner = owners.owner(client, server, protocol) or owners.owner_of_local(client, protocol)
        if batch is not None:
            batch[key] = owner
        return owner


class _Event:
    """One audit event per query, written once its outcome is known."""

    __slots__ = ("client", "host", "identity", "policy", "qtype", "resolver", "signals",
                 "started")

    def __init__(self, resolver: PolicyResolver, policy: Policy, identity: Identity,
                 client: tuple[str, int], host: Name | str, qtype: str, started: float) -> None:
        self.resolver = resolver
        self.policy = policy
        self.identity = identity
        self.client = client
        self.host = host
        self.qtype = qtype
        self.started = started
        self.signals: list[str] = []

    def write(self, decision: Decision, notes: str = "") -> None:
        reason = decision.reason
        if notes:
            reason += f"; {notes}"
        if self.signals:
            reason += f"; suspected tunnelling: {', '.join(self.signals)}"
        client_host = f"[{self.client[0]}]" if ":" in self.client[0] else self.client[0]
        resolver = self.resolver
        resolver.runtime.metrics.count(decision, "dns")
        fields = dict(
            event="dns", account=decision.account or None, client=f"{client_host}:"
            f"{self.client[1]}", uid=self.identity.uid, user=self.identity.user,
            host=str(self.host), qtype=self.qtype, decision=decision.result.value,
            rule=decision.rule, reason=reason,
            mode=decision.mode.value if decision.account else None, policy=self.policy.digest,
            duration_ms=round((time.monotonic() - self.started) * 1000, 3))
        if resolver._held is None:
            resolver.runtime.audit.record(**fields)
        else:  # queued at the end of the batch, with the time it would have had now
            fields["ts"] = _timestamp()
            resolver._held.append(fields)


def _timestamp() -> str:
    """An event's time as AuditLog.record spells it (datetime.now(UTC) in milliseconds, which
    are the system clock's nanoseconds floored), formatted once per millisecond."""
    global _last_timestamp
    ms = time.time_ns() // 1_000_000
    if ms != _last_timestamp[0]:
        moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
        _last_timestamp = (ms, moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
    return _last_timestamp[1]


_last_timestamp = (-1, "")


def _name_or_none(text: str) -> Name | None:
    try:
        host = normalize_host(text)
    except HostError:
        return None
    return host if isinstance(host, Name) else None


def _forwarded_name(question: Question) -> str | None:
    """The name to ask upstream: exactly the name the policy decided on (the question's in
    canonical form), or None when that differs from what the client asked beyond letter case,
    as for an IP address (`127.1`) or a name in another spelling; then nothing is forwarded."""
    host = _name_or_none(question.name)
    if host is None or host.text != question.name.lower():
        return None
    return host.text


def _owner(rr: RR) -> str:
    return str(rr.rname).lower().rstrip(".")


def _at_or_below(name: str, zone: str) -> bool:
    return not zone or name == zone or name.endswith("." + zone)


def _name_chain(name: str, records: list[RR]) -> set[str]:
    """`name` and every name a CNAME leads to from it, in however many steps."""
    chain = {name}
    for _ in range(len(records)):
        targets = {str(rr.rdata.label).lower().rstrip(".") for rr in records
                   if rr.rtype == QTYPE.CNAME and _owner(rr) in chain}
        if targets <= chain:
            break
        chain |= targets
    return chain


def _listed(items: list[str], most: int = 5) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _cache_entry(record: DNSRecord, notes: str) -> _Cached:
    records = [rr for rr in (*record.rr, *record.auth, *record.ar) if rr.rtype != QTYPE.OPT]
    ttls = [rr.ttl for rr in records]
    if record.rr:
        lifetime = min(rr.ttl for rr in record.rr)
    else:  # negative answers: the SOA's minimum, else a short default (RFC 2308)
        soa = [rr for rr in record.auth if rr.rtype == QTYPE.SOA]
        lifetime = min(soa[0].ttl, soa[0].rdata.times[-1]) if soa else NEGATIVE_TTL
    packed = bytes(record.pack())
    start = records_offset(packed)
    offsets = [offset - start for offset in ttl_offsets(packed)]
    if len(offsets) != len(ttls):
        raise ValueError("packed answer does not have the records it was packed from")
    _, flags, _, *counts = HEADER.unpack_from(packed)
    flags &= ~RD
    body = packed[start:]
    head, head_rd = (HEADER.pack(0, f, 1, *counts)[2:] for f in (flags, flags | RD))
    return _Cached(head, head_rd, body, offsets, ttls, time.monotonic(), min(lifetime, MAX_TTL),
                   notes, body)


def _for_client(packed: bytes, packet: bytes, question: Question, protocol: int) -> bytes:
    reply = _with_question(packed, packet, question)
    if protocol == socket.IPPROTO_UDP and len(reply) > question.udp_payload:
        return truncated(reply, question)
    return reply


def _denial(packet: bytes, question: Question, decision: Decision, code: int) -> bytes:
    reply = DNSRecord(DNSHeader(id=0, qr=1, ra=1, rcode=RCODE.NXDOMAIN))
    if question.edns:
        text = f"agent-egress: account {decision.account or 'none'}: {decision.reason}"
        if decision.rule:
            text += f" ({decision.rule})"
        reply.add_ar(EDNS0(udp_len=UPSTREAM_PAYLOAD, opts=[EDNSOption(
            EDE_OPTION, struct.pack("!H", code) + text.encode()[:400])]))
    return _with_question(bytes(reply.pack()), packet, question)


def _upstream_failure(packet: bytes, question: Question) -> bytes:
    """SERVFAIL, saying why to a client that speaks EDNS; the details are in the audit log."""
    if not question.edns:
        return error_reply(packet, SERVFAIL, question)
    reply = DNSRecord(DNSHeader(id=0, qr=1, ra=1, rcode=RCODE.SERVFAIL))
    reply.add_ar(EDNS0(udp_len=UPSTREAM_PAYLOAD, opts=[EDNSOption(
        EDE_OPTION, struct.pack("!H", EDE_NO_REACHABLE_AUTHORITY)
        + b"agent-egress: no upstream DNS server answered")]))
    return _with_question(bytes(reply.pack()), packet, question)


def _with_question(packed: bytes, packet: bytes, question: Question) -> bytes:
    """`packed` (an answer packed without its question, or with the same question spelled
    otherwise) as the reply to `packet`: the client's id, RD bit and question, spelled as the
    client spelled it."""
    _, flags, _, *counts = HEADER.unpack_from(packed)
    flags = (flags & ~RD) | (question.flags & RD)
    return packet[:2] + HEADER.pack(0, flags, 1, *counts)[2:] + question.question \
        + packed[records_offset(packed):]
