"""Records written by every released schema stay readable by the current one."""

import copy
import json
import struct
from pathlib import Path

from treeflow.schemas import EVENTS, registry
from treeflow.schemas.compat import incompatibilities

FIXTURES = Path(__file__).parents[1] / "fixtures"


def read_fixture(name: str) -> list[bytes]:
    data = (FIXTURES / name).read_bytes()
    records, at = [], 0
    while at < len(data):
        (size,) = struct.unpack_from(">I", data, at)
        records.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return records


def subset(expected: object, actual: object) -> bool:
    """True when `actual` has everything `expected` has (later versions may add fields)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and subset(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(map(subset, expected, actual))
    return expected == actual


def test_events_written_by_v1_decode_forever() -> None:
    records = read_fixture("events-v1.bin")
    expected = json.loads((FIXTURES / "events-v1.json").read_text())
    assert len(records) == len(expected) >= 39
    for data, want in zip(records, expected):
        event = EVENTS.decode(data)
        assert subset(want, event.model_dump(mode="json")), want["event_type"]


def test_every_released_schema_is_compatible_with_the_current_one() -> None:
    for kind in registry.TOP_LEVEL:
        for version in registry.history(kind):
            assert incompatibilities(version.schema, registry.current(kind).schema) == [], kind


def test_the_rules_catch_breaking_changes() -> None:
    old = registry.current("event").schema
    context = next(f for f in old["fields"] if f["name"] == "workflow_context")["type"]

    removed = copy.deepcopy(old)
    removed["fields"] = [f for f in removed["fields"] if f["name"] != "sequence"]
    assert incompatibilities(old, removed) == ["treeflow.events.Event.sequence: field removed"]

    added = copy.deepcopy(old)
    added["fields"].append({"name": "tenant", "type": "string"})
    assert incompatibilities(old, added) == ["treeflow.events.Event.tenant: field added without a default"]
    added["fields"][-1]["default"] = ""
    assert incompatibilities(old, added) == []

    narrowed = copy.deepcopy(old)
    event_type = next(f for f in narrowed["fields"] if f["name"] == "event_type")["type"]
    event_type["symbols"].remove("TIMER_FIRED")
    assert incompatibilities(old, narrowed) == ["treeflow.events.EventType: enum symbol TIMER_FIRED removed"]

    retyped = copy.deepcopy(old)
    next(f for f in retyped["fields"] if f["name"] == "sequence")["type"] = "int"
    assert incompatibilities(old, retyped) == ["treeflow.events.Event.sequence: type changed from long to int"]

    widened = copy.deepcopy(old)
    next(f for f in widened["fields"] if f["name"] == "sequence")["type"] = "double"
    assert incompatibilities(old, widened) == []

    renamed = copy.deepcopy(old)
    new_context = next(f for f in renamed["fields"] if f["name"] == "workflow_context")["type"]
    new_context["name"] = "Context"
    assert context["name"] == "WorkflowContext"
    assert incompatibilities(old, renamed) == [
        "treeflow.events.Event.workflow_context: treeflow.WorkflowContext renamed to treeflow.Context"]

    fewer_branches = copy.deepcopy(old)
    payload = next(f for f in fewer_branches["fields"] if f["name"] == "payload")
    payload["type"] = [b for b in payload["type"] if b["name"] != "TimerFired"]
    assert incompatibilities(old, fewer_branches) == [
        "treeflow.events.Event.payload: union branch treeflow.events.TimerFired removed"]
