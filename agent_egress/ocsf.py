"""The audit event as an OCSF 1.x event, both ways (`run --audit-format ocsf`, `report --format
ocsf`; the readers take either form).

A `request` is HTTP Activity (4002), a `connect` Network Activity (4001), a `dns` query DNS
Activity (4003), with the host, security_control and datetime profiles. Each key of the
AuditEvent goes to its standard attribute: the client process and user to `actor`, the client
address to `src_endpoint`, the destination to `dst_endpoint` (a DNS name to `query`), method
and path to `http_request`, the decision to `action`/`disposition` (`would_deny` passed, so
Allowed, with `unmapped.decision` saying what it was), the rule to `firewall_rule`, the
reason to `status_detail`, the policy hash to `policy.uid`, the byte counts to `traffic`, `ts`
to `time` (epoch ms) and, as written, `time_dt`. What has no standard place (mode, op,
credential, approval, anything not in the form OCSF gives it) is kept in `unmapped` under its
own key, so `event(record(e)) == e` for every event.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from ipaddress import IPv6Address, ip_address
from typing import Any

from . import __version__
from .auditevent import KEYS, AuditEvent
from .rules import Result, Stage

OCSF_VERSION = "1.5.0"
PROFILES = ["host", "security_control", "datetime"]
FORMATS = ("jsonl", "ocsf")

_CATEGORY = (4, "Network Activity")
_CLASSES = {Stage.CONNECT: (4001, "Network Activity"), Stage.REQUEST: (4002, "HTTP Activity"),
            Stage.DNS: (4003, "DNS Activity")}
_STAGES = {uid: stage for stage, (uid, _) in _CLASSES.items()}
_METHODS = {"CONNECT": 1, "DELETE": 2, "GET": 3, "HEAD": 4, "OPTIONS": 5, "POST": 6, "PUT": 7,
            "TRACE": 8}
_HTTP_ACTIVITIES = {0: "Unknown", **{v: k.title() for k, v in _METHODS.items()}, 99: "Other"}
# (action_id, action, disposition_id, disposition, severity_id, severity, status_id, status)
_OUTCOMES = {
    Result.ALLOW: (1, "Allowed", 1, "Allowed", 1, "Informational", 1, "Success"),
    Result.WOULD_DENY: (1, "Allowed", 1, "Allowed", 2, "Low", 1, "Success"),
    Result.DENY: (2, "Denied", 2, "Blocked", 3, "Medium", 2, "Failure"),
}
_PRODUCT = {"name": "agent-egress", "vendor_name": "agent-egress", "version": __version__}
# OCSF's datetime_t
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})?")
_ANCESTOR = re.compile(r"(.*)\[(0|[1-9][0-9]*)\]", re.DOTALL)
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def record(event: AuditEvent) -> dict[str, Any]:
    """The OCSF event for `event`: plain JSON types, no nulls."""
    left = {key: value for key, value in _values(event).items() if value is not None}
    stage = Stage(left.pop("event"))
    decision = Result(left.pop("decision"))
    class_uid, class_name = _CLASSES[stage]
    activity_id, activity = _activity(stage, decision, event.method)
    action_id, action, disposition_id, disposition, severity_id, severity, status_id, status = \
        _OUTCOMES[decision]
    out: dict[str, Any] = {
        "category_uid": _CATEGORY[0], "category_name": _CATEGORY[1],
        "class_uid": class_uid, "class_name": class_name,
        "activity_id": activity_id, "activity_name": activity,
        "type_uid": class_uid * 100 + activity_id, "type_name": f"{class_name}: {activity}",
        "severity_id": severity_id, "severity": severity, "status_id": status_id,
        "status": status, "action_id": action_id, "action": action,
        "disposition_id": disposition_id, "disposition": disposition,
    }
    if decision is Result.WOULD_DENY:  # passed, but no rule allowed it: say so
        left["decision"] = decision.value
    out.update(_time(left))
    out["metadata"] = {"version": OCSF_VERSION, "product": dict(_PRODUCT),
                       "profiles": list(PROFILES), "log_name": "audit"}
    if "reason" in left:
        out["status_detail"] = left.pop("reason")
    actor = _actor(left)
    if actor:
        out["actor"] = actor
    source = _source(left)
    if source:
        out["src_endpoint"] = source
    if stage is Stage.DNS and "host" in left:
        out["query"] = {"hostname": left.pop("host")}
        if "qtype" in left:
            out["query"]["type"] = left.pop("qtype")
    if stage is Stage.REQUEST:
        out["http_request"] = _http_request(left)
    destination = {attr: left.pop(key) for key, attr in (("host", "hostname"), ("ip", "ip"),
                                                         ("port", "port")) if key in left}
    if "hostname" in destination or "ip" in destination:
        out["dst_endpoint"] = destination
    elif "port" in destination:  # an endpoint needs a name or an address
        left["port"] = destination["port"]
    rule = {attr: left.pop(key) for key, attr in (("rule_id", "uid"), ("rule", "name"))
            if key in left}
    if rule:
        out["firewall_rule"] = rule
    if "policy" in left:
        out["policy"] = {"uid": left.pop("policy"), "name": "agent-egress policy"}
    traffic = {attr: left.pop(key) for key, attr in (("bytes_up", "bytes_out"),
                                                     ("bytes_down", "bytes_in")) if key in left}
    if traffic:
        if len(traffic) == 2:
            traffic["bytes"] = traffic["bytes_out"] + traffic["bytes_in"]
        out["traffic"] = traffic
    if "duration_ms" in left:
        duration = left["duration_ms"]
        out["duration"] = round(duration)
        if type(duration) is int:  # a float stays in unmapped, exactly as it was
            del left["duration_ms"]
    if left:
        out["unmapped"] = left
    return out


def line(event: AuditEvent) -> str:
    """The event as one OCSF JSON line (ASCII only, as the JSON-lines form)."""
    return _ENCODE(record(event)) + "\n"


def event(data: dict[str, Any]) -> AuditEvent:
    """The AuditEvent an OCSF event written by `record` holds; ValueError saying what is wrong
    otherwise (the same checks as a JSON line's)."""
    class_uid = data.get("class_uid")
    if type(class_uid) is not int or class_uid not in _STAGES:
        raise ValueError(f"not an agent-egress OCSF event (class_uid {class_uid!r}, expected "
                         f"one of {sorted(_STAGES)})")
    product = _object(_object(data, "metadata"), "product").get("name")
    if product != _PRODUCT["name"]:
        raise ValueError(f"not an agent-egress OCSF event (product {product!r})")
    stage = _STAGES[class_uid]
    unmapped = _object(data, "unmapped")
    if "event" in unmapped:
        raise ValueError("unmapped.event: the class says what the event is")
    values: dict[str, Any] = {"event": stage.value}
    values["decision"] = unmapped["decision"] if "decision" in unmapped else _decision(data)
    values["ts"] = unmapped.get("ts", data.get("time_dt") if "time_dt" in data else
                                _from_epoch_ms(data.get("time")))
    values["reason"] = data.get("status_detail")
    actor = _object(data, "actor")
    user = _object(actor, "user")
    values["account"] = _object(user, "account").get("name")
    values["user"] = user.get("name")
    values["uid"] = _int_text(user.get("uid"), "actor.user.uid")
    process = _object(actor, "process")
    values["pid"] = process.get("pid")
    values["exe"] = _object(process, "file").get("path")
    values["cmdline"] = process.get("cmd_line")
    if "ancestry" in process:
        values["ancestry"] = [_ancestor_text(a) for a in _list(process, "ancestry")]
    source = _object(data, "src_endpoint")
    if source:
        values["client"] = _address_text(source.get("ip"), source.get("port"))
    destination = _object(data, "dst_endpoint")
    values["host"] = destination.get("hostname")
    values["ip"] = destination.get("ip")
    values["port"] = destination.get("port")
    query = _object(data, "query")
    if query:
        values["host"] = query.get("hostname")
        values["qtype"] = query.get("type")
    request = _object(data, "http_request")
    values["method"] = request.get("http_method")
    values["path"] = _object(request, "url").get("path")
    rule = _object(data, "firewall_rule")
    values["rule"], values["rule_id"] = rule.get("name"), rule.get("uid")
    values["policy"] = _object(data, "policy").get("uid")
    traffic = _object(data, "traffic")
    values["bytes_up"], values["bytes_down"] = traffic.get("bytes_out"), traffic.get("bytes_in")
    values["duration_ms"] = data.get("duration")
    values.update({key: value for key, value in unmapped.items() if key != "decision"})
    return AuditEvent.from_dict({key: value for key, value in values.items()
                                 if value is not None})


def formatter(name: str) -> Callable[[AuditEvent], str]:
    """How each audit line is written, by `--audit-format` name."""
    if name == "ocsf":
        return line
    if name == "jsonl":
        return AuditEvent.line
    raise ValueError(f"unknown audit format {name!r}, expected one of {', '.join(FORMATS)}")


def _values(event: AuditEvent) -> dict[str, Any]:
    """The event's keys and values as its JSON line holds them (query removed)."""
    values = {key: getattr(event, key) for key in KEYS}
    for key in ("event", "decision", "mode"):  # plain strings, as json.loads gives them
        if values[key] is not None:
            values[key] = str(values[key])
    if isinstance(values["path"], str):
        values["path"] = values["path"].split("?", 1)[0]
    if values["ancestry"] is not None:
        values["ancestry"] = list(values["ancestry"])
    return values


def _activity(stage: Stage, decision: Result, method: str | None) -> tuple[int, str]:
    if stage is Stage.REQUEST:
        activity = _METHODS.get(method or "", 0 if method is None else 99)
        return activity, _HTTP_ACTIVITIES[activity]
    if stage is Stage.CONNECT:  # the line is written when the tunnel ends, or at its refusal
        return (5, "Refuse") if decision is Result.DENY else (6, "Traffic")
    return 1, "Query"


def _time(left: dict[str, Any]) -> dict[str, Any]:
    """`time` (required) and `time_dt` from `ts`; a `ts` that is not RFC 3339 stays in
    unmapped and `time` is 0."""
    ts = left.get("ts")
    if isinstance(ts, str) and _DATETIME.fullmatch(ts):
        try:
            moment = datetime.fromisoformat(ts.replace("t", "T").replace("z", "Z"))
        except ValueError:
            moment = None
        if moment is not None:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            del left["ts"]
            return {"time": _epoch_ms(moment), "time_dt": ts}
    return {"time": 0}


def _epoch_ms(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _from_epoch_ms(ms: object) -> str | None:
    if type(ms) is not int:
        return None
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _actor(left: dict[str, Any]) -> dict[str, Any]:
    actor: dict[str, Any] = {}
    user: dict[str, Any] = {}
    if "uid" in left:
        user["uid"] = str(left.pop("uid"))
    if "user" in left:
        user["name"] = left.pop("user")
    if "account" in left:  # the policy's account this client is governed as
        user["account"] = {"name": left.pop("account"), "type_id": 99,
                           "type": "agent-egress account"}
    if user:
        actor["user"] = user
    if "pid" in left:  # OCSF's process needs its pid: without one, the rest stays unmapped
        process: dict[str, Any] = {"pid": left.pop("pid")}
        if "exe" in left:
            exe = left.pop("exe")
            process["name"] = os.path.basename(exe)
            process["file"] = {"path": exe, "name": os.path.basename(exe), "type_id": 1}
        if "cmdline" in left:
            process["cmd_line"] = left.pop("cmdline")
        ancestors = [_ancestor(text) for text in left.get("ancestry", ())]
        if "ancestry" in left and all(ancestors):
            process["ancestry"] = ancestors
            del left["ancestry"]
        actor["process"] = process
    return actor


def _ancestor(text: object) -> dict[str, Any] | None:
    """`EXE[PID]` as a process entity, None if that is not its exact form."""
    match = _ANCESTOR.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    exe, pid = match.group(1), int(match.group(2))
    return {"path" if "/" in exe else "name": exe, "pid": pid}


def _ancestor_text(entity: object) -> str:
    if not isinstance(entity, dict):
        raise ValueError("actor.process.ancestry holds a non-object")
    exe = entity.get("path", entity.get("name"))
    pid = entity.get("pid")
    if not isinstance(exe, str) or type(pid) is not int:
        raise ValueError("actor.process.ancestry: expected a path or name and a pid")
    return f"{exe}[{pid}]"


def _source(left: dict[str, Any]) -> dict[str, Any]:
    """`ip:port` (`[v6]:port`) as an endpoint, when that is exactly how it was written."""
    client = left.get("client")
    if not isinstance(client, str):
        return {}
    host, _, port = client.rpartition(":")
    try:
        address = ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return {}
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        return {}
    if _address_text(str(address), int(port)) != client:
        return {}
    del left["client"]
    return {"ip": str(address), "port": int(port)}


def _address_text(ip: object, port: object) -> str:
    if not isinstance(ip, str) or type(port) is not int:
        raise ValueError("src_endpoint: expected ip and port")
    return f"[{ip}]:{port}" if isinstance(ip_address(ip), IPv6Address) else f"{ip}:{port}"


def _http_request(left: dict[str, Any]) -> dict[str, Any]:
    request: dict[str, Any] = {}
    if left.get("method") in _METHODS:  # OCSF names these eight; others stay unmapped
        request["http_method"] = left.pop("method")
    if "path" in left:
        url: dict[str, Any] = {"path": left.pop("path")}
        url.update({attr: left[key] for key, attr in (("host", "hostname"), ("port", "port"))
                    if key in left})
        request["url"] = url
    return request


def _decision(data: dict[str, Any]) -> str:
    disposition = data.get("disposition_id")
    if disposition == 1:
        return Result.ALLOW.value
    if disposition == 2:
        return Result.DENY.value
    raise ValueError(f"disposition_id {disposition!r}, expected 1 (Allowed) or 2 (Blocked)")


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if type(value) is not dict:
        raise ValueError(f"{key} is {type(value).__name__}, expected object")
    return value


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if type(value) is not list:
        raise ValueError(f"{key} is {type(value).__name__}, expected array")
    return value


def _int_text(value: object, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.isascii() or not value.lstrip("-").isdigit():
        raise ValueError(f"{where} is {value!r}, expected a number")
    return int(value)
