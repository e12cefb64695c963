"""Quotas against the server's capacity: what `policy check` and `serve` warn about.

A tenant whose `max_concurrent` reaches the server's capacity (`serve
--max-concurrent`, default 8) could, alone, hold every sandbox slot; quotas
adding up to more than the capacity mean runs wait for slots when every
tenant is busy. Neither is an error (admission keeps a slot for a tenant
below its fair share, see jobs.FairGate), but an operator should know.
"""

from __future__ import annotations

from collections.abc import Iterable

from .loader import Policy

DEFAULT_CAPACITY = 8
"""`serve --max-concurrent`'s default."""


def capacity_warnings(
    policy: Policy, capacity: int, tenants: Iterable[str] | None = None, *, shared: bool = True
) -> list[str]:
    """Warnings for `tenants` (default: all of the policy's) on a server of `capacity` slots.

    `shared`: the tenants share one server (HTTP). A stdio server serves one
    tenant alone, so there only a quota above the capacity is worth a word.
    """
    names = list(tenants) if tenants is not None else list(policy.tenant_names)
    quotas = {t: policy.tenant(t).quotas.max_concurrent for t in names}
    out = []
    for tenant, n in quotas.items():
        if n > capacity or (shared and n >= capacity):
            out.append(
                f"tenant {tenant!r}: quotas.max_concurrent={n} is at least the server's capacity "
                f"(--max-concurrent {capacity}); "
                + (
                    f"admission keeps one slot for other tenants, so it runs at most {capacity - 1} "
                    f"at once while others may come. Set it below {capacity} (e.g. {max(1, capacity // 2)})."
                    if shared
                    else f"at most {capacity} of its runs go at once, the rest wait."
                )
            )
    total = sum(quotas.values())
    if shared and len(quotas) > 1 and total > capacity:
        detail = ", ".join(f"{t}={n}" for t, n in quotas.items())
        out.append(
            f"the tenants' quotas.max_concurrent add up to {total} ({detail}), more than the "
            f"server's capacity (--max-concurrent {capacity}): when they are all busy, runs wait "
            "for a slot, shared fairly between tenants. Raise --max-concurrent or lower the quotas "
            "if runs must never wait."
        )
    return out


__all__ = ["DEFAULT_CAPACITY", "capacity_warnings"]
