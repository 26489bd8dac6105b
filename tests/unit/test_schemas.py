import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

import treeflow.schemas.models as models
from treeflow.schemas import (
    COMMANDS,
    EVENT_TYPES,
    EVENTS,
    MODELS_BY_AVRO_NAME,
    PAYLOAD_MODELS,
    TASKS,
    Command,
    DecodeError,
    Event,
    EventType,
    RecordPosition,
    Task,
)
from treeflow.schemas import codegen, registry
from tests.samples import sample

SCHEMAS = Path(registry.__file__).parent

# Mistral's WorkflowEventType: treeflow must carry every one of them.
MISTRAL_EVENT_TYPES = {
    "WORKFLOW_EXECUTION_STARTED", "WORKFLOW_EXECUTION_COMPLETED", "WORKFLOW_EXECUTION_FAILED",
    "WORKFLOW_EXECUTION_CANCELED", "WORKFLOW_EXECUTION_CONTINUED_AS_NEW", "WORKFLOW_TASK_TIMED_OUT",
    "WORKFLOW_TASK_FAILED", "ACTIVITY_TASK_STARTED", "ACTIVITY_TASK_COMPLETED", "ACTIVITY_TASK_RETRYING",
    "ACTIVITY_TASK_FAILED", "CUSTOM_TASK_STARTED", "CUSTOM_TASK_IN_PROGRESS", "CUSTOM_TASK_COMPLETED",
    "CUSTOM_TASK_FAILED", "CUSTOM_TASK_TIMED_OUT", "CUSTOM_TASK_CANCELED",
}
# What DESIGN.md §4 adds to them.
TREEFLOW_EVENT_TYPES = {
    "WORKFLOW_EXECUTION_TERMINATED", "WORKFLOW_EXECUTION_TIMED_OUT", "WORKFLOW_EXECUTION_CANCEL_REQUESTED",
    "WORKFLOW_EXECUTION_SIGNALED", "TIMER_STARTED", "TIMER_FIRED", "ACTIVITY_TASK_SCHEDULED",
    "ACTIVITY_TASK_TIMED_OUT", "START_CHILD_WORKFLOW_EXECUTION_INITIATED", "CHILD_WORKFLOW_EXECUTION_STARTED",
    "CHILD_WORKFLOW_EXECUTION_COMPLETED", "CHILD_WORKFLOW_EXECUTION_FAILED", "CHILD_WORKFLOW_EXECUTION_CANCELED",
    "CHILD_WORKFLOW_EXECUTION_TERMINATED", "CHILD_WORKFLOW_EXECUTION_TIMED_OUT", "PARENT_CLOSE_POLICY_APPLIED",
}


def test_every_required_event_type_exists_with_its_own_payload_record() -> None:
    names = {t.value for t in EventType}
    assert MISTRAL_EVENT_TYPES <= names
    assert TREEFLOW_EVENT_TYPES <= names
    assert set(PAYLOAD_MODELS) == set(EventType)
    assert len(set(PAYLOAD_MODELS.values())) == len(EventType)


def test_the_event_envelope_has_the_contract_fields() -> None:
    assert list(Event.model_fields) == ["event_id", "event_type", "timestamp", "sequence", "workflow_context",
                                        "attempt", "payload"]
    assert list(models.WorkflowContext.model_fields) == [
        "workflow_exec_id", "workflow_run_id", "workflow_name", "parent_workflow_exec_id",
        "root_workflow_exec_id", "task_queue"]
    assert not models.WorkflowContext.model_fields["parent_workflow_exec_id"].is_required()
    assert models.WorkflowContext.model_fields["root_workflow_exec_id"].is_required()


def test_models_py_is_what_codegen_makes_of_the_avsc_files() -> None:
    committed = (SCHEMAS / "models.py").read_text()
    assert committed == codegen.render(), "run `python -m treeflow.schemas.codegen` after changing a schema"


def test_every_avsc_field_is_a_model_field_and_back() -> None:
    for name, schema in registry.named_types().items():
        if schema["type"] != "record":
            continue
        model = MODELS_BY_AVRO_NAME[name]
        assert [f["name"] for f in schema["fields"]] == list(model.model_fields), name
        for field in schema["fields"]:
            assert ("default" in field) != model.model_fields[field["name"]].is_required(), (name, field["name"])


def test_the_current_schemas_are_released_in_history() -> None:
    for kind in registry.TOP_LEVEL:
        fingerprints = [version.fingerprint for version in registry.history(kind)]
        assert registry.current(kind).fingerprint in fingerprints, (
            f"the {kind} schema changed: run `python -m treeflow.schemas.codegen` to record it")


@pytest.mark.parametrize("event_type", list(EventType))
def test_every_event_type_round_trips(event_type: EventType) -> None:
    event = sample(Event).model_copy(update={"event_type": event_type,
                                             "payload": sample(PAYLOAD_MODELS[event_type])})
    data = EVENTS.encode(event)
    assert data[:2] == b"\xc3\x01" and data[2:10] == registry.current("event").fingerprint
    assert EVENTS.decode(data) == event


def test_commands_and_tasks_round_trip_every_branch() -> None:
    for record, codec, field in ((Command, COMMANDS, "payload"), (Task, TASKS, "payload")):
        branches = record.model_fields[field].annotation.__args__
        for branch in branches:
            value = sample(record).model_copy(update={field: sample(branch)})
            assert codec.decode(codec.encode(value)) == value
    decisions = models.CompleteWorkflowTask.model_fields["decisions"].annotation.__args__[0].__args__
    task = models.CompleteWorkflowTask(task_id="t", workflow_run_id="r", history_length=4,
                                       decisions=[sample(d) for d in decisions])
    command = sample(Command).model_copy(update={"payload": task})
    assert COMMANDS.decode(COMMANDS.encode(command)).payload.decisions == task.decisions


def test_timestamps_keep_milliseconds_and_must_carry_a_zone() -> None:
    event = sample(Event).model_copy(update={"timestamp": datetime(2026, 5, 1, 12, 0, 0, 123456, timezone.utc)})
    assert Event.model_validate(event.model_dump()).timestamp.microsecond == 123000
    with pytest.raises(ValidationError, match="timezone-aware"):
        Event.model_validate({**sample(Event).model_dump(), "timestamp": datetime(2026, 5, 1)})


def test_event_type_names_its_payload() -> None:
    for event_type, model in PAYLOAD_MODELS.items():
        assert EVENT_TYPES[model] is event_type
        assert event_type.value == "".join("_" + c if c.isupper() else c.upper() for c in model.__name__)[1:]


BAD_RECORDS = {
    "garbage": (b"this is not avro at all", "not an Avro single-object record"),
    "empty": (b"", "not an Avro single-object record"),
    "tombstone": (None, "no value"),
    "unknown fingerprint": (b"\xc3\x01" + bytes(8) + b"\x02", "unknown event schema fingerprint 0000000000000000"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_bad_records_raise_one_clear_error_naming_where(name: str) -> None:
    data, reason = BAD_RECORDS[name]
    with pytest.raises(DecodeError) as caught:
        EVENTS.decode(data, RecordPosition("treeflow.events", 3, 42))
    assert reason in str(caught.value)
    assert "treeflow.events[3]@42" in str(caught.value)
    assert caught.value.position.offset == 42


def test_truncated_and_padded_records_raise_decode_errors() -> None:
    good = EVENTS.encode(sample(Event))
    for cut in range(10, len(good)):
        with pytest.raises(DecodeError):
            EVENTS.decode(good[:cut])
    with pytest.raises(DecodeError, match="trailing bytes"):
        EVENTS.decode(good + b"\x00")


def test_a_command_is_not_an_event() -> None:
    with pytest.raises(DecodeError, match="unknown event schema fingerprint"):
        EVENTS.decode(COMMANDS.encode(sample(Command)))


def test_avsc_files_are_valid_json_with_docs() -> None:
    for path in (SCHEMAS / "avro").rglob("*.avsc"):
        schema = json.loads(path.read_text())
        if path.parent.name != "history":
            assert schema.get("doc"), f"{path} needs a doc"
            assert path.stem == schema["name"]


def _shape(value: object) -> object:
    """Every value's type, recursively: an enum decoded as its bare string shows here."""
    if isinstance(value, models.AvroModel):
        return (type(value), {name: _shape(v) for name, v in value.__dict__.items()})
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value)


def test_decoding_without_validation_builds_what_validation_builds() -> None:
    """The decode hot path builds models with `model_construct` (no pydantic validation):
    the same values and the same types as validating them, for every branch."""
    from io import BytesIO

    from fastavro import schemaless_reader

    from treeflow.schemas.codec import HEADER_SIZE

    decisions = models.CompleteWorkflowTask.model_fields["decisions"].annotation.__args__[0].__args__
    values = [(EVENTS, sample(Event).model_copy(update={"event_type": t, "payload": sample(PAYLOAD_MODELS[t])}))
              for t in EventType]
    for record, codec in ((Command, COMMANDS), (Task, TASKS)):
        values += [(codec, sample(record).model_copy(update={"payload": sample(branch)}))
                   for branch in record.model_fields["payload"].annotation.__args__]
    values.append((COMMANDS, sample(Command).model_copy(update={"payload": models.CompleteWorkflowTask(
        task_id="t", workflow_run_id="r", history_length=4, decisions=[sample(d) for d in decisions])})))
    history = [value for codec, value in values if codec is EVENTS][:5]
    values.append((TASKS, sample(Task).model_copy(update={"payload": models.WorkflowTask(history=history)})))
    for codec, value in values:
        body = BytesIO(codec.encode(value))
        body.seek(HEADER_SIZE)
        raw = schemaless_reader(body, codec.schema, None, return_record_name=True, return_record_name_override=True)
        fast, validated = codec.model.from_avro(raw), codec.model.from_avro_validated(raw)
        assert fast == validated == value
        assert _shape(fast) == _shape(validated) == _shape(value)
