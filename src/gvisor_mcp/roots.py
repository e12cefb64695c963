"""Which host directories a call reaches: its workspace and the operator's projects.

The workspace a call gets depends on the transport, the protocol and the
policy's `workspace.scope` (docs/policy.md has the table):

- stdio: one process, one user. Scope `session` means the process's NAMED
  workspace (`serve --workspace NAME`, default `default`), kept across
  restarts: it is the user's work. Scope `tenant`: the tenant's one.
- HTTP with sessions (the classic `initialize` handshake): one workspace per
  MCP session, removed when the session ends; scope `tenant` is shared.
- HTTP under protocol 2026-07-28, which has no sessions: scope `session`
  must never become sharing, so a call without a session gets NO
  workspace, unless the agent created one (`create_workspace`) and passes
  its id. A created workspace is private to whoever holds its id (128
  random bits, never listed to agents), lives under the tenant's sessions
  directory, and goes with `delete_workspace`, after `idle_seconds` unused,
  or when the server stops.

Projects are host directories named by the operator (policy `projects:`, or
`serve --project DIR`), never by a request.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .errors import Refusal
from .policy import Project
from .policy.effective import mount_clash
from .policy.model import NAME_EXPECTED, NAME_RE

CREATED_PREFIX = "ws_"
MAX_CREATED = 16
"""Agent-created workspaces one tenant may hold at once (each is an image of workspace.size)."""
CREATED_IDLE_SECONDS = 1800.0


class NoSuchWorkspace(Refusal, LookupError):
    """A workspace id this tenant did not create (or that expired)."""

    kind = "workspace"


@dataclass
class Created:
    handle: str
    created_at: float
    last_used: float


@dataclass
class AgentWorkspaces:
    """One tenant's agent-created workspaces (HTTP), by handle."""

    idle_seconds: float = CREATED_IDLE_SECONDS
    limit: int = MAX_CREATED
    entries: dict[str, Created] = field(default_factory=dict)

    def create(self) -> Created:
        if len(self.entries) >= self.limit:
            raise NoSuchWorkspace(
                f"this tenant already has {len(self.entries)} workspaces created with create_workspace "
                f"(at most {self.limit} at once). Delete one with delete_workspace(workspace=ID), or "
                f"wait: unused ones go after {self.idle_seconds / 60:g} minutes"
            )
        now = time.monotonic()
        entry = Created(CREATED_PREFIX + secrets.token_hex(16), now, now)
        self.entries[entry.handle] = entry
        return entry

    def use(self, handle: str) -> str:
        """The handle, touched; NoSuchWorkspace (same text for every unknown id)."""
        entry = self.entries.get(handle)
        if entry is None:
            shown = handle[:80]
            raise NoSuchWorkspace(
                f"workspace {shown!r} not found: it was never created, was deleted, or went unused for "
                f"{self.idle_seconds / 60:g} minutes. Create one with create_workspace and pass the id "
                "it returns as `workspace`"
            )
        entry.last_used = time.monotonic()
        return handle

    def idle(self, busy: set[str]) -> list[str]:
        """Handles unused for longer than idle_seconds (not those in `busy`)."""
        cutoff = time.monotonic() - self.idle_seconds
        return [h for h, e in self.entries.items() if e.last_used < cutoff and h not in busy]

    def forget(self, handle: str) -> None:
        self.entries.pop(handle, None)


@dataclass(frozen=True)
class Root:
    """A directory the file tools may reach: where the sandbox sees it, where it is."""

    name: str
    mount: str
    host: Path
    read_only: bool
    kind: str
    """workspace | project"""


def locate(roots: list[Root], path: str, no_workspace_hint: str) -> tuple[Root, tuple[str, ...]]:
    """The root and the components beneath it for a tool's `path`.

    Relative paths are relative to the workspace; absolute ones must be at
    or under a mount point (the workspace's or a project's). `..` is
    refused before anything is looked up.
    """
    if not isinstance(path, str) or not path.strip():
        raise files.FileError(
            "invalid", "the path is empty; give a path relative to the workspace, or an absolute one under it"
        )
    if "\x00" in path:
        raise files.FileError("invalid", "the path contains a NUL character")
    if ".." in path.split("/"):
        raise files.FileError("invalid", f"{path[:200]!r} contains '..'; expected a path without '..' components")
    if not path.startswith("/"):
        workspace = next((r for r in roots if r.kind == "workspace"), None)
        if workspace is None:
            raise files.FileError("no_workspace", f"{path[:200]!r} is relative, but {no_workspace_hint}")
        return workspace, files.parse(path)
    norm = posixpath.normpath(path)
    best: Root | None = None
    for r in roots:
        if (norm == r.mount or norm.startswith(r.mount.rstrip("/") + "/")) and (
            best is None or len(r.mount) > len(best.mount)
        ):
            best = r
    if best is None:
        reach = ", ".join(r.mount for r in roots) or "nothing (no workspace and no project)"
        raise files.FileError(
            "outside",
            f"{path[:200]!r} is outside what the file tools reach: {reach}. Give a path relative to the "
            "workspace, or an absolute one under one of those; other paths are only inside a sandbox "
            "(use execute_command)",
        )
    return best, files.parse(norm[len(best.mount) :].lstrip("/"))


def sandbox_path(root: Root, parts: tuple[str, ...]) -> str:
    """The path as commands in the sandbox see it."""
    return posixpath.join(root.mount, *parts) if parts else root.mount


DEFAULT_WORKSPACE = "default"
PROJECT_NAME = "project"
PROJECT_MOUNT = "/project"
"""Where `serve --project DIR` mounts DIR (read-write), in commands and for the file tools."""


def stdio_places(config: Any, effective: Any) -> dict[str, Any]:
    """Check `serve --workspace NAME` and `--project DIR` (a config.ServeConfig)
    against the tenant's `effective` policy; the projects by name. ValueError
    when they cannot mean anything (over HTTP, or against the policy)."""
    projects: dict[str, Any] = {}
    http = config.transport == "http"
    name = config.workspace
    if name is not None:
        if http:
            raise ValueError("--workspace is for stdio; over HTTP each session (or create_workspace) has its own")
        if not NAME_RE.match(name):
            raise ValueError(f"--workspace {name!r} is not a valid name; expected {NAME_EXPECTED}")
        if effective.workspace.scope == "tenant" or not effective.workspace.enabled:
            raise ValueError(
                f"--workspace {name!r} names a workspace, but the policy's workspace for tenant "
                f"{effective.name!r} is "
                + ("disabled" if not effective.workspace.enabled else "shared by the tenant (workspace.scope: tenant)")
                + "; leave --workspace out"
            )
    project = config.project_dir
    if project is not None:
        if http:
            raise ValueError("--project is for stdio; over HTTP, name projects in the policy (projects:)")
        path = os.path.realpath(project)
        if not os.path.isdir(path):
            raise ValueError(f"--project {project!r} is not a directory; expected the project directory to mount")
        if path == "/" or path.split("/")[1] in ("proc", "sys", "dev"):
            raise ValueError(
                f"--project {project!r} cannot be mounted; expected a directory outside /, /proc, /sys, /dev"
            )
        if PROJECT_NAME in effective.projects:
            raise ValueError(f"the policy already names a project {PROJECT_NAME!r}; leave --project out or rename it")
        extra = {PROJECT_NAME: Project(path=path, mount=PROJECT_MOUNT, read_only=False)}
        clash = mount_clash(effective, extra)
        if clash:
            raise ValueError(f"--project: {clash}; move the policy's mount elsewhere")
        projects = extra
    return projects


__all__ = [
    "AgentWorkspaces",
    "CREATED_PREFIX",
    "Created",
    "MAX_CREATED",
    "NoSuchWorkspace",
    "Root",
    "locate",
    "sandbox_path",
    "stdio_places",
]
