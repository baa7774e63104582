"""`agent-egress report`: what each account reached, denials first."""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from . import ocsf
from .auditevent import AuditEvent
from .auditread import read_events
from .rules import Result
from .terminal import printable

MAX_PROCESSES = 5
MAX_RULES = 5


@dataclass
class Destination:
    account: str
    host: str
    port: int | None
    first_seen: str
    last_seen: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        (r.value for r in Result), 0))
    processes: list[str] = field(default_factory=list)
    last_denial: str | None = None
    rule_ids: list[str] = field(default_factory=list)  # the rules that decided, by stable id
    ops: list[str] = field(default_factory=list)  # operations recognised (git-push, ...)

    @property
    def name(self) -> str:
        if self.port is None:
            return f"{self.host} (dns)"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def events(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"account": self.account, "destination": self.name, "host": self.host,
                "port": self.port, "events": self.events, **self.counts,
                "first_seen": self.first_seen, "last_seen": self.last_seen,
                "processes": self.processes, "last_denial": self.last_denial,
                "rule_ids": self.rule_ids, "ops": self.ops}


def summarize(events: Iterable[AuditEvent]) -> list[Destination]:
    """Destinations per account; denials first, then would-be denials, then by traffic."""
    table: dict[tuple[str, str, int | None], Destination] = {}
    for event in events:
        if not event.host:
            continue
        account = event.account or "(no account)"
        ts = event.ts or ""
        key = (account, event.host, event.port)
        found = table.get(key)
        if found is None:
            found = table[key] = Destination(account, event.host, event.port, ts, ts)
        found.first_seen = min(found.first_seen, ts)
        found.last_seen = max(found.last_seen, ts)
        found.counts[event.decision] += 1
        if event.decision is not Result.ALLOW:
            found.last_denial = event.reason
        if event.rule_id and event.rule_id not in found.rule_ids and \
                len(found.rule_ids) < MAX_RULES:
            found.rule_ids.append(event.rule_id)
        if event.op and event.op not in found.ops:
            found.ops.append(event.op)
        process = os.path.basename(event.exe or "") or None
        if process and process not in found.processes and len(found.processes) < MAX_PROCESSES:
            found.processes.append(process)
    return sorted(table.values(), key=lambda d: (d.account, -d.counts["deny"],
                                                 -d.counts["would_deny"], -d.events, d.name))


def report(paths: list[str], fmt: str, out: TextIO = sys.stdout) -> int:
    if fmt == "ocsf":  # not a summary: the log itself, converted
        for event in read_events(paths):
            out.write(ocsf.line(event))
        return 0
    destinations = summarize(read_events(paths))
    if fmt == "json":
        json.dump([d.as_dict() for d in destinations], out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.writer(out)
        columns = ["account", "destination", "events", "allow", "deny", "would_deny",
                   "first_seen", "last_seen", "processes", "last_denial", "rule_ids", "ops"]
        writer.writerow(columns)
        for d in destinations:
            row = d.as_dict()
            row["processes"] = " ".join(d.processes)
            row["rule_ids"] = " ".join(d.rule_ids)
            row["ops"] = " ".join(sorted(d.ops))
            writer.writerow([printable(str(row[c])) if isinstance(row[c], str) else row[c]
                             for c in columns])
    else:
        _table(destinations, out)
    return 0


def _table(destinations: list[Destination], out: TextIO) -> None:
    """Every string a client could choose (names, processes, reasons quoting them) is escaped:
    a governed account must not recolour or fake the lines an operator reads."""
    if not destinations:
        out.write("no destination events\n")
        return
    width = max(len(printable(d.name)) for d in destinations)
    account = None
    for d in destinations:
        if d.account != account:
            account = d.account
            mine = [x for x in destinations if x.account == account]
            out.write(f"{'' if d is destinations[0] else chr(10)}account {printable(account)}: "
                      f"{len(mine)} destinations, {sum(x.events for x in mine)} events\n")
            out.write(f"  {'DESTINATION':{width}}  {'EVENTS':>6}  {'ALLOW':>5}  {'DENY':>5}  "
                      f"{'WOULD':>5}  {'FIRST SEEN':24}  {'LAST SEEN':24}  PROCESSES\n")
        processes = printable(", ".join(d.processes)) or "-"
        out.write(f"  {printable(d.name):{width}}  {d.events:>6}  {d.counts['allow']:>5}  "
                  f"{d.counts['deny']:>5}  {d.counts['would_deny']:>5}  "
                  f"{printable(d.first_seen):24}  {printable(d.last_seen):24}  {processes}\n")
        if d.last_denial and d.counts["allow"] == 0:
            out.write(f"  {'':{width}}  why: {printable(d.last_denial)}\n")
        if d.ops or d.rule_ids:
            facts = [f"ops {', '.join(sorted(d.ops))}"] if d.ops else []
            facts += [f"rules {', '.join(d.rule_ids)}"] if d.rule_ids else []
            out.write(f"  {'':{width}}  {printable('; '.join(facts))}\n")
