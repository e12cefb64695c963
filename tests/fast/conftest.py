"""The fast tests: everything above the sandbox, without root or runsc.

One fixture, `fast`, builds the server around a FakeManager (fakes.py): the
real Runtime, Jobs, ResultStore (SQLite), AuditLog, policy, MCP server and
tools. Where the server's modules move, this file is the one to adapt.

The policy mounts no workspace (workspaces are loop-mounted ext4 images:
root only); the file tools work on a project, a plain directory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from gvisor_mcp.audit import AuditLog
from gvisor_mcp.auth import TenantTokenVerifier, WatchedTokenFile
from gvisor_mcp.config import HttpOptions, ServeConfig
from gvisor_mcp.http import Gateway
from gvisor_mcp.jobs import Jobs
from gvisor_mcp.metrics import Metrics
from gvisor_mcp.results import ResultStore
from gvisor_mcp.runtime import PolicyHolder, Runtime, TenantState
from gvisor_mcp.server import build_server
from gvisor_mcp.tokens import METRICS_ROLE, TokenFile

from .fakes import FakeManager

# No root, no runsc: never gated (tests/conftest.py), always in `-m "not runsc"`.


def policy_text(project: Path, extra: str = "") -> str:
    """Two tenants, no workspace, one project; commands run as this process's
    user (the file tools give new files to the sandbox user: a non-root test
    process can only give them to itself)."""
    return f"""\
version: 1
defaults:
  user: "{os.getuid()}:{os.getgid()}"
  timeout: 30s
ceilings:
  memory: 1GiB
  timeout: 1m
workspace:
  enabled: false
projects:
  app: {{path: {project}, mount: /project, read_only: false}}
output:
  head: 1KiB
  tail: 1KiB
files:
  max_read: 64KiB
  max_write: 64KiB
  max_list: 50
foreground_limit: 5s
tenants:
  alice:
    quotas: {{max_concurrent: 1}}
  bob: {{}}
{extra}"""


@dataclass
class FastServer:
    rt: Runtime
    fake: FakeManager
    project: Path
    state: Path
    policy_path: Path

    def app(self, tenant: str = "default", *, over_http: bool = False) -> TenantState:
        return self.rt.app_for(tenant, session_from_request=over_http)

    def server(self, tenant: str = "default") -> Any:
        """The MCPServer a stdio client of `tenant` talks to (its lifespan: one TenantState)."""
        app = self.app(tenant)

        @contextlib.asynccontextmanager
        async def lifespan(_server: Any) -> AsyncIterator[TenantState]:
            app.warm_pool()
            yield app

        return build_server(self.rt.config, self.rt.policy, tenant, lifespan)

    def client(self, tenant: str = "default", **kw: Any) -> Client:
        """The SDK's in-memory client; legacy mode (initialize, then JSON-RPC
        messages on memory streams) is what a stdio client does."""
        kw.setdefault("mode", "legacy")
        return Client(self.server(tenant), **kw)

    @contextlib.asynccontextmanager
    async def gateway(self, **options: Any) -> AsyncIterator[HttpGateway]:
        """The HTTP front (http.Gateway, the ASGI app Granian serves) with
        tokens for alice, bob, a metrics token, and one for mallory, a tenant
        the policy does not have; an httpx client calls it in-process."""
        import httpx2

        path = self.state / "tokens.yaml"
        file = TokenFile.load(path)
        tokens = {name: file.add(name) for name in ("alice", "bob", "mallory")}
        tokens["metrics"] = file.add(METRICS_ROLE)
        opts = HttpOptions(tokens_path=str(path), **options)
        async with anyio.create_task_group() as tg:
            gateway = Gateway(self.rt, TenantTokenVerifier(WatchedTokenFile(path)), opts, tg)
            transport = httpx2.ASGITransport(app=gateway)
            async with httpx2.AsyncClient(
                transport=transport, base_url=f"http://127.0.0.1:{opts.port}", timeout=30
            ) as http:
                yield HttpGateway(gateway, http, tokens, f"http://127.0.0.1:{opts.port}/mcp")
            tg.cancel_scope.cancel()

    def audit(self) -> list[dict[str, Any]]:
        path = self.state / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class HttpGateway:
    gateway: Gateway
    http: Any
    """an httpx2.AsyncClient on the gateway, in-process (ASGITransport)"""
    tokens: dict[str, str]
    url: str

    def headers(self, who: str | None, **extra: str) -> dict[str, str]:
        h = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", **extra}
        if who is not None:
            h["Authorization"] = f"Bearer {self.tokens[who]}"
        return h

    def client(self, who: str, **kw: Any) -> Client:
        """The SDK's streamable HTTP client, in-process."""
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        http = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=self.gateway),
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
            timeout=30,
        )
        return Client(streamable_http_client(self.url, http_client=http), **kw)


@pytest.fixture
def fast(tmp_path: Path) -> Callable[..., contextlib.AbstractAsyncContextManager[FastServer]]:
    """`async with fast() as srv:` a Runtime around a FakeManager; `srv.client(tenant)`.

    `policy_extra` is appended to the policy (more tenants); `shared` makes
    Jobs admit like the HTTP server (several tenants, a reserved slot)."""

    @contextlib.asynccontextmanager
    async def start(
        *, policy_extra: str = "", shared: bool = False, capacity: int = 4, pool_size: int = 2
    ) -> AsyncIterator[FastServer]:
        project = tmp_path / "project"
        project.mkdir(exist_ok=True)
        policy_path = tmp_path / "policy.yaml"
        policy_path.write_text(policy_text(project, policy_extra))
        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        fake = FakeManager()
        fake.config = fake.config.model_copy(update={"max_concurrent_containers": capacity})
        config = ServeConfig(
            state_dir=state, manager=fake.config, pool_size=pool_size, transport="http" if shared else "stdio"
        )
        policy = PolicyHolder(str(policy_path))
        store = ResultStore(state)
        audit = AuditLog(state / "audit.jsonl")
        try:
            async with anyio.create_task_group() as tg:
                metrics = Metrics()
                jobs = Jobs(fake, store, audit, tg, metrics, shared=shared)
                rt = Runtime(config, policy, fake, store, audit, jobs, metrics)
                try:
                    yield FastServer(rt, fake, project, state, policy_path)
                finally:
                    with anyio.CancelScope(shield=True):
                        await fake.close()
                        with anyio.fail_after(10):
                            while jobs.active_all():
                                await anyio.sleep(0.01)
                    tg.cancel_scope.cancel()
        finally:
            store.close()
            audit.close()

    return start


def structured(result: Any) -> dict[str, Any]:
    assert result.structured_content is not None, result
    return result.structured_content


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def wire(result: Any) -> dict[str, Any]:
    """A tool result as the JSON a client receives (`result` of tools/call)."""
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)
