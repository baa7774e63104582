"""The parts of the DNS wire format the resolver reads itself: a query's header, its one
question and its EDNS OPT record. Queries are small and fixed in shape, so this is faster than
a general parser and, being strict, turns every malformed packet into a clear rcode."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
QR = 0x8000
RD = 0x0100
RA = 0x0080
TC = 0x0200
OPCODE_SHIFT = 11
TYPE_OPT = 41
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
MIN_UDP_PAYLOAD = 512
MAX_NAME_WIRE = 255


class Malformed(ValueError):
    """A packet to answer with `rcode` (FORMERR, NOTIMP, ...) and no more."""

    def __init__(self, rcode: int, reason: str) -> None:
        super().__init__(reason)
        self.rcode = rcode


@dataclass(frozen=True, slots=True)
class Question:
    """Everything but the id (the packet's first two bytes): a repeated query, whatever its
    id, is the same Question."""

    flags: int
    name: str  # as asked, without the trailing dot, odd bytes escaped; "" for the root
    qtype: int
    qclass: int
    question: bytes  # the question section as the client sent it (case preserved)
    edns: bool
    udp_payload: int  # how large a UDP answer the client accepts
    dnssec_ok: bool


def parse_query(packet: bytes) -> Question:
    """Raises Malformed; raises ValueError (no answer at all) for a packet too short to carry
    an id, or one that is itself a response."""
    if len(packet) < HEADER.size:
        raise ValueError("shorter than a DNS header")
    _, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(packet)
    if flags & QR:
        raise ValueError("a response, not a query")
    if (flags >> OPCODE_SHIFT) & 0xF != 0:
        raise Malformed(NOTIMP, "only standard queries (opcode QUERY) are supported")
    if qdcount != 1:
        raise Malformed(FORMERR, f"{qdcount} questions; expected exactly one")
    if ancount or nscount:
        raise Malformed(FORMERR, "a query with answer or authority records")
    labels, offset = _read_name(packet, HEADER.size)
    if offset + 4 > len(packet):
        raise Malformed(FORMERR, "truncated question")
    qtype, qclass = struct.unpack_from("!HH", packet, offset)
    end = offset + 4
    edns, udp_payload, dnssec_ok = False, MIN_UDP_PAYLOAD, False
    for _ in range(arcount):
        name_end = end + 1
        if name_end + 10 > len(packet):
            raise Malformed(FORMERR, "truncated additional record")
        rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", packet, name_end)
        if packet[end] == 0 and rtype == TYPE_OPT:
            if edns:
                raise Malformed(FORMERR, "more than one OPT record")
            edns, udp_payload = True, max(rclass, MIN_UDP_PAYLOAD)
            dnssec_ok = bool(ttl & 0x8000)
        end = name_end + 10 + rdlength
        if end > len(packet):
            raise Malformed(FORMERR, "truncated additional record")
    name = ".".join(_label_text(label) for label in labels)
    return Question(flags, name, qtype, qclass, packet[HEADER.size:offset + 4], edns,
                    udp_payload, dnssec_ok)


def _label_text(label: bytes) -> str:
    """A label as text that names it alone: printable ASCII as it is, and every other byte,
    a dot inside the label and a backslash as `\\DDD` (the zone-file escape). The name is
    then no valid host name, so it is denied, never decided as one spelling (`ß` as
    `xn--zca`) while the upstream reads another (`ss`), nor as two labels when it is one."""
    if _PLAIN_LABEL.fullmatch(label):
        return label.decode("ascii")
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C) else f"\\{b:03d}"
                   for b in label)


_PLAIN_LABEL = re.compile(rb"[!-\-/-\[\]-~]*")  # printable ASCII but '.' and '\'


def _read_name(packet: bytes, offset: int) -> tuple[list[bytes], int]:
    labels: list[bytes] = []
    length = 0
    while True:
        if offset >= len(packet):
            raise Malformed(FORMERR, "truncated name")
        size = packet[offset]
        if size & 0xC0:
            raise Malformed(FORMERR, "compressed or extended label in a question")
        offset += 1
        if size == 0:
            return labels, offset
        length += size + 1
        if length > MAX_NAME_WIRE:
            raise Malformed(FORMERR, "name longer than 255 octets")
        labels.append(packet[offset:offset + size])
        offset += size


def error_reply(packet: bytes, rcode: int, question: Question | None = None) -> bytes:
    """A header-only (or header and question) answer carrying `rcode`."""
    query_id, flags = struct.unpack_from("!HH", packet)
    flags = QR | (flags & (0xF << OPCODE_SHIFT)) | (flags & RD) | RA | rcode
    body = question.question if question is not None else b""
    return HEADER.pack(query_id, flags, 1 if question is not None else 0, 0, 0, 0) + body


def truncated(reply: bytes, question: Question) -> bytes:
    """The header and question of `reply` with TC set: the client retries over TCP."""
    query_id, flags = struct.unpack_from("!HH", reply)
    return HEADER.pack(query_id, flags | TC, 1, 0, 0, 0) + question.question


def ttl_offsets(message: bytes) -> list[int]:
    """Where the TTL of each record is in a packed message (one we packed ourselves, so well
    formed), in the order of the records; OPT pseudo-records, whose TTL field holds flags, are
    left out. Lets a cached answer count its TTLs down without being packed again."""
    _, _, qdcount, *counts = HEADER.unpack_from(message)
    offset = HEADER.size
    for _ in range(qdcount):
        offset = _skip_name(message, offset) + 4
    found = []
    for _ in range(sum(counts)):
        offset = _skip_name(message, offset)
        rtype, _, _, rdlength = struct.unpack_from("!HHIH", message, offset)
        if rtype != TYPE_OPT:
            found.append(offset + 4)
        offset += 10 + rdlength
    return found


def records_offset(message: bytes) -> int:
    """Where the records of a packed message (one we packed ourselves) start: after its
    header and question. An answer packed with the question it answers is spliced after the
    client's own spelling of that question, of the same length, so that its compression
    pointers stay right."""
    _, _, qdcount, *_ = HEADER.unpack_from(message)
    offset = HEADER.size
    for _ in range(qdcount):
        offset = _skip_name(message, offset) + 4
    return offset


def _skip_name(message: bytes, offset: int) -> int:
    while True:
        size = message[offset]
        if size & 0xC0:
            return offset + 2  # a compression pointer ends the name
        offset += 1 + size
        if size == 0:
            return offset
