"""The per-account DNS policy: a name is answered only if the client's account may reach it.

Denied names get NXDOMAIN with an Extended DNS Error (RFC 8914) naming the account and rule, and
are never forwarded. Allowed (and, in learning mode, would-be-denied) names are forwarded, and
A/AAAA answers pointing at internal addresses are removed unless a `cidr` rule allows them, so
that an allowed name cannot be rebound to the inside. Answers are cached packed, per account and
policy, for their TTL.

Every query is decided and recorded by the gate (agent_egress/gate.py), as the proxy's
connections are: one identity lookup, one decision, one audit event. The hot path does little
else: a packet already seen (whatever its id) is not parsed again, and a cached answer is sent
with its TTLs counted down in place, without dnslib. The UDP server hands datagrams over in
batches (`begin_batch`/`end_batch`): a client asking several questions in one batch is looked up
once, and the batch's audit events are queued together, so that the audit thread wakes once per
batch rather than once per query.
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
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

from agent_egress.clients import Client
from agent_egress.gate import Gate
from agent_egress.identity import SocketOwner, SocketOwners, user_name
from agent_egress.rules import (
    Address,
    Decision,
    HostError,
    Identity,
    Mode,
    Name,
    Policy,
    Stage,
    normalize_host,
)
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
    def __init__(self, gate: Gate, upstream: DnsServers) -> None:
        self.gate = gate
        self.runtime = gate.runtime
        self.upstream = upstream
        self.memory = self.runtime.memory  # shared with the proxy, for transparent raw TCP
        self.signals = TunnelSignals()
        self._cache: OrderedDict[tuple[object, ...], _Cached] = OrderedDict()
        self._asked: dict[bytes, _Asked] = {}  # packet without its id -> what it asks
        self._sources: dict[str, Address] = {}  # client addresses, normalised
        self._identities: dict[tuple[int | None, str], Identity] = {}  # (uid, address) ->
        self._batch_owners: dict[tuple[object, ...], SocketOwner | None] | None = None

    def begin_batch(self) -> None:
        """Until end_batch: queries that the caller had all received before this call. Their
        socket owners are looked up once per client address, and their audit events held.

        Looking a client up once for all its queries in the batch is as exact as a lookup per
        query: every lookup already comes after the datagram arrived (the kernel can only say
        who holds the client's port now, not who sent it), and these datagrams had all arrived
        before the first lookup. A port that changed hands meanwhile misleads a lookup per
        query just the same, and one that changes hands later cannot have sent any of them."""
        self._batch_owners = {}
        self.gate.begin_batch()

    def end_batch(self) -> None:
        """Queues the batch's audit events, in order, each with the time of its query."""
        self._batch_owners = None
        self.gate.end_batch()

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
        who = self._client(client, server, protocol)  # class IN only
        if who.process is not None and not who.process.done():
            return self._attributed(packet, asked, who, protocol, started)
        return self._answer(packet, asked, who, protocol, started)

    async def _attributed(self, packet: bytes, asked: _Asked, who: Client, protocol: int,
                          started: float) -> bytes | None:
        """The answer once the client's process is known (or a bounded wait is over): the
        first query on a socket waits for it, so that its audit line names the process."""
        await self.gate.attribute(who)
        try:
            reply = self._answer(packet, asked, who, protocol, started)
        except Exception:
            log.exception("resolver failed on a query for %r", asked.question.name)
            return error_reply(packet, SERVFAIL, asked.question)
        return reply if reply is None or isinstance(reply, bytes) else await reply

    def _answer(self, packet: bytes, asked: _Asked, who: Client, protocol: int,
                started: float) -> Reply:
        question, qtype, host = asked.question, asked.qtype, asked.host
        policy = self.runtime.policies.current
        decision = self.gate.decide(policy, who.identity, question.name, None, Stage.DNS)
        event = _Event(self.gate, policy, who, host or question.name, qtype, started)
        if host is not None and decision.account:
            event.signals = self.signals.observe(decision.account, host.text,
                                                 host.parents[0] if host.parents else None, qtype)
            for signal in event.signals:
                self.runtime.metrics.dns_suspicious.labels(decision.account, signal).inc()
        if not decision.passes:
            if decision.unmatched and decision.mode is Mode.ASK:
                decision = self.gate.ask_later(decision, host.text if host else question.name)
            event.write(decision)
            code = EDE_BLOCKED if decision.account else EDE_PROHIBITED
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
            refused = self.gate.refuse(decision, f"{question.name!r} is not the name that was "
                                       "decided (an IP address, or another spelling): not "
                                       "forwarded")
            event.write(refused)
            return _denial(packet, question, refused, EDE_BLOCKED)
        try:
            upstream = DNSRecord(DNSHeader(id=secrets.randbits(16), rd=1),
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

    def _client(self, client: tuple[str, int], server: tuple[str, int],
                protocol: int) -> Client:
        """Who the client is: the kernel's word on the socket's owner, and its address."""
        source = self._sources.get(client[0])
        if source is None:
            host = normalize_host(client[0])
            if isinstance(host, Name):
                raise ValueError(f"not a client address: {client[0]!r}")
            if len(self._sources) >= MEMO_ENTRIES:
                self._sources.clear()
            source = self._sources[client[0]] = host
        owners = self.runtime.owners
        owner = None if owners is None else self._owner(owners, client, server, protocol)
        uid = None if owner is None else owner.uid
        identity = self._identities.get((uid, client[0]))
        if identity is None:
            identity = Identity(source=source) if uid is None else Identity(
                uid=uid, user=user_name(uid), source=source)
            if len(self._identities) >= MEMO_ENTRIES:
                self._identities.clear()
            self._identities[(uid, client[0])] = identity
        client_host = f"[{client[0]}]" if ":" in client[0] else client[0]
        process = None if owner is None else self.gate.clients.process_of(owner)
        return Client(f"{client_host}:{client[1]}", identity, process=process)

    def _owner(self, owners: SocketOwners, client: tuple[str, int], server: tuple[str, int],
               protocol: int) -> SocketOwner | None:
        batch = self._batch_owners
        key = (client, server, protocol)
        if batch is not None and key in batch:
            return batch[key]
        owner = owners.resolver_client_owner(client, server, protocol)
        if batch is not None:
            batch[key] = owner
        return owner


class _Event:
    """One audit event per query, written once its outcome is known."""

    __slots__ = ("client", "gate", "host", "policy", "qtype", "signals", "started")

    def __init__(self, gate: Gate, policy: Policy, client: Client, host: Name | str,
                 qtype: str, started: float) -> None:
        self.gate = gate
        self.policy = policy
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
        self.gate.record(Stage.DNS, self.client, decision, self.host, None, None,
                         policy=self.policy, reason=reason, qtype=self.qtype,
                         duration_ms=round((time.monotonic() - self.started) * 1000, 3))


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
