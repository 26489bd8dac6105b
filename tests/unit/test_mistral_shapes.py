"""treeflow's events in Mistral's shapes, checked against the `mistralai` client's own models:
every event type either validates as the Mistral event it is shown as, or is left out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mistralai.client import models
from pydantic import TypeAdapter

from treeflow.consumers import Cursor, TreeEvent
from treeflow.consumers.mistral import MistralFrames
from treeflow.consumers.mistral.shapes import MISTRAL_EVENT_TYPES, mistral_event, mistral_type, sse_payload
from treeflow.schemas import CustomTaskPayload, CustomTaskPayloadKind, Event, EventType
from tests.samples import context, event_of

MISTRAL_EVENT = TypeAdapter(models.ListWorkflowEventResponseEvent)


def sample(event_type: EventType) -> Event:
    event = event_of(event_type, context("child", "root", parent="root", name="wf"), 3)
    if event_type.value.startswith("CUSTOM_TASK_"):  # the sample's patch is no RFC 6902 list
        payload = event.payload.model_copy(update={"payload": CustomTaskPayload(
            kind=CustomTaskPayloadKind.JSON, value_json='{"tokens": ["a"]}')})
        event = event.model_copy(update={"payload": payload})
    return event


@pytest.mark.parametrize("event_type", list(EventType), ids=lambda t: t.value)
def test_each_event_type_is_a_mistral_event_or_left_out(event_type: EventType) -> None:
    event = sample(event_type)
    data = mistral_event(event, activity_input={"value": "in"})
    shown = mistral_type(event_type)
    if shown is None:
        assert data is None and event_type.value not in MISTRAL_EVENT_TYPES
        return
    parsed: Any = MISTRAL_EVENT.validate_python(data)
    assert parsed.event_type == shown
    assert (parsed.workflow_exec_id, parsed.root_workflow_exec_id, parsed.parent_workflow_exec_id) == (
        "child", "root", "root")
    assert parsed.event_timestamp == int(event.timestamp.timestamp()) * 10**9
    frame = models.StreamEventSsePayload.model_validate(sse_payload(event, 42, data))
    assert frame.broker_sequence == 42 and frame.workflow_context.namespace == "default"
    if event_type is EventType.ACTIVITY_TASK_STARTED:
        assert parsed.attributes.input.value == {"value": "in"}


def test_closing_types_mistral_lacks_are_failures_that_keep_their_own_type() -> None:
    assert [t.value for t in EventType if mistral_type(t) is not None and t.value not in MISTRAL_EVENT_TYPES] == [
        "WORKFLOW_EXECUTION_TERMINATED", "WORKFLOW_EXECUTION_TIMED_OUT"]
    event = sample(EventType.WORKFLOW_EXECUTION_TERMINATED)
    data = mistral_event(event)
    assert data is not None and data["event_type"] == "WORKFLOW_EXECUTION_FAILED"
    assert data["attributes"]["failure"]["message"].startswith("terminated: ")
    assert sse_payload(event, 1, data)["metadata"]["treeflow_event_type"] == "WORKFLOW_EXECUTION_TERMINATED"
    assert sorted(MISTRAL_EVENT_TYPES) == sorted(models.WorkflowEventType.__args__)  # type: ignore[attr-defined]


def test_frames_parse_as_the_client_reads_them_and_filters_apply() -> None:
    frames = MistralFrames(event_types=frozenset({"ACTIVITY_TASK_STARTED"}))
    scheduled = TreeEvent.of(sample(EventType.ACTIVITY_TASK_SCHEDULED), Cursor(1, 9))
    started = TreeEvent.of(sample(EventType.ACTIVITY_TASK_STARTED), Cursor(1, 10))
    assert frames.event(scheduled, None) is None  # left out, but its input is kept for the start
    text = frames.event(started, 1000)
    assert text is not None
    lines = dict(line.split(": ", 1) for line in text.strip().split("\n"))
    assert lines["retry"] == "1000" and lines["id"] == str(Cursor(1, 10)) and lines["event"] == "ACTIVITY_TASK_STARTED"
    body = models.GetStreamEventsV1WorkflowsEventsStreamGetResponseBody.model_validate(
        {"event": lines["event"], "id": lines["id"], "data": json.loads(lines["data"])})
    assert body.data.broker_sequence == (1 << 48) + 10  # type: ignore[union-attr]
    assert body.data.data.attributes.input.value == {"sample": "input_json"}  # type: ignore[union-attr]
    assert MistralFrames(scope="workflow").event(started, None) is None
    assert MistralFrames(activity_name="elsewhere").event(started, None) is None
    assert MistralFrames(stream="token").event(started, None) is None
    error = MistralFrames.error(ConnectionError("gone"), None)
    payload = json.loads(error.split("data: ", 1)[1])
    assert models.WorkflowStreamError.model_validate(payload).reason == "gone"
