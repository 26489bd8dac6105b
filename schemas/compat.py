"""Check the schema evolution rules: a new schema must read every record an old one wrote.

The rules (schemas/README.md): add fields only with defaults; never remove or
rename a field, a record, an enum symbol or a union branch; change a type only
by Avro promotion (int -> long -> float -> double, string <-> bytes).
"""

from __future__ import annotations

from typing import Any

from .registry import full_name

PROMOTIONS = {
    ("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"), ("long", "double"),
    ("float", "double"), ("string", "bytes"), ("bytes", "string"),
}


def incompatibilities(old: Any, new: Any) -> list[str]:
    """What stops `new` (a standalone schema) from being a compatible successor of `old`."""
    problems: list[str] = []
    _compare(old, new, _definitions(old), _definitions(new), "", problems, set())
    return problems


def _definitions(schema: Any) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for branch in node:
                walk(branch)
        elif isinstance(node, dict):
            if node.get("type") in ("record", "enum", "fixed"):
                found[full_name(node)] = node
            for field in node.get("fields", []):
                walk(field["type"])
            for key in ("items", "values"):
                if key in node:
                    walk(node[key])
            if isinstance(node.get("type"), (dict, list)):
                walk(node["type"])

    walk(schema)
    return found


def _resolve(node: Any, definitions: dict[str, dict[str, Any]]) -> Any:
    if isinstance(node, str) and node in definitions:
        return definitions[node]
    if isinstance(node, dict) and isinstance(node.get("type"), (dict, list)):
        return _resolve(node["type"], definitions)
    if isinstance(node, dict) and node.get("type") not in ("record", "enum", "fixed", "array", "map"):
        return node["type"]  # a primitive with a logical type
    return node


def _kind(node: Any) -> str:
    return node if isinstance(node, str) else ("union" if isinstance(node, list) else node["type"])


def _label(node: Any) -> str:
    return full_name(node) if isinstance(node, dict) and "name" in node else _kind(node)


def _compare(old: Any, new: Any, old_defs: dict, new_defs: dict, path: str,
             problems: list[str], seen: set[tuple[str, str]]) -> None:
    old, new = _resolve(old, old_defs), _resolve(new, new_defs)
    where = path or "the schema"
    old_kind, new_kind = _kind(old), _kind(new)
    if old_kind == "union" or new_kind == "union":
        new_branches = new if new_kind == "union" else [new]
        for branch in old if old_kind == "union" else [old]:
            matches = [b for b in new_branches if _label(_resolve(b, new_defs)) == _label(_resolve(branch, old_defs))]
            if not matches:
                problems.append(f"{where}: union branch {_label(_resolve(branch, old_defs))} removed")
            else:
                _compare(branch, matches[0], old_defs, new_defs, path, problems, seen)
        return
    if old_kind != new_kind:
        if (old_kind, new_kind) not in PROMOTIONS:
            problems.append(f"{where}: type changed from {old_kind} to {new_kind}")
        return
    if old_kind in ("record", "enum", "fixed") and full_name(old) != full_name(new):
        problems.append(f"{where}: {full_name(old)} renamed to {full_name(new)}")
        return
    if old_kind == "record":
        key = (full_name(old), full_name(new))
        if key in seen:
            return
        seen.add(key)
        old_fields = {f["name"]: f for f in old["fields"]}
        new_fields = {f["name"]: f for f in new["fields"]}
        for name in old_fields.keys() - new_fields.keys():
            problems.append(f"{full_name(old)}.{name}: field removed")
        for name in new_fields.keys() - old_fields.keys():
            if "default" not in new_fields[name]:
                problems.append(f"{full_name(new)}.{name}: field added without a default")
        for name in old_fields.keys() & new_fields.keys():
            _compare(old_fields[name]["type"], new_fields[name]["type"], old_defs, new_defs,
                     f"{full_name(old)}.{name}", problems, seen)
    elif old_kind == "enum":
        for symbol in set(old["symbols"]) - set(new["symbols"]):
            problems.append(f"{full_name(old)}: enum symbol {symbol} removed")
    elif old_kind == "array":
        _compare(old["items"], new["items"], old_defs, new_defs, f"{where}[]", problems, seen)
    elif old_kind == "map":
        _compare(old["values"], new["values"], old_defs, new_defs, f"{where}{{}}", problems, seen)
