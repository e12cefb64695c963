"""create_workspace and delete_workspace: HTTP, under a policy whose workspace
is per session (roots.py says why).

Protocol 2026-07-28 has no sessions, so the server cannot tell two clients
of one tenant apart. Instead of giving them one shared workspace, a call
without a session gets none, and an agent that wants one creates it here and
passes its id to execute_command and the file tools. Over classic sessions
the same tools give a session more than one workspace.
"""

from typing import Annotated

from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent
from pydantic import Field

from ..policy import plan_workspace, workspace_host_path
from ..policy.units import format_bytes
from ..sandbox.options import UserSpec
from .context import ToolContext
from .models import WorkspaceCreated


async def create_workspace(ctx: ToolContext) -> Annotated[CallToolResult, WorkspaceCreated]:
    """Create a private workspace and return its id.

    Pass the id as `workspace` to execute_command, read_file, write_file, list_files and
    delete_file: their files persist between those calls. Only holders of the id can
    reach it (it is never listed to anyone). It is deleted with delete_workspace, after
    a while unused, or when the server stops. Needed under protocol 2026-07-28, whose
    calls have no session and so no workspace of their own."""
    app = ctx.request_context.lifespan_context
    caller = app.caller(ctx)
    settings = app.policy.current.tenant(caller.tenant)
    entry = app.created.create()  # NoSuchWorkspace past the cap: a refusal (tools/refuse.py)
    plan = plan_workspace(settings, caller.tenant, app.workspace_root, entry.handle)
    if plan is None:  # only registered where the policy has a session workspace
        app.created.forget(entry.handle)
        raise ToolError("this policy mounts no workspace (workspace.enabled: false)")
    user = UserSpec.parse(settings.defaults.user)
    try:
        if app.remote_workspaces is not None:  # --backend ray: made on the agent that will hold it
            path = plan.host_path.resolve()
            await app.remote_workspaces.prepare(caller.tenant, path, plan.size_mb, (user.uid, user.gid))
            app.made_workspaces.add(path)
        else:
            app.prepare_plan(plan, (user.uid, user.gid))
    except BaseException:
        app.created.forget(entry.handle)
        raise
    result = WorkspaceCreated(
        workspace=entry.handle,
        mount=plan.mount,
        size=format_bytes(plan.size_mb * 1024 * 1024),
        idle_minutes=app.created.idle_seconds / 60,
    )
    app.audit.write(
        tenant=caller.tenant,
        session=caller.session_id,
        tool="create_workspace",
        decision="allowed",
        policy_hash=app.policy.current.sha256,
    )
    text = (
        f"workspace={entry.handle} (mounted at {plan.mount} in commands, {result.size}). Pass "
        f'workspace="{entry.handle}" to execute_command and the file tools; it is deleted after '
        f"{result.idle_minutes:g} minutes unused, with delete_workspace, or when the server stops."
    )
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json")
    )


async def delete_workspace(
    workspace: Annotated[str, Field(description="The id create_workspace returned.")],
    ctx: ToolContext,
) -> str:
    """Delete a workspace made with create_workspace, with all its files."""
    app = ctx.request_context.lifespan_context
    caller = app.caller(ctx, workspace)
    if any(j.session == workspace for j in app.jobs.active(caller.tenant)):
        raise ToolError(
            f"a command is still running in workspace {workspace}; stop it with cancel_command "
            "(list_active shows it) and delete the workspace again"
        )
    app.created.forget(workspace)
    app.remove_workspace(workspace_host_path(app.workspace_root, caller.tenant, "session", workspace).resolve())
    app.audit.write(
        tenant=caller.tenant,
        session=workspace,
        tool="delete_workspace",
        decision="allowed",
        policy_hash=app.policy.current.sha256,
    )
    return f"deleted workspace {workspace} and its files"
