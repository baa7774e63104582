"""The audit event as OCSF (agent_egress/ocsf.py): the mapping, lossless both ways, valid
against the OCSF schema, and read by learn, replay and report as the JSON-lines form is."""

from __future__ import annotations

import json
import os
import string
import subprocess
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema
from support.proxy import RunningProxy, wait_until

from agent_egress import ocsf
from agent_egress.auditevent import KEYS, AuditEvent, rfc3339
from agent_egress.auditread import parse_line, read_events
from agent_egress.rules import Mode, Result, Stage


@cache
def validator(class_uid: int) -> Draft202012Validator:
    """The OCSF schema of that class, with the profiles the events declare, as JSON Schema
    (ocsf-json-schema: the published schemas, packaged; nothing is fetched)."""
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=ocsf.OCSF_VERSION))
    name = schema.lookup_class_name_from_uid(class_uid=class_uid)
    return Draft202012Validator(schema.get_class_schema(class_name=name,
                                                        profiles=ocsf.PROFILES),
                                format_checker=FormatChecker())


def schema_errors(record: dict[str, Any]) -> list[str]:
    return [f"{e.json_path}: {e.message}"
            for e in validator(record["class_uid"]).iter_errors(record)]


def sample(**fields: Any) -> AuditEvent:
    base: dict[str, Any] = dict(
        ts="2026-11-25T10:00:00.123Z", event=Stage.REQUEST, account="codex",
        client="127.0.0.1:40001", uid=1001, user="codex", pid=4242, exe="/usr/bin/curl",
        cmdline="curl http://web.test/x", host="web.test", port=80, ip="127.0.0.1",
        method="GET", path="/x", decision=Result.ALLOW, rule="policy.yaml:7",
        reason="allowed by rule: host web.test", mode=Mode.ENFORCE, policy="3f2a9c",
        bytes_up=120, bytes_down=4096, duration_ms=12, rule_id="codex-web", op="git-fetch",
        ancestry=["/usr/bin/curl[4242]", "/usr/bin/bash[4000]"], credential="ci-token",
        approval="req-7")
    base.update(fields)
    return AuditEvent(**base)


# The mapping, attribute by attribute

def test_a_request_is_http_activity_with_every_key_in_its_standard_place():
    record = ocsf.record(sample())
    assert schema_errors(record) == []
    assert (record["class_uid"], record["activity_id"], record["type_uid"]) == (4002, 3, 400203)
    assert (record["time"], record["time_dt"]) == (1795600800123, "2026-11-25T10:00:00.123Z")
    assert record["metadata"]["product"]["name"] == "agent-egress"
    assert record["metadata"]["version"] == ocsf.OCSF_VERSION
    assert (record["action"], record["disposition"], record["status"]) == (
        "Allowed", "Allowed", "Success")
    assert record["actor"] == {
        "user": {"uid": "1001", "name": "codex",
                 "account": {"name": "codex", "type_id": 99, "type": "agent-egress account"}},
        "process": {"pid": 4242, "name": "curl", "cmd_line": "curl http://web.test/x",
                    "file": {"path": "/usr/bin/curl", "name": "curl", "type_id": 1},
                    "ancestry": [{"path": "/usr/bin/curl", "pid": 4242},
                                 {"path": "/usr/bin/bash", "pid": 4000}]}}
    assert record["src_endpoint"] == {"ip": "127.0.0.1", "port": 40001}
    assert record["dst_endpoint"] == {"hostname": "web.test", "ip": "127.0.0.1", "port": 80}
    assert record["http_request"] == {"http_method": "GET", "url": {
        "path": "/x", "hostname": "web.test", "port": 80}}
    assert record["firewall_rule"] == {"uid": "codex-web", "name": "policy.yaml:7"}
    assert record["status_detail"] == "allowed by rule: host web.test"
    assert record["policy"]["uid"] == "3f2a9c"
    assert record["traffic"] == {"bytes_out": 120, "bytes_in": 4096, "bytes": 4216}
    assert record["duration"] == 12
    assert record["unmapped"] == {"mode": "enforce", "op": "git-fetch",
                                  "credential": "ci-token", "approval": "req-7"}


@pytest.mark.parametrize(("decision", "action", "disposition", "unmapped"), [
    (Result.ALLOW, "Allowed", "Allowed", None),
    (Result.DENY, "Denied", "Blocked", None),
    (Result.WOULD_DENY, "Allowed", "Allowed", "would_deny"),  # it passed; no rule allowed it
])
def test_decisions_are_action_and_disposition(decision, action, disposition, unmapped):
    record = ocsf.record(sample(decision=decision, op=None, credential=None, approval=None,
                                mode=Mode.LEARN))
    assert (record["action"], record["disposition"]) == (action, disposition)
    assert record["unmapped"].get("decision") == unmapped
    assert schema_errors(record) == []


@pytest.mark.parametrize(("fields", "class_uid", "activity", "where"), [
    ({"event": Stage.CONNECT, "method": None, "path": None, "port": 443},
     4001, "Traffic", "dst_endpoint"),
    ({"event": Stage.CONNECT, "method": None, "path": None, "decision": Result.DENY},
     4001, "Refuse", "dst_endpoint"),
    ({"event": Stage.DNS, "method": None, "path": None, "port": None, "ip": None,
      "qtype": "AAAA"}, 4003, "Query", "query"),
    ({"method": "PATCH"}, 4002, "Other", "http_request"),
    ({"method": "POST"}, 4002, "Post", "http_request"),
])
def test_each_stage_is_its_class(fields, class_uid, activity, where):
    record = ocsf.record(sample(**fields))
    assert (record["class_uid"], record["activity_name"]) == (class_uid, activity)
    assert where in record
    assert schema_errors(record) == []
    assert ocsf.event(record) == sample(**fields)


@pytest.mark.parametrize("change", [
    lambda r: r.update(destination=r.pop("dst_endpoint")),  # a name OCSF does not have
    lambda r: r["actor"]["process"].update(pid="4242"),
    lambda r: r.update(disposition_id=42),
    lambda r: r.update(time_dt="25 Nov 2026"),
    lambda r: r["metadata"].pop("version"),
    lambda r: r.pop("http_request"),
])
def test_the_schema_check_is_strict(change):
    """What the tests validate with would catch a mapping that is wrong."""
    record = ocsf.record(sample())
    change(record)
    assert schema_errors(record) != []


def test_a_dns_query_names_the_query_not_a_destination():
    record = ocsf.record(sample(event=Stage.DNS, method=None, path=None, port=None, ip=None,
                                qtype="TXT", host="x.evil.test"))
    assert record["query"] == {"hostname": "x.evil.test", "type": "TXT"}
    assert "dst_endpoint" not in record


def test_what_ocsf_cannot_hold_as_written_stays_in_unmapped():
    odd = sample(method="PROPFIND", client="not an address", ancestry=["no pid here"],
                 duration_ms=0.125, ts="yesterday")
    record = ocsf.record(odd)
    assert {k: record["unmapped"][k] for k in ("method", "client", "ancestry", "duration_ms",
                                               "ts")} == {
        "method": "PROPFIND", "client": "not an address", "ancestry": ["no pid here"],
        "duration_ms": 0.125, "ts": "yesterday"}
    assert ocsf.event(record) == odd


def test_the_query_string_never_reaches_the_ocsf_line_either():
    line = ocsf.line(sample(path="/search?token=s3cr3t"))
    assert "s3cr3t" not in line and parse_line(line).path == "/search"


# Lossless both ways

_text = st.text(max_size=12)
_names = st.text(alphabet=string.ascii_lowercase + string.digits + ".-", min_size=1,
                 max_size=30)


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    return rfc3339(draw(st.datetimes(timezones=st.just(__import__("datetime").UTC))))


def events(realistic: bool) -> st.SearchStrategy[AuditEvent]:
    """Any event (`realistic`: as the gate writes them, with a client address, a host,
    plain names), every key drawn, None included."""
    def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return strategy if realistic else st.none() | strategy

    text = _names if realistic else _text
    ints = st.integers(min_value=0, max_value=2**31) if realistic else st.integers()
    client = st.builds(lambda ip, port: f"{ip}:{port}", st.ip_addresses(v=4).map(str),
                       st.integers(0, 65535)) | st.builds(
        lambda ip, port: f"[{ip}]:{port}", st.ip_addresses(v=6).map(str), st.integers(0, 65535))
    ancestor = st.builds(lambda exe, pid: f"{exe}[{pid}]", text, st.integers(0, 2**22))
    return st.builds(
        AuditEvent,
        ts=timestamps() if realistic else timestamps() | _text,
        event=st.sampled_from(Stage), decision=st.sampled_from(Result),
        account=maybe(text), client=client if realistic else st.none() | client | _text,
        uid=maybe(ints), user=maybe(text), pid=maybe(ints), exe=maybe(text),
        cmdline=st.none() | st.text(max_size=40), host=text if realistic else st.none() | text,
        port=maybe(st.integers(0, 65535)), ip=maybe(st.ip_addresses().map(str)),
        method=maybe(st.sampled_from(["GET", "POST", "PATCH", "CONNECT", "BREW"])),
        path=maybe(st.text(max_size=20).map(lambda p: "/" + p.replace("?", ""))),
        qtype=maybe(st.sampled_from(["A", "AAAA", "TXT"])), rule=maybe(text),
        reason=maybe(st.text(max_size=40)), mode=maybe(st.sampled_from(Mode)),
        policy=maybe(text), bytes_up=maybe(ints), bytes_down=maybe(ints),
        duration_ms=maybe(ints | st.floats(min_value=0, max_value=1e9)),
        rule_id=maybe(text), op=maybe(text),
        ancestry=maybe(st.lists(ancestor if realistic else ancestor | _text, max_size=3)),
        credential=maybe(text), approval=maybe(text))


@settings(max_examples=300)
@given(events(realistic=False))
def test_audit_event_to_ocsf_and_back_is_the_identity(event):
    assert ocsf.event(ocsf.record(event)) == event
    line = ocsf.line(event)
    assert line.isascii() and line.count("\n") == 1
    assert parse_line(line) == event == parse_line(event.line())
    assert {type(getattr(parse_line(line), key)) for key in KEYS} == \
        {type(getattr(event, key)) for key in KEYS}


@settings(max_examples=200)
@given(events(realistic=True))
def test_every_event_the_gate_can_write_is_valid_ocsf(event):
    assert schema_errors(ocsf.record(event)) == []


# Reading OCSF lines: what is not ours, or broken, is reported and skipped

@pytest.mark.parametrize(("change", "problem"), [
    (lambda r: r.update(class_uid=1001), "not an agent-egress OCSF event (class_uid 1001"),
    (lambda r: r["metadata"]["product"].update(name="other"), "(product 'other')"),
    (lambda r: r.update(disposition_id=3), "disposition_id 3, expected 1 (Allowed)"),
    (lambda r: r["dst_endpoint"].update(port="80"), "port is str, expected int"),
    (lambda r: r.update(actor=[]), "actor is list, expected object"),
    (lambda r: r["actor"]["user"].update(uid="root"), "actor.user.uid is 'root'"),
    (lambda r: r.update(unmapped={"colour": "red"}), "unknown keys ['colour']"),
    (lambda r: r.update(unmapped={"event": "dns"}), "the class says what the event is"),
])
def test_a_broken_ocsf_line_is_reported_with_its_line_number(tmp_path, change, problem):
    broken = ocsf.record(sample())
    change(broken)
    log = tmp_path / "audit.jsonl"
    log.write_text(ocsf.line(sample()) + json.dumps(broken) + "\n" + sample().line())
    complaints: list[str] = []
    assert list(read_events([str(log)], complaints.append)) == [sample(), sample()]
    assert len(complaints) == 1 and complaints[0].startswith(f"{log}:2: ")
    assert problem in complaints[0]


def test_formats_by_name():
    assert ocsf.formatter("jsonl")(sample()) == sample().line()
    assert ocsf.formatter("ocsf")(sample()) == ocsf.line(sample())
    with pytest.raises(ValueError, match="unknown audit format 'xml'"):
        ocsf.formatter("xml")


# The real proxy writing OCSF, and the offline tools reading it

def policy_for(web: int, secure: int, *, candidate: bool = False) -> str:
    """The policy the proxy runs, in learning mode (`candidate`: the change replay is asked
    about, enforcing and without web.test)."""
    web_rule = "" if candidate else f"      - host: web.test\n        ports: [{web}]\n"
    mode = "enforce" if candidate else "learn"
    return f"""version: 1
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    mode: {mode}
    allow:
{web_rule}      - host: secure.test
        ports: [{secure}]
      - cidr: 127.0.0.1/32
        ports: [{web}, {secure}]
    deny:
      - host: denied.test
"""


def offline(cli: str, *args: str, stdin: str) -> tuple[int, str, str]:
    done = subprocess.run([cli, *args, "-"], input=stdin, capture_output=True, text=True,
                          timeout=60)
    return done.returncode, done.stdout, done.stderr


def test_the_proxy_writes_valid_ocsf_that_the_tools_read_as_json_lines(cli, tmp_path, dns, web,
                                                                       secure, test_ca):
    proxy = RunningProxy(cli, tmp_path, policy_for(web.port, secure.port), "--upstream-dns",
                         dns.address, "--audit-format", "ocsf")
    try:
        proxy.wait_for(r"audit log \S+ \(OCSF\)")
        for name in ("web.test", "denied.test"):
            subprocess.run(["dig", "+time=3", "+tries=1", "-p", str(proxy.dns_port),
                            "@127.0.0.1", name, "A"], capture_output=True, timeout=30,
                           check=True)
        for url, code in ((f"http://web.test:{web.port}/hello", "200"),
                          (f"http://denied.test:{web.port}/", "403"),
                          (f"http://other.test:{web.port}/learned", "200"),
                          (f"https://secure.test:{secure.port}/tunnel", "200"),
                          (f"https://denied.test:{secure.port}/", "000")):
            done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                   "--max-time", "20", "--cacert", str(test_ca.ca_file),
                                   "-x", proxy.url, url], capture_output=True, text=True,
                                  timeout=30)
            assert done.stdout == code, (url, done.stdout, done.stderr)
        assert wait_until(lambda: len(proxy.events()) >= 7)
    finally:
        assert proxy.stop() == 0
    written = proxy.audit_log.read_text()
    records = [json.loads(line) for line in written.splitlines()]
    assert all(schema_errors(record) == [] for record in records), \
        [(record, schema_errors(record)) for record in records if schema_errors(record)]
    seen = {(r["class_name"], r["disposition"], r.get("query", r.get("dst_endpoint", {}))
             .get("hostname")) for r in records}
    assert seen >= {("DNS Activity", "Allowed", "web.test"),
                    ("DNS Activity", "Blocked", "denied.test"),
                    ("HTTP Activity", "Allowed", "web.test"),
                    ("HTTP Activity", "Blocked", "denied.test"),
                    ("HTTP Activity", "Allowed", "other.test"),
                    ("Network Activity", "Allowed", "secure.test"),
                    ("Network Activity", "Blocked", "denied.test")}
    assert [r["unmapped"]["decision"] for r in records if "decision" in r.get("unmapped", {})] \
        == ["would_deny"]
    assert any(r.get("actor", {}).get("process", {}).get("file", {}).get("path", "")
               .endswith("/curl") for r in records if r["class_uid"] == 4002)

    # the same events as JSON lines; `report --format ocsf` turns them back into the same OCSF
    as_jsonl = "".join(parse_line(line).line() for line in written.splitlines())
    assert offline(cli, "report", "--format", "ocsf", stdin=as_jsonl) == (0, written, "")
    # learn, replay and report say the same over either form
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(policy_for(web.port, secure.port, candidate=True))
    for command in (["report"], ["report", "--format", "json"], ["report", "--format", "csv"],
                    ["learn", "--policy", str(proxy.policy_file)],
                    ["replay", "--policy", str(candidate)]):
        over_jsonl = offline(cli, *command, stdin=as_jsonl)
        assert over_jsonl[1] and over_jsonl[2] == "", (command, over_jsonl)
        assert offline(cli, *command, stdin=written) == over_jsonl, command
    assert offline(cli, "replay", "--policy", str(candidate), stdin=written)[0] == 1
    learned = offline(cli, "learn", "--policy", str(proxy.policy_file), stdin=written)[1]
    assert "other.test" in learned
