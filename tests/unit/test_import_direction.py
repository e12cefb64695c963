"""Imports go one way (docs/architecture.md): each room imports only the rooms below it.

Reads the source with `ast` (every import, function-local ones included), so
a new upward import fails here rather than as a cycle at some later start-up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "gvisor_mcp"

FRONTS = {"gvisor_mcp.cli", "gvisor_mcp.images.cli", "gvisor_mcp.policy.cli", "gvisor_mcp.workspace_cli"}
"""Command-line fronts: they may import anything below them; nothing imports them (but each other)."""
TRANSPORTS = {"gvisor_mcp.stdio", "gvisor_mcp.http"}
SERVING = {"gvisor_mcp.server", "gvisor_mcp.startup", "gvisor_mcp.asgi", *TRANSPORTS}
TOOLS = "gvisor_mcp.tools"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports (for `from X import name`, X.name too when it is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                as_path = SRC.parent.joinpath(*candidate.split("."))
                if as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists():
                    found.add(candidate)
    return found


GRAPH = {module_name(p): imports(p) for p in sorted(SRC.rglob("*.py"))}


def within(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def importers_of(forbidden: list[str], rooms: list[str], *, allow: set[str] = frozenset()) -> list[str]:
    """'a -> b' for every module a in `rooms` that imports a module b in `forbidden`."""
    bad = []
    for module, targets in GRAPH.items():
        if module in allow or not any(within(module, r) for r in rooms):
            continue
        for target in sorted(targets):
            if any(within(target, f) for f in forbidden) and not any(within(target, r) for r in rooms if r == module):
                bad.append(f"{module} -> {target}")
    return bad


def test_the_source_tree_is_read():
    assert "gvisor_mcp.sandbox.manager" in GRAPH and "gvisor_mcp.runtime" in GRAPH
    assert "gvisor_mcp.sandbox.errors" in GRAPH["gvisor_mcp.sandbox.manager"]


def test_errors_is_a_leaf():
    assert [t for t in GRAPH["gvisor_mcp.errors"] if t.startswith("gvisor_mcp")] == []


def test_the_sandbox_imports_only_itself_and_the_error_base():
    bad = [
        f"{m} -> {t}"
        for m, ts in GRAPH.items()
        if within(m, "gvisor_mcp.sandbox")
        for t in ts
        if (t.startswith("gvisor_mcp") and not within(t, "gvisor_mcp.sandbox") and t != "gvisor_mcp.errors")
        or within(t, "mcp")
    ]
    assert bad == []


@pytest.mark.parametrize("room", ["gvisor_mcp.policy", "gvisor_mcp.images", "gvisor_mcp.network"])
def test_the_lower_rooms_know_nothing_of_mcp_or_the_runtime(room):
    above = ["mcp", "gvisor_mcp.runtime", "gvisor_mcp.jobs", "gvisor_mcp.results", TOOLS, *SERVING, *FRONTS]
    assert importers_of(above, [room], allow=FRONTS) == []


def test_the_runtime_knows_nothing_of_mcp_or_what_serves_it():
    rooms = [
        "gvisor_mcp.runtime",
        "gvisor_mcp.jobs",
        "gvisor_mcp.results",
        "gvisor_mcp.config",
        "gvisor_mcp.roots",
        "gvisor_mcp.audit",
        "gvisor_mcp.metrics",
        "gvisor_mcp.files",
        "gvisor_mcp.workspace",
    ]
    assert importers_of(["mcp", TOOLS, *SERVING, *FRONTS], rooms) == []


def test_tools_do_not_import_the_server_or_a_transport():
    assert importers_of([*SERVING, *FRONTS], [TOOLS]) == []


def test_the_server_does_not_import_a_transport():
    assert importers_of([*TRANSPORTS, "gvisor_mcp.startup", *FRONTS], ["gvisor_mcp.server"]) == []


def test_transports_do_not_import_each_other_or_the_cli():
    for transport in TRANSPORTS:
        others = [t for t in TRANSPORTS if t != transport]
        assert importers_of([*others, *FRONTS], [transport]) == []


def test_nothing_but_a_front_imports_a_front():
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() if m not in FRONTS for t in ts if t in FRONTS]
    assert bad == []


def test_a_module_over_400_lines_says_why_at_its_top():
    """One concept per module: a long one writes down why it is not split."""
    long = [p for p in SRC.rglob("*.py") if len(p.read_text().splitlines()) > 400]
    unexplained = [
        str(p.relative_to(SRC))
        for p in long
        if "Why over ~400 lines" not in (ast.get_docstring(ast.parse(p.read_text())) or "")
    ]
    assert unexplained == []


CLUSTER = "gvisor_mcp.cluster"
CLUSTER_IMPORTERS = {"gvisor_mcp.startup", "gvisor_mcp.runtime", "gvisor_mcp.cli"}
"""The serve path (`serve --backend ray`: startup joins and leaves the cluster,
runtime builds the RayRunner) and the `agent` command: ray is an optional
extra, so each imports cluster inside a function, never at module level."""


def test_the_cluster_knows_nothing_of_mcp_tools_or_what_serves_it():
    assert importers_of(["mcp", TOOLS, *SERVING, *FRONTS], [CLUSTER]) == []


def test_only_the_serve_path_imports_the_cluster_and_only_lazily():
    importers = {m for m, ts in GRAPH.items() if not within(m, CLUSTER) and any(within(t, CLUSTER) for t in ts)}
    assert importers <= CLUSTER_IMPORTERS, importers - CLUSTER_IMPORTERS
    at_top = []
    for module in sorted(importers):
        path = SRC.parent.joinpath(*module.split(".")).with_suffix(".py")
        for node in ast.parse(path.read_text()).body:  # module level only: function-local imports are lazy
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("cluster", "gvisor_mcp.cluster")):
                at_top.append(f"{module}: from {'.' * node.level}{node.module}")
            if isinstance(node, ast.Import) and any(within(a.name, CLUSTER) for a in node.names):
                at_top.append(module)
    assert at_top == []
