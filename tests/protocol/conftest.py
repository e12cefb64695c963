"""Protocol tests: the real `gvisor-mcp serve` over real stdio, driven by the SDK's client."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from ..conftest import CGROUP_PARENT, leftovers

BIN = Path(sys.executable).with_name("gvisor-mcp")


# What a client reads from a tool result (shared with tests/adversarial).


def structured(result) -> dict:
    assert result.structured_content is not None, result
    return result.structured_content


def text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def run(client, **args):
    return await client.call_tool("execute_command", args)


async def full_receipt(client, result_id: str) -> dict:
    """A result's whole limits receipt (results carry only the requested part)."""
    return structured(await client.call_tool("inspect_result", {"result_id": result_id, "receipt": True}))["limits"]


def server_params(
    base: Path, *extra: str, state_dir: Path | None = None, env: dict | None = None
) -> StdioServerParameters:
    return StdioServerParameters(
        command=str(BIN),
        args=[
            "serve",
            "--state-root",
            str(base),
            "--cgroup-parent",
            CGROUP_PARENT,
            "--state-dir",
            str(state_dir or base / "state"),
            *extra,
        ],
        env={"PATH": os.environ["PATH"], "GVISOR_MCP_LOG_LEVEL": "INFO", **(env or {})},
    )


@pytest.fixture
def serve(sandbox_base):
    """A factory: `async with serve(*flags) as client:`; checks nothing is left after."""

    @contextlib.asynccontextmanager
    async def start(*extra: str, mode: str = "auto", state_dir: Path | None = None, env: dict | None = None):
        async with Client(server_params(sandbox_base, *extra, state_dir=state_dir, env=env), mode=mode) as client:
            yield client

    yield start
    assert leftovers(sandbox_base) == {}
