"""`network: sandbox`: per-run network namespaces and the egress proxy.

The sandbox package only sees the small provider interface in
sandbox/network.py; the policy layer builds `EgressRules`; the server wires a
`NetworkService` into the Manager. See docs/network.md.
"""

from .accounting import MAX_DESTINATIONS, ConnectionEvent, RunAccounting
from .egress import DEFAULT_PORTS, EgressError, EgressRule, EgressRules, parse_rule
from .netns import NetnsError, referenced_netns
from .service import EgressGrant, NetworkConfig, NetworkService, RunNetwork

__all__ = [
    "DEFAULT_PORTS",
    "MAX_DESTINATIONS",
    "ConnectionEvent",
    "EgressError",
    "EgressGrant",
    "EgressRule",
    "EgressRules",
    "NetnsError",
    "NetworkConfig",
    "NetworkService",
    "RunAccounting",
    "RunNetwork",
    "parse_rule",
    "referenced_netns",
]
