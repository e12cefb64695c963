"""Read a policy file's YAML safely, remembering where every key was written.

Why not `yaml.safe_load`: it silently keeps the last of two duplicate keys,
forgets line numbers (so errors could not say where to look), follows
aliases (a few hundred bytes of `&a [*a, *a, ...]` expand to gigabytes) and
applies YAML 1.1 surprises (`1000:1000` is the integer 61000, `no` is False,
`010` is 8).

So this module:
- composes the node tree with a `yaml.SafeLoader` subclass (only the safe
  constructors ever run);
- REJECTS ALIASES outright (`*name`): refused at the first alias event, before
  any expansion, so hostile input costs time linear in its size. Anchors
  alone are harmless and ignored. Sharing settings between tenants is what
  `tenants.NAME.extends` is for;
- resolves plain scalars with the YAML 1.2 core schema only: `true`/`false`,
  decimal integers, floats, `null`/`~`/empty; everything else (`yes`, `on`,
  `1:30`, `010`, dates) stays a string;
- refuses files over MAX_FILE_BYTES and nesting deeper than MAX_DEPTH;
- builds plain dicts/lists itself, recording the line of every key path and
  every duplicate key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import Problem

MAX_FILE_BYTES = 256 * 1024
"""Policy files are a few KiB; anything this large is a mistake or an attack."""
MAX_DEPTH = 32
"""The schema nests five levels deep; deeper input is refused."""

KeyPath = tuple[str | int, ...]

_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


class _PolicyLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars and no aliases."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in policy files; write the value out, "
                "or share a tenant's settings with `extends`",
                event.start_mark,
            )
        return super().compose_node(parent, index)


_PolicyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
_PolicyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
    list("-+0123456789"),
)
_PolicyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|(?:0|[1-9][0-9]*)(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_PolicyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:null",
    re.compile(r"^(?:~|null|Null|NULL|)$"),
    ["~", "n", "N", ""],
)


@dataclass
class Source:
    """A parsed policy document: plain data plus the line of each key path."""

    file: str
    data: Any
    text: bytes
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int:
        """The line of `path`, or of its closest written ancestor (1 for none)."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)


def format_path(path: KeyPath) -> str:
    """('tenants', 'alice', 'env', 'allow', 2) -> 'tenants.alice.env.allow[2]'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class _Builder:
    def __init__(self, loader: _PolicyLoader, source: Source) -> None:
        self.loader = loader
        self.source = source
        self.problems: list[Problem] = []

    def problem(self, node: Node, path: KeyPath, message: str, expected: str = "") -> None:
        self.problems.append(Problem(self.source.file, node.start_mark.line + 1, format_path(path), message, expected))

    def build(self, node: Node, path: KeyPath, depth: int) -> Any:
        if depth > MAX_DEPTH:
            self.problem(node, path, f"nested more than {MAX_DEPTH} levels deep", "the documented keys")
            return None
        if isinstance(node, MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                self.problem(node, path, f"YAML tag {node.tag!r} is not supported", "a plain mapping")
            out: dict[str, Any] = {}
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                key = self.key(key_node, path)
                if key is None:
                    continue
                if key in out:
                    self.problem(
                        key_node,
                        (*path, key),
                        f"duplicate key (first written on line {first_line[key]})",
                        "each key at most once per mapping",
                    )
                    continue
                first_line[key] = line
                self.source.lines[(*path, key)] = line
                out[key] = self.build(value_node, (*path, key), depth + 1)
            return out
        if isinstance(node, SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                self.problem(node, path, f"YAML tag {node.tag!r} is not supported", "a plain list")
            items = []
            for i, item in enumerate(node.value):
                self.source.lines[(*path, i)] = item.start_mark.line + 1
                items.append(self.build(item, (*path, i), depth + 1))
            return items
        assert isinstance(node, ScalarNode)
        if node.tag not in _SCALAR_TAGS:
            self.problem(node, path, f"YAML tag {node.tag!r} is not supported", "a string, number, boolean or null")
            return None
        return self.loader.construct_object(node, deep=True)

    def key(self, key_node: Node, path: KeyPath) -> str | None:
        if not isinstance(key_node, ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
            shown = key_node.value if isinstance(key_node, ScalarNode) else "<" + getattr(key_node, "id", "node") + ">"
            self.problem(
                key_node,
                (*path, str(shown)),
                f"key {shown!r} is not a string",
                "a plain string key (quote keys that look like numbers, booleans or null)",
            )
            return None
        return str(key_node.value)


def parse(text: bytes, file: str) -> tuple[Source, list[Problem]]:
    """Parse `text`; return the source and any problems (never raises on bad YAML)."""
    source = Source(file=file, data=None, text=text)
    if len(text) > MAX_FILE_BYTES:
        return source, [Problem(file, 1, "", f"file is {len(text)} bytes", f"at most {MAX_FILE_BYTES} bytes")]
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as e:
        line = text[: e.start].count(b"\n") + 1
        return source, [Problem(file, line, "", "not valid UTF-8", "a UTF-8 text file")]
    loader: _PolicyLoader | None = None
    try:
        loader = _PolicyLoader(decoded)
        node = loader.get_single_node()
        if node is None:
            return source, [Problem(file, 1, "", "the file is empty", "a mapping starting with `version: 1`")]
        builder = _Builder(loader, source)
        source.lines[()] = node.start_mark.line + 1
        source.data = builder.build(node, (), 0)
        return source, builder.problems
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        return source, [Problem(file, line, "", f"YAML syntax: {what}", "valid YAML")]
    except yaml.reader.ReaderError as e:
        line = decoded[: e.position].count("\n") + 1
        return source, [
            Problem(
                file,
                line,
                "",
                f"character U+{e.character:04X} is not allowed in YAML"
                if isinstance(e.character, int)
                else f"byte {e.character!r} is not allowed in YAML",
                "printable text",
            )
        ]
    except yaml.YAMLError as e:
        return source, [Problem(file, 1, "", f"YAML: {e}", "valid YAML")]
    except RecursionError:
        return source, [Problem(file, 1, "", "nested too deeply", f"at most {MAX_DEPTH} levels")]
    finally:
        if loader is not None:
            loader.dispose()
