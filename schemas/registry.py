"""Load the `.avsc` files, resolve their references and fingerprint the result.

Each `.avsc` file under `avro/` holds one named type. The three top-level
records (`Event`, `Command`, `Task`) reference the others by full name; here they
are inlined into standalone schemas, the form that is fingerprinted, written to
`avro/history/` and handed to fastavro.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

AVRO_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})

#: The top-level record of each topic kind.
TOP_LEVEL = {
    "event": "treeflow.events.Event",
    "command": "treeflow.commands.Command",
    "task": "treeflow.tasks.Task",
    "reply": "treeflow.replies.Reply",
    "snapshot": "treeflow.snapshots.Snapshot",
}


@dataclass(frozen=True)
class TopSchema:
    """One version of a top-level record's schema."""

    kind: str
    schema: dict[str, Any]
    fingerprint: bytes
    """CRC-64-AVRO of the parsing canonical form, little-endian as on the wire."""


def full_name(schema: dict[str, Any]) -> str:
    namespace = schema.get("namespace")
    name = schema["name"]
    return name if "." in name or not namespace else f"{namespace}.{name}"


@cache
def named_types() -> dict[str, dict[str, Any]]:
    """Every named type in `avro/*/`, by full name (history excluded)."""
    types: dict[str, dict[str, Any]] = {}
    root = resources.files(__package__).joinpath("avro")
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "history"):
        for path in sorted(folder.iterdir(), key=lambda p: p.name):
            if path.name.endswith(".avsc"):
                schema = json.loads(path.read_text())
                types[full_name(schema)] = schema
    return types


def inline(name: str, types: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A standalone copy of the type `name`: each named type defined at its first use."""
    defined: set[str] = set()

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            if node in AVRO_PRIMITIVES or node in defined:
                return node
            if node not in types:
                raise KeyError(f"unknown Avro type {node!r}")
            return walk(types[node])
        if isinstance(node, list):
            return [walk(branch) for branch in node]
        if node.get("type") in ("record", "enum", "fixed"):
            defined.add(full_name(node))
        out = dict(node)
        if node.get("type") == "record":
            out["fields"] = [{**field, "type": walk(field["type"])} for field in node["fields"]]
        elif node.get("type") == "array":
            out["items"] = walk(node["items"])
        elif node.get("type") == "map":
            out["values"] = walk(node["values"])
        elif isinstance(node.get("type"), (dict, list)):
            out["type"] = walk(node["type"])
        return out

    return walk(name)


def make_top_schema(kind: str, schema: dict[str, Any]) -> TopSchema:
    canonical = to_parsing_canonical_form(parse_schema(schema, _write_hint=False))
    # fastavro prints the CRC-64-AVRO fingerprint's bytes little-endian first,
    # the order Avro single-object encoding puts them on the wire.
    return TopSchema(kind=kind, schema=schema, fingerprint=bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")))


@cache
def current(kind: str) -> TopSchema:
    """The schema this version of treeflow writes for `kind` (event, command or task)."""
    return make_top_schema(kind, inline(TOP_LEVEL[kind], named_types()))


@cache
def history(kind: str) -> tuple[TopSchema, ...]:
    """Every released schema of `kind`, oldest first, as kept in `avro/history/`."""
    folder = resources.files(__package__).joinpath("avro").joinpath("history")
    versions = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith(f"{kind}-v") and path.name.endswith(".avsc"):
            versions.append(make_top_schema(kind, json.loads(path.read_text())))
    return tuple(versions)
