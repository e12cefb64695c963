"""One error family (issue 16 item 4): every error the package raises on purpose
is a GvisorMcpError in one of three branches, so the tool layer can map each
branch in one place (tools/refuse.py) and anything else is a bug."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import gvisor_mcp
from gvisor_mcp.errors import ConfigurationError, GvisorMcpError, InfrastructureError, Refusal

INTERNAL = {
    "gvisor_mcp.http.SessionLimit": "the gateway's own 429/503 answer, never leaves http.py",
    "gvisor_mcp.http.SlowClient": "a body timeout inside the gateway, answered 408 there",
    "gvisor_mcp.network.proxy.Refusal": "the proxy's answer to a sandbox, never raised to a caller",
    "gvisor_mcp.network.resolver.ResolveError": "caught by the proxy, reported per destination",
    "gvisor_mcp.policy.units.UnitError": "a unit parse error, turned into a policy Problem",
}
"""Exceptions used for control flow inside one module; each says why it is not in the family."""


def our_exceptions() -> dict[str, type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(gvisor_mcp.__path__, "gvisor_mcp."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_error_of_the_package_is_in_one_branch_of_the_family():
    found = our_exceptions()
    assert "gvisor_mcp.policy.errors.PolicyDenied" in found
    outside = [n for n, cls in found.items() if n not in INTERNAL and not issubclass(cls, GvisorMcpError)]
    assert outside == []
    branches = (Refusal, ConfigurationError, InfrastructureError)
    roots = {"gvisor_mcp.errors.GvisorMcpError", "gvisor_mcp.sandbox.errors.SandboxBaseError"}
    unbranched = [
        n
        for n, cls in found.items()
        if issubclass(cls, GvisorMcpError) and n not in roots and not issubclass(cls, branches)
    ]
    assert unbranched == []


def test_the_branches_are_who_reads_the_error():
    from gvisor_mcp.audit import AuditUnavailable
    from gvisor_mcp.jobs import QuotaExceeded, RateLimited
    from gvisor_mcp.policy import PolicyDenied, PolicyError, UnknownTenant
    from gvisor_mcp.results import StoreUnavailable
    from gvisor_mcp.roots import NoSuchWorkspace
    from gvisor_mcp.sandbox import InvalidOptionsError, RunscError

    for agent_reads in (PolicyDenied, QuotaExceeded, RateLimited, NoSuchWorkspace, InvalidOptionsError):
        assert issubclass(agent_reads, Refusal)
    for operator_reads in (PolicyError, UnknownTenant):
        assert issubclass(operator_reads, ConfigurationError)
    for host_failed in (AuditUnavailable, StoreUnavailable, RunscError):
        assert issubclass(host_failed, InfrastructureError)
    assert (QuotaExceeded.kind, QuotaExceeded.decision) == ("quota", "quota")
    assert (RateLimited.kind, RateLimited.throttled) == ("rate", True)
    assert "nothing was run" in StoreUnavailable("No space left on device").for_agent()
