"""The server's network side: per-run namespaces and proxies, handed to the sandbox.

`NetworkService` is what the Manager receives as its network provider (see
sandbox/network.py for the small interface it implements). For each
`network: sandbox` sandbox, cold or pooled, `open()` prepares S and E and
the proxy listener; `RunNetwork.start()` binds a run's egress grant to it
(for a pooled sandbox: at claim time); `aclose()` after runsc has exited
closes the listener, then the namespaces.

A namespace or proxy failure is never papered over: `open()` raises
NetnsError (the run fails before it starts, status `error`), and a proxy
that dies mid-run sets `failure`, which ends the run with status `error`.
Nothing here ever falls back to the host's network.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .accounting import ConnectionEvent, RunAccounting
from .egress import EgressRules, IPAddress, _host_map
from .fence import NO_FENCE, Fence
from .guard import HostAddresses
from .netns import PROXY_PORT, Namespaces, NetnsError, SlotAllocator, create
from .proxy import RunProxy
from .resolver import Resolver

log = structlog.get_logger("gvisor_mcp.network")

NO_PROXY = "localhost,127.0.0.1,::1"


class NetworkConfig(BaseModel):
    """Server-wide network settings (not per tenant: those are in the policy)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slot_network: str = "198.19.0.0/16"
    """Where the per-run /30s between sandbox and proxy come from. They exist
    only inside the runs' own namespaces, never in the host's."""
    hosts: dict[str, tuple[IPAddress, ...]] = Field(default_factory=dict)
    """Static names the proxy resolves for every run (like /etc/hosts)."""
    system_dns: bool = True
    """Resolve other allowed names with the host's resolver. Off: only
    `hosts` and the policy's `network.egress.hosts` resolve."""

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, v: Any) -> Any:
        return _host_map(v or {})

    @field_validator("slot_network")
    @classmethod
    def _slots(cls, v: str) -> str:
        net = ipaddress.IPv4Network(v, strict=True)
        if net.prefixlen > 28:
            raise ValueError(f"slot_network {v}: at least a /28 (4 runs)")
        return v


@dataclass(frozen=True)
class EgressGrant:
    """What one run may reach, and who hears about each connection.

    Built by the server (policy + request) and passed through the sandbox
    untouched (`ContainerOptions.egress`)."""

    rules: EgressRules
    on_event: Callable[[ConnectionEvent], Any] | None = None


class RunNetwork:
    """One sandbox's namespaces and (once started) its proxy."""

    def __init__(self, service: NetworkService, container_id: str, ns: Namespaces) -> None:
        self._service = service
        self.container_id = container_id
        self.ns = ns
        self.proxy_url = f"http://{ns.slot.edge}:{PROXY_PORT}"
        self.accounting = RunAccounting(proxy=f"{ns.slot.edge}:{PROXY_PORT}")
        self.failure: str | None = None
        self.failed = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        self._started = False
        self._closed = False
        self._proxy: RunProxy | None = None

    @property
    def netns_path(self) -> str:
        return self.ns.netns_path

    @property
    def started(self) -> bool:
        """Bound to a run; until then it waits (a pooled sandbox's or a spare's, sandbox/spares.py)."""
        return self._started

    @property
    def env(self) -> Mapping[str, str]:
        """What the command is told, in both cases (pip, curl, git, npm read one or the other)."""
        url = self.proxy_url
        return {
            "HTTP_PROXY": url,
            "HTTPS_PROXY": url,
            "http_proxy": url,
            "https_proxy": url,
            "NO_PROXY": NO_PROXY,
            "no_proxy": NO_PROXY,
        }

    def start(self, run_id: str, egress: Any) -> None:
        """Serve `run_id` with `egress` (an EgressGrant, EgressRules, or None: deny all)."""
        if self._started or self._closed:
            raise NetnsError("this sandbox's network was already used by a run")
        self._started = True
        grant = (
            egress
            if isinstance(egress, EgressGrant)
            else EgressGrant(egress if isinstance(egress, EgressRules) else EgressRules())
        )
        listener = self.ns.take_listener()
        on_event = grant.on_event

        def record(ev: ConnectionEvent) -> None:
            self.accounting.add(ev)
            log.info(
                "egress",
                run_id=ev.run_id,
                destination=ev.destination,
                verdict=ev.verdict,
                reason=ev.reason,
                address=ev.address,
                bytes_up=ev.bytes_up,
                bytes_down=ev.bytes_down,
            )
            if on_event is not None:
                on_event(ev)

        proxy = RunProxy(
            listener,
            run_id=run_id,
            peer=self.ns.slot.sandbox,
            rules=grant.rules,
            resolver=self._service.resolver,
            host_addresses=self._service.host_addresses.get,
            on_event=record,
            fence=lambda: self._service.fence,
        )
        self._proxy = proxy
        self._service._spawn(self._serve, proxy)

    async def _serve(self, proxy: RunProxy) -> None:
        try:
            with anyio.CancelScope() as self._scope:
                if self._closed:
                    self._scope.cancel()
                await proxy.serve()
        except Exception:
            self.failure = proxy.failure or "egress proxy failed"
            self.failed.set()
        finally:
            self._stopped.set()

    def report(self) -> dict[str, Any] | None:
        """Everything so far, connections still open included (a pooled run is
        answered when its command exits, possibly before the proxy saw the
        last connection close)."""
        if not self._started:
            return None
        if self._proxy is None or not self._proxy.live:
            return self.accounting.report()
        snapshot = copy.deepcopy(self.accounting)
        for ev in self._proxy.in_flight():
            snapshot.add(ev)
        return snapshot.report()

    async def wait_failed(self) -> None:
        await self.failed.wait()

    async def aclose(self) -> None:
        """Stop the proxy (closing its listener and connections), then drop S and E."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._started:
                if self._scope is not None:
                    self._scope.cancel()
                with anyio.move_on_after(5):
                    await self._stopped.wait()
            self.ns.close()
            self._service._closed(self)


class NetworkService:
    """Per-run namespaces and proxies for one server. Use inside `async with`."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        self.config = config or NetworkConfig()
        self.resolver = Resolver(self.config.hosts, system_dns=self.config.system_dns)
        self.host_addresses = HostAddresses()
        self._slots = SlotAllocator(self.config.slot_network)
        self.fence: Fence = NO_FENCE
        """What no run's allowlist opens; a cluster agent sets and refreshes it (fence.py)."""
        self._open: dict[str, RunNetwork] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> NetworkService:
        self._tg = await anyio.create_task_group().__aenter__()
        # pyroute2's first import costs ~0.3 s (seconds on a loaded host):
        # paid in a worker thread while the server starts, not by its start-up
        # and not by the first sandbox-mode run.
        self._tg.start_soon(self._warm_up)
        return self

    async def _warm_up(self) -> None:
        try:
            await anyio.to_thread.run_sync(self.host_addresses.get)
        except Exception as e:  # a run that needs it will fail with the reason
            log.warning("network_warm_up_failed", error=str(e))

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            for run in list(self._open.values()):
                await run.aclose()
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._tg is None:
            raise NetnsError("the network service is not running")
        self._tg.start_soon(fn, *args)

    def _closed(self, run: RunNetwork) -> None:
        self._open.pop(run.container_id, None)
        self._slots.give_back(run.ns.slot)

    def open_count(self, *, started: bool | None = None) -> int:
        """Namespaces open now; `started`: only those bound to a run (True) or waiting for one (False)."""
        return sum(1 for run in self._open.values() if started is None or run.started == started)

    async def open(self, container_id: str) -> RunNetwork:
        """S, E, veth and listener for one sandbox; raises NetnsError."""
        if self._tg is None:
            raise NetnsError("the network service is not running")
        slot = self._slots.take()
        try:
            ns = await anyio.to_thread.run_sync(create, slot)
        except BaseException:
            self._slots.give_back(slot)
            raise
        run = RunNetwork(self, container_id, ns)
        self._open[container_id] = run
        return run
