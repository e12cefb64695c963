"""execute_command: run a shell command in a fresh sandbox, under the policy.

No `from __future__ import annotations` here: the tool's signature is built
at registration from the caller's policy (allowed networks and images as
enums, ceilings as maximums), and the SDK reads those annotations as objects.
"""

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import anyio
from mcp.types import CallToolResult, TextContent
from pydantic import Field, WithJsonSchema

from ..jobs import Job, ResultNotStored
from ..policy import ExecRequest, resolve
from ..text import render_bytes
from .boundary import report_progress
from .context import ToolContext
from .files import WorkspaceArg, workspace_param
from .models import ExecResult
from .view import SchemaFacts, exec_result, render_text

DESCRIPTION = """Run a shell command (`/bin/sh -c COMMAND`) in a NEW, isolated gVisor sandbox.

Each call is a fresh container: nothing persists between calls (no `cd`, no exported
variables, no background processes, no installed packages) EXCEPT files under the
workspace directory{workspace}. Chain steps in one command (`cd dir && make && ./a.out`)
or keep files in the workspace.

Output: the result shows the first and last {head} bytes of stdout and of stderr;
when more was written, a marker gives the inspect_result(result_id, stream, offset,
length) call to send as written; go on from its next_offset for the rest. Exit codes are the command's;
status says how it ended: exited, timed_out, oom_killed, killed, error, or running.
Commands running longer than {foreground} s (or with background=true) return
status "running" with a result_id: poll with inspect_result(wait_seconds=...),
list with list_active, stop with cancel_command.
Network: {networks}.{egress} Limits (defaults / maximums): {limits}."""

EGRESS_TEXT = """ With network="sandbox", HTTP and HTTPS go through an egress proxy (HTTP_PROXY/HTTPS_PROXY
are set; pip, curl, git and npm use them) that allows only: {allow}. Name lookups inside the
sandbox fail by design (the proxy resolves names); connections not through the proxy fail at once.
Denied destinations are listed in the result."""


def make_execute_tool(facts: SchemaFacts, agent_workspaces: bool = False) -> Callable[..., Any]:
    """`agent_workspaces`: publish the `workspace` parameter (HTTP, scope session; see roots.py)."""
    # Always an `enum` (pydantic would publish a one-value Literal as `const`,
    # which some clients do not show as a choice).
    NetworkT = Annotated[
        Literal[tuple(facts.networks)],
        WithJsonSchema({"type": "string", "enum": list(facts.networks)}),
    ]
    ImageT = Annotated[
        Literal[tuple(facts.images)],
        WithJsonSchema({"type": "string", "enum": list(facts.images)}),
    ]

    def limited(kind: type, ceiling: float | None) -> Any:
        """A positive number whose schema shows the policy's ceiling as `maximum`.

        Published, not enforced here: the policy enforces it (reject or clamp,
        as the operator chose) and explains itself in the error or receipt.
        """
        extra: dict[str, Any] | None = {"maximum": ceiling} if ceiling is not None else None
        return Annotated[kind, Field(gt=0, json_schema_extra=extra)]

    async def execute_command(
        command: Annotated[str, Field(description="Shell command, run as /bin/sh -c COMMAND.")],
        ctx: ToolContext,
        workdir: Annotated[
            str | None, Field(description=f"Working directory inside the sandbox (default {facts.default_workdir}).")
        ] = None,
        env: Annotated[
            dict[str, str] | None, Field(description="Extra environment variables (the policy decides which keys).")
        ] = None,
        stdin: Annotated[str | None, Field(description="Text fed to the command's standard input.")] = None,
        timeout_seconds: Annotated[
            limited(float, facts.max_timeout) | None,
            Field(description=f"Wall-clock limit in seconds (default {facts.default_timeout:g})."),
        ] = None,
        cpus: Annotated[limited(float, facts.max_cpus) | None, Field(description="CPU cores.")] = None,
        memory_mb: Annotated[
            limited(int, facts.max_memory_mb) | None,
            Field(description=f"Memory limit in MiB (default {facts.default_memory_mb})."),
        ] = None,
        max_pids: Annotated[
            limited(int, facts.max_pids) | None, Field(description="Maximum number of processes.")
        ] = None,
        network: Annotated[NetworkT | None, Field(description="Network access for this run.")] = None,
        egress: Annotated[
            list[str] | None,
            Field(
                description="network=sandbox only: narrow the egress allowlist to these rules "
                '(e.g. ["pypi.org", "*.pythonhosted.org"]); never wider than the policy\'s.'
            ),
        ] = None,
        image: Annotated[ImageT | None, Field(description="Root filesystem image.")] = None,
        background: Annotated[
            bool, Field(description="Return at once with status running; the command goes on.")
        ] = False,
        workspace: WorkspaceArg = None,
    ) -> Annotated[CallToolResult, ExecResult]:
        # Refusals and failures raise the package's errors; tools/refuse.py
        # words, audits and counts them (SafeServer sends them there).
        app = ctx.request_context.lifespan_context
        caller = app.caller(ctx, workspace)
        policy = app.policy.current
        request = dict(
            command=command,
            workdir=workdir,
            env=env,
            stdin=stdin,
            timeout_seconds=timeout_seconds,
            cpus=cpus,
            memory_mb=memory_mb,
            max_pids=max_pids,
            network=network,
            image=image,
            egress=egress,
        )
        # Every call counts against the tenant's rate, refused ones included.
        app.jobs.rate.count(caller.tenant, policy.tenant(caller.tenant).runs_per_minute)
        resolved = resolve(
            policy,
            ExecRequest.of(**{k: v for k, v in request.items() if v is not None}),
            caller.tenant,
            **app.resolve_args(caller),
        )
        settings = resolved.settings
        app.jobs.admit(caller.tenant, settings.max_concurrent)
        app.audit.writable()  # no command runs unaudited
        app.prepare_workspace(resolved)
        job = app.jobs.start(
            tenant=caller.tenant,
            session=caller.session_id,
            command=command,
            options=resolved.options,
            limits=resolved.receipt.model_dump(mode="json"),
            policy_hash=policy.sha256,
            hold=lambda rid: app.hold_image(resolved, rid),
        )
        wait = 0.0 if background else settings.foreground_limit
        try:
            await _wait_with_progress(ctx, job, wait)
        except anyio.get_cancelled_exc_class():
            # The client abandoned the call (notifications/cancelled): the
            # container must not outlive it.
            with anyio.CancelScope(shield=True):
                await app.jobs.cancel(job)
            raise
        if job.store_error:
            raise ResultNotStored(f"result_id {job.result_id}: {job.store_error}")
        stored = app.store.get(job.result_id, caller.tenant)
        result = exec_result(app, stored, settings.head_bytes, settings.tail_bytes)
        return CallToolResult(
            content=[TextContent(type="text", text=render_text(result, job.result_id))],
            structured_content=result.model_dump(mode="json"),
            is_error=False,
        )

    execute_command.__doc__ = DESCRIPTION.format(
        workspace=f" ({facts.workspace})" if facts.workspace else " (none is mounted under this policy)",
        head=facts.head_bytes,
        foreground=f"{facts.foreground_limit:g}",
        networks=", ".join(facts.networks),
        egress=EGRESS_TEXT.format(allow=facts.egress_text) if "sandbox" in facts.networks else "",
        limits=facts.limits_text,
    )
    return workspace_param(execute_command, agent_workspaces)


async def _wait_with_progress(ctx: ToolContext, job: Job, wait: float) -> None:
    """Wait up to `wait` s for the job, reporting progress about once a second."""
    deadline = time.monotonic() + wait
    while not job.done.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        with anyio.move_on_after(min(1.0, left)):
            await job.done.wait()
        if job.done.is_set():
            return
        line = render_bytes(job.last_line)
        await report_progress(
            ctx,
            round(job.elapsed(), 1),
            job.timeout or None,
            f"{job.out_bytes} bytes stdout, {job.err_bytes} bytes stderr" + (f"; last line: {line}" if line else ""),
        )
