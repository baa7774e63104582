"""The per-account DNS policy: a name is answered only if the client's account may reach it.

Denied names get NXDOMAIN with an Extended DNS Error (RFC 8914) naming the account and rule, and
are never forwarded. Allowed (and, in learning mode, would-be-denied) names are forwarded, and
A/AAAA answers pointing at internal addresses are removed unless a `cidr` rule allows them, so
that an allowed name cannot be rebound to the inside. Answers are cached packed, per account and
policy, for their TTL.
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

from agent_egress.identity import user_name
from agent_egress.rules import (
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

from .memory import AnswerMemory
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
    truncated,
)

log = logging.getLogger(__name__)

EDE_OPTION = 15
EDE_BLOCKED = 15  # the operator's policy blocks the name
EDE_PROHIBITED = 18  # the client itself is not allowed to ask
UPSTREAM_PAYLOAD = 1232
ADDRESS_TYPES = (QTYPE.A, QTYPE.AAAA)
NEGATIVE_TTL = 30
MAX_TTL = 3600
CACHE_ENTRIES = 10_000

Reply = bytes | None | Coroutine[Any, Any, bytes | None]


@dataclass(eq=False)
class _Cached:
    record: DNSRecord
    ttls: list[int]
    stored: float
    lifetime: int
    notes: str
    packed: bytes = b""
    packed_second: int = -1

    def pack(self, now: float) -> bytes | None:
        """The answer with its TTLs counted down, or None once it has expired."""
        elapsed = int(now - self.stored)
        if elapsed >= self.lifetime:
            return None
        if elapsed != self.packed_second:
            for rr, ttl in zip(self._records(), self.ttls, strict=True):
                rr.ttl = max(ttl - elapsed, 0)
            self.packed, self.packed_second = self.record.pack(), elapsed
        return self.packed

    def _records(self) -> list[RR]:
        return [rr for rr in (*self.record.rr, *self.record.auth, *self.record.ar)
                if rr.rtype != QTYPE.OPT]


class PolicyResolver:
    def __init__(self, runtime: Runtime, upstream: DnsServers,
                 memory: AnswerMemory | None = None) -> None:
        self.runtime = runtime
        self.upstream = upstream
        self.memory = memory or AnswerMemory()
        self.signals = TunnelSignals()
        self._cache: OrderedDict[tuple[object, ...], _Cached] = OrderedDict()

    def handle(self, packet: bytes, client: tuple[str, int], server: tuple[str, int],
               protocol: int) -> Reply:
        """The reply to `packet`, at once or as a coroutine that forwards it. Never raises."""
        started = time.monotonic()
        try:
            question = parse_query(packet)
        except Malformed as e:
            return error_reply(packet, e.rcode)
        except ValueError:
            return None  # no id to answer, or not a query: silence
        try:
            return self._decide(packet, question, client, server, protocol, started)
        except Exception:
            log.exception("resolver failed on a query for %r", question.name)
            return error_reply(packet, SERVFAIL, question)

    def _decide(self, packet: bytes, question: Question, client: tuple[str, int],
                server: tuple[str, int], protocol: int, started: float) -> Reply:
        if question.qclass != CLASS.IN:
            return error_reply(packet, REFUSED, question)
        policy = self.runtime.policies.current
        identity = self._identity(client, server, protocol)
        choice = policy.account_for(identity)
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        host = _name_or_none(question.name)
        if choice.account is None:
            decision = Decision(Result.DENY, None, choice.reason, "", Mode.ENFORCE)
        else:
            decision = self.runtime.metrics.decide(
                policy, Query(choice.account, question.name, None, Stage.DNS))
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
        key = (policy.digest, decision.account, question.name.lower(), question.qtype,
               question.dnssec_ok, question.edns)
        cached = self._cache.get(key)
        if cached is not None:
            packed = cached.pack(time.monotonic())
            if packed is not None:
                self._cache.move_to_end(key)
                event.write(decision, cached.notes)
                return _for_client(packed, packet, question, protocol)
            del self._cache[key]
        return self._forward(packet, question, decision, policy, key, event, protocol)

    async def _forward(self, packet: bytes, question: Question, decision: Decision,
                       policy: Policy, key: tuple[object, ...], event: _Event,
                       protocol: int) -> bytes | None:
        try:
            upstream = DNSRecord(DNSHeader(id=random.getrandbits(16), rd=1),
                                 q=DNSQuestion(question.name, question.qtype, question.qclass))
            upstream.add_ar(EDNS0(udp_len=UPSTREAM_PAYLOAD,
                                  flags="do" if question.dnssec_ok else ""))
            answer = DNSRecord.parse(await self.upstream.exchange(upstream.pack()))
            if (len(answer.questions) != 1 or answer.q.qtype != question.qtype
                    or str(answer.q.qname).rstrip(".").lower() != question.name.lower()):
                raise ResolveError("the upstream answered another question")
        except (ResolveError, DNSError, ValueError, struct.error) as e:
            event.write(decision, f"upstream failed: {e}")
            return error_reply(packet, SERVFAIL, question)
        except Exception:
            log.exception("forwarding %r failed", question.name)
            return error_reply(packet, SERVFAIL, question)
        record, removed = self._filtered(answer, decision.account, question, policy)
        notes = f"removed internal answers: {', '.join(removed)}" if removed else ""
        event.write(decision, notes)
        entry = _cache_entry(record, notes)
        packed = entry.pack(time.monotonic())
        if packed is None:
            packed = record.pack()
        else:
            self._cache[key] = entry
            if len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return _for_client(packed, packet, question, protocol)

    def _filtered(self, answer: DNSRecord, account: str, question: Question,
                  policy: Policy) -> tuple[DNSRecord, list[str]]:
        """The answer for the client: internal addresses the account may not reach removed,
        the rest remembered for transparent mode."""
        removed: list[str] = []
        name = question.name

        def keep(rr: RR) -> bool:
            if rr.rtype not in ADDRESS_TYPES:
                return bool(rr.rtype != QTYPE.OPT)
            address = ip_address(str(rr.rdata))
            if policy.decide_address(account, name, address, None).passes:
                self.memory.remember(account, name.lower().rstrip("."), address, rr.ttl)
                return True
            removed.append(str(address))
            return False

        header = DNSHeader(id=0, qr=1, ra=1, rd=1, rcode=answer.header.rcode,
                           ad=answer.header.ad)
        record = DNSRecord(header, rr=[rr for rr in answer.rr if keep(rr)],
                           auth=[rr for rr in answer.auth if keep(rr)],
                           ar=[rr for rr in answer.ar if keep(rr)])
        if question.edns:  # a client that sent no OPT record must not get one (RFC 6891)
            record.add_ar(EDNS0(udp_len=UPSTREAM_PAYLOAD))
        return record, removed

    def _identity(self, client: tuple[str, int], server: tuple[str, int],
                  protocol: int) -> Identity:
        source = normalize_host(client[0])
        assert not isinstance(source, Name)
        owners = self.runtime.owners
        if owners is None or not source.is_loopback:
            return Identity(source=source)
        owner = owners.owner(client, server, protocol)
        if owner is None:
            return Identity(source=source)
        return Identity(uid=owner.uid, user=user_name(owner.uid), source=source)


class _Event:
    """One audit event per query, written once its outcome is known."""

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
        self.resolver.runtime.metrics.count(decision, "dns")
        self.resolver.runtime.audit.record(
            event="dns", account=decision.account or None, client=f"{client_host}:"
            f"{self.client[1]}", uid=self.identity.uid, user=self.identity.user,
            host=str(self.host), qtype=self.qtype, decision=decision.result.value,
            rule=decision.rule, reason=reason,
            mode=decision.mode.value if decision.account else None, policy=self.policy.digest,
            duration_ms=round((time.monotonic() - self.started) * 1000, 3))


def _name_or_none(text: str) -> Name | None:
    try:
        host = normalize_host(text)
    except HostError:
        return None
    return host if isinstance(host, Name) else None


def _cache_entry(record: DNSRecord, notes: str) -> _Cached:
    records = [rr for rr in (*record.rr, *record.auth, *record.ar) if rr.rtype != QTYPE.OPT]
    ttls = [rr.ttl for rr in records]
    if record.rr:
        lifetime = min(rr.ttl for rr in record.rr)
    else:  # negative answers: the SOA's minimum, else a short default (RFC 2308)
        soa = [rr for rr in record.auth if rr.rtype == QTYPE.SOA]
        lifetime = min(soa[0].ttl, soa[0].rdata.times[-1]) if soa else NEGATIVE_TTL
    return _Cached(record, ttls, time.monotonic(), min(lifetime, MAX_TTL), notes)


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


def _with_question(packed: bytes, packet: bytes, question: Question) -> bytes:
    """`packed` (an answer packed without its question) as the reply to `packet`: the client's
    id, RD bit and question, spelled as the client spelled it."""
    _, flags, _, *counts = HEADER.unpack_from(packed)
    flags = (flags & ~RD) | (question.flags & RD)
    return packet[:2] + HEADER.pack(0, flags, 1, *counts)[2:] + question.question \
        + packed[HEADER.size:]
