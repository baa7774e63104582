"""The upstream address: the proxy resolves a name itself and dials exactly the address it
checked, so a name rebound to an internal address, or a client that lies about where it
connects, reaches nothing it may not reach."""

from __future__ import annotations

from .rules import Address, Decision, Host, Name, Policy, host_text
from .upstream import DnsServers, SystemResolver

Refusal = str  # why nothing may be dialled; the gate makes it a denial


async def pin(resolver: SystemResolver | DnsServers, policy: Policy, account: str, host: Host,
              port: int, original: Address | None = None) -> Address | Decision | Refusal:
    """The first address of `host` that the account may reach on `port`; else the rules'
    denial of the first address, or a refusal. In transparent mode the client already chose
    `original`: it must be one of the addresses the name resolves to. Raises ResolveError."""
    if not isinstance(host, Name):
        if original is not None and host != original:
            return f"the connection is to {host_text(original)}, not {host_text(host)}"
        return checked(policy, account, host_text(host), host, port)
    addresses = await resolver.addresses(host.text)
    if original is not None:
        if original not in addresses:
            return (f"{host.text} does not resolve to {host_text(original)}, where the "
                    "connection goes (spoofed name?)")
        addresses = [original]
    refusals = []
    for address in addresses:
        outcome = checked(policy, account, host.text, address, port)
        if not isinstance(outcome, Decision):
            return outcome
        refusals.append(outcome)
    return refusals[0] if refusals else f"{host.text} resolves to no address"


def checked(policy: Policy, account: str, name: str, address: Address,
            port: int) -> Address | Decision:
    """`address` if the account may reach it on `port` (under `name`), else the rules' denial."""
    decision = policy.decide_address(account, name, address, port)
    return address if decision.passes else decision
