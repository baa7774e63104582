"""The answer a denied client gets: short, plain text, and the same facts in headers, so that
a person reading curl, git or pip output, or an agent reading it, knows what to change."""

from __future__ import annotations

import re

from mitmproxy import http

from agent_egress.rules import NO_RULE, Decision

HEADER_PREFIX = "X-Agent-Egress-"
WHY = ("run `agent-egress why` for your recent denials and the `agent-egress request` command "
       "that asks an operator for access")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def denial(decision: Decision, destination: str, status: int = 403) -> http.Response:
    facts = [
        ("Account", decision.account or "none"),
        ("Destination", destination),
        ("Rule", decision.rule or (NO_RULE if decision.reason.startswith(NO_RULE) else
                                   "none (the reason says what was refused)")),
        ("Reason", decision.reason),
    ]
    if decision.hint:
        facts.append(("Next", decision.hint))
    refused = status == 403
    if refused:
        facts.append(("Help", WHY))
    body = ("agent-egress denied this connection.\n" if refused else
            "agent-egress could not reach this destination.\n") + "".join(
        f"{name.lower() + ':':13}{value}\n" for name, value in facts)
    headers = {HEADER_PREFIX + "Decision": "deny", "Content-Type": "text/plain; charset=utf-8",
               "Connection": "close"}
    headers.update({HEADER_PREFIX + name: _header_safe(value) for name, value in facts})
    response = http.Response.make(status, body.encode(), headers)
    # Clients that hide the body of a refused CONNECT (curl, pip) still print the reason phrase.
    phrase = "Forbidden by agent-egress" if refused else "Bad Gateway (agent-egress)"
    response.reason = _header_safe(f"{phrase}: {decision.reason}")[:300] + (
        " (see agent-egress why)" if refused else "")
    return response


def _header_safe(value: str) -> str:
    return _UNPRINTABLE.sub("?", value)
