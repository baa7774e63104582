from __future__ import annotations

import struct

import pytest
from dnslib import EDNS0, DNSRecord

from agent_egress.dns.wire import (
    FORMERR,
    NOTIMP,
    Malformed,
    error_reply,
    parse_query,
)


def header(flags=0x0100, qd=1, an=0, ns=0, ar=0, query_id=0x1234):
    return struct.pack("!HHHHHH", query_id, flags, qd, an, ns, ar)


QUESTION = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"


def test_parses_a_dig_style_query_with_edns():
    packet = DNSRecord.question("WWW.example.test", "AAAA")
    packet.add_ar(EDNS0(udp_len=4096, flags="do"))
    question = parse_query(packet.pack())
    assert (question.name, question.qtype, question.edns, question.udp_payload,
            question.dnssec_ok) == ("WWW.example.test", 28, True, 4096, True)


@pytest.mark.parametrize("packet, rcode, reason", [
    (header(qd=0), FORMERR, "0 questions; expected exactly one"),
    (header(qd=2) + QUESTION * 2, FORMERR, "2 questions; expected exactly one"),
    (header(flags=0x2800) + QUESTION, NOTIMP,
     "only standard queries (opcode QUERY) are supported"),  # UPDATE
    (header(flags=0x1000) + QUESTION, NOTIMP,
     "only standard queries (opcode QUERY) are supported"),  # STATUS
    (header() + QUESTION[:9], FORMERR, "truncated name"),
    (header() + QUESTION[:-2], FORMERR, "truncated question"),
    (header() + b"\xc0\x0c\x00\x01\x00\x01", FORMERR,
     "compressed or extended label in a question"),
    (header() + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f"
     + b"a" * 63 + b"\x00\x00\x01\x00\x01", FORMERR, "name longer than 255 octets"),
    (header(ar=1) + QUESTION + b"\x00\x00\x29", FORMERR, "truncated additional record"),
    (header(ar=2) + QUESTION + (b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00") * 2, FORMERR,
     "more than one OPT record"),
    (header(an=1) + QUESTION, FORMERR, "a query with answer or authority records"),
])
def test_malformed_queries_get_an_rcode(packet, rcode, reason):
    with pytest.raises(Malformed) as raised:
        parse_query(packet)
    assert (raised.value.rcode, str(raised.value)) == (rcode, reason)
    reply = error_reply(packet, raised.value.rcode)
    assert reply[:2] == packet[:2] and reply[3] & 0x0F == rcode and reply[2] & 0x80


@pytest.mark.parametrize("packet", [b"", b"\x12", header()[:11], header(flags=0x8100) + QUESTION])
def test_no_answer_without_an_id_or_to_a_response(packet):
    with pytest.raises(ValueError) as raised:
        parse_query(packet)
    assert not isinstance(raised.value, Malformed)


@pytest.mark.parametrize("labels, name", [
    ([b"WWW", b"x-y_z", b"test"], "WWW.x-y_z.test"),
    ([b"\xdf", b"tunnel", b"test"], "\\223.tunnel.test"),  # Latin-1 sharp s: no A-label
    ([b"\xc3\x9f", b"test"], "\\195\\159.test"),  # UTF-8 bytes, not an A-label either
    ([b"a.b", b"test"], "a\\046b.test"),  # one label with a dot is not two labels
    ([b"a\\b"], "a\\092b"), ([b"a b"], "a\\032b"), ([b"\x00"], "\\000"),
])
def test_odd_label_bytes_are_escaped_so_no_other_name_is_read(labels, name):
    packet = header() + b"".join(bytes([len(label)]) + label for label in labels) \
        + b"\x00\x00\x01\x00\x01"
    assert parse_query(packet).name == name
