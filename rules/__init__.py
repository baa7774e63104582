"""The policy engine: loads policy files and decides. Pure: no proxy, resolver or sockets."""

from .engine import NO_RULE, AccountChoice, Decision, Identity, Policy, Query
from .errors import PolicyError, Problem
from .hosts import (
    Address,
    Host,
    HostError,
    Name,
    address_text,
    host_text,
    normalize_host,
    parse_port,
    split_host_port,
)
from .loader import DEFAULT_ACCOUNT, builtin_presets, load_policy, parse_policy
from .model import (
    Account,
    Credential,
    Mode,
    PolicyDocument,
    PolicyWarning,
    Result,
    Rule,
    Scheme,
    Stage,
)
from .paths import normalize_path

__all__ = [
    "DEFAULT_ACCOUNT", "NO_RULE", "Account", "AccountChoice", "Address", "Credential",
    "Decision", "Host",
    "HostError", "Identity", "Mode", "Name", "Policy", "PolicyDocument", "PolicyError",
    "PolicyWarning", "Problem", "Query", "Result", "Rule", "Scheme", "Stage", "builtin_presets",
    "address_text", "host_text", "load_policy", "normalize_host", "normalize_path",
    "parse_policy", "parse_port", "split_host_port",
]
