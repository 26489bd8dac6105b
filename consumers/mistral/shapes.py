"""treeflow's events and executions in the JSON shapes of Mistral's Workflows API.

Pure functions (no Kafka, no HTTP): the routes in `treeflow.consumers.mistral.routes`
use them, and a test can check them against the `mistralai` client's models.

Mistral's event union has 17 types (its ``WorkflowEventType``). treeflow records more;
`mistral_event` maps them so that a Mistral client never sees a type it cannot read:

- WORKFLOW_EXECUTION_TERMINATED and WORKFLOW_EXECUTION_TIMED_OUT close an execution
  and Mistral has no type for them: they become WORKFLOW_EXECUTION_FAILED, with the
  reason in ``failure.message`` (the SSE frame's ``metadata.treeflow_event_type``
  keeps the real type), so that a consumer waiting for a closing event sees one;
- every other type Mistral lacks (timers, signals, children, updates, markers,
  activity scheduled/timed out/canceled, workflow task completed...) is left out
  (`mistral_event` answers None). treeflow's own frames (``format=treeflow``) carry them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from treeflow.schemas import CLOSING_STATUS, CustomTaskPayloadKind, Event, EventType

#: Mistral's WorkflowEventType: the event types its clients can read.
MISTRAL_EVENT_TYPES: tuple[str, ...] = (
    "WORKFLOW_EXECUTION_STARTED", "WORKFLOW_EXECUTION_COMPLETED", "WORKFLOW_EXECUTION_FAILED",
    "WORKFLOW_EXECUTION_CANCELED", "WORKFLOW_EXECUTION_CONTINUED_AS_NEW", "WORKFLOW_TASK_TIMED_OUT",
    "WORKFLOW_TASK_FAILED", "CUSTOM_TASK_STARTED", "CUSTOM_TASK_IN_PROGRESS", "CUSTOM_TASK_COMPLETED",
    "CUSTOM_TASK_FAILED", "CUSTOM_TASK_TIMED_OUT", "CUSTOM_TASK_CANCELED", "ACTIVITY_TASK_STARTED",
    "ACTIVITY_TASK_COMPLETED", "ACTIVITY_TASK_RETRYING", "ACTIVITY_TASK_FAILED",
)
#: The namespace in every frame's workflow_context (treeflow has one per topic prefix).
NAMESPACE = "default"
#: The ``stream`` of a frame that is not a custom task's (a custom task's is its type).
EVENTS_STREAM = "events"
#: treeflow's types shown to Mistral clients as another type (see the module's docstring).
SHOWN_AS = {EventType.WORKFLOW_EXECUTION_TERMINATED: "WORKFLOW_EXECUTION_FAILED",
            EventType.WORKFLOW_EXECUTION_TIMED_OUT: "WORKFLOW_EXECUTION_FAILED"}
#: The events that close an execution (continued-as-new does not: its next run follows).
CLOSED_EVENTS = frozenset(CLOSING_STATUS) - {EventType.WORKFLOW_EXECUTION_CONTINUED_AS_NEW}


def mistral_type(event_type: EventType) -> str | None:
    """The Mistral event type an event of `event_type` is shown as; None when it is left out."""
    shown = SHOWN_AS.get(event_type, event_type.value)
    return shown if shown in MISTRAL_EVENT_TYPES else None


def nanoseconds(moment: datetime) -> int:
    """Unix time in nanoseconds (Mistral's ``event_timestamp``)."""
    return int(moment.timestamp() * 1_000_000) * 1000


def decoded(text: str | None) -> Any:
    """User data recorded as JSON text, as a value (None stays None)."""
    return None if text is None else json.loads(text)


def json_payload(value: Any) -> dict[str, Any]:
    return {"type": "json", "value": value}


def _failure(failure: Any, fallback: str = "failed") -> dict[str, Any]:
    if failure is None:
        return {"message": fallback}
    return {"message": failure.message if failure.type in ("ApplicationError", "") else
            f"{failure.type}: {failure.message}"}


def _custom_payload(payload: Any) -> dict[str, Any] | None:
    if payload is None:
        return None
    if payload.kind is CustomTaskPayloadKind.JSON_PATCH:
        return {"type": "json_patch", "value": decoded(payload.value_json)}
    return json_payload(decoded(payload.value_json))


@dataclass
class ActivityInputs:
    """Activity inputs seen in ACTIVITY_TASK_SCHEDULED events, for the ACTIVITY_TASK_STARTED
    frames that follow (Mistral's carry the input; treeflow records it once, when scheduled).
    Bounded by the activities open in the streamed events."""

    inputs: dict[tuple[str, str], Any] = field(default_factory=dict)

    def observe(self, event: Event) -> Any:
        """Record what `event` says of an activity's input; returns the input of its activity."""
        payload = event.payload
        activity_id = getattr(payload, "activity_id", None)
        if activity_id is None or not event.event_type.value.startswith("ACTIVITY_TASK_"):
            return None
        key = (event.workflow_context.workflow_exec_id, activity_id)
        if event.event_type is EventType.ACTIVITY_TASK_SCHEDULED:
            self.inputs[key] = decoded(payload.input_json)  # type: ignore[union-attr]
            return self.inputs[key]
        if event.event_type in (EventType.ACTIVITY_TASK_COMPLETED, EventType.ACTIVITY_TASK_FAILED,
                                EventType.ACTIVITY_TASK_CANCELED):
            return self.inputs.pop(key, None)
        return self.inputs.get(key)


def mistral_event(event: Event, activity_input: Any = None) -> dict[str, Any] | None:
    """The event as Mistral's event responses have it (``event_type``, ``attributes``...);
    None for a type Mistral has no counterpart of. `activity_input` is the input shown in an
    ACTIVITY_TASK_STARTED (see `ActivityInputs`)."""
    shown = mistral_type(event.event_type)
    if shown is None:
        return None
    context = event.workflow_context
    return {
        "event_id": event.event_id,
        "event_timestamp": nanoseconds(event.timestamp),
        "root_workflow_exec_id": context.root_workflow_exec_id,
        "parent_workflow_exec_id": context.parent_workflow_exec_id,
        "workflow_exec_id": context.workflow_exec_id,
        "workflow_run_id": context.workflow_run_id,
        "workflow_name": context.workflow_name,
        "event_type": shown,
        "attributes": _ATTRIBUTES[event.event_type](event, activity_input),
    }


def _workflow(event: Event, extra: dict[str, Any]) -> dict[str, Any]:
    return {"task_id": event.event_id, **extra, "attempt": event.attempt or 1}


def _activity(event: Event, extra: dict[str, Any]) -> dict[str, Any]:
    payload = event.payload
    return {"task_id": payload.activity_id, "activity_name": payload.activity_name, **extra}  # type: ignore[union-attr]


def _custom(event: Event, extra: dict[str, Any]) -> dict[str, Any]:
    payload = event.payload
    return {"custom_task_id": payload.custom_task_id, "custom_task_type": payload.custom_task_type,  # type: ignore[union-attr]
            **extra}


Attributes = Callable[[Event, Any], dict[str, Any]]
_ATTRIBUTES: dict[EventType, Attributes] = {
    EventType.WORKFLOW_EXECUTION_STARTED: lambda e, _: _workflow(e, {
        "workflow_name": e.workflow_context.workflow_name, "input": json_payload(decoded(e.payload.input_json))}),
    EventType.WORKFLOW_EXECUTION_COMPLETED: lambda e, _: _workflow(e, {
        "result": json_payload(decoded(e.payload.result_json))}),
    EventType.WORKFLOW_EXECUTION_FAILED: lambda e, _: _workflow(e, {"failure": _failure(e.payload.failure)}),
    EventType.WORKFLOW_EXECUTION_TERMINATED: lambda e, _: _workflow(e, {
        "failure": {"message": f"terminated: {e.payload.reason}"}}),
    EventType.WORKFLOW_EXECUTION_TIMED_OUT: lambda e, _: _workflow(e, {
        "failure": {"message": f"timed out: the execution timeout of {e.payload.execution_timeout_ms} ms expired"}}),
    EventType.WORKFLOW_EXECUTION_CANCELED: lambda e, _: _workflow(e, {
        "reason": None if e.payload.details_json is None else str(decoded(e.payload.details_json))}),
    EventType.WORKFLOW_EXECUTION_CONTINUED_AS_NEW: lambda e, _: {
        "task_id": e.event_id, "new_execution_run_id": e.payload.new_workflow_run_id,
        "workflow_name": e.workflow_context.workflow_name, "input": json_payload(decoded(e.payload.input_json))},
    EventType.WORKFLOW_TASK_TIMED_OUT: lambda e, _: {"task_id": e.payload.task_id,
                                                     "timeout_type": e.payload.timeout_type},
    EventType.WORKFLOW_TASK_FAILED: lambda e, _: {"task_id": e.payload.task_id,
                                                  "failure": _failure(e.payload.failure, e.payload.cause)},
    EventType.ACTIVITY_TASK_STARTED: lambda e, given: _activity(e, {"input": json_payload(given)}),
    EventType.ACTIVITY_TASK_COMPLETED: lambda e, _: _activity(e, {
        "result": json_payload(decoded(e.payload.result_json))}),
    EventType.ACTIVITY_TASK_RETRYING: lambda e, _: _activity(e, {
        "attempt": e.attempt or max(e.payload.next_attempt - 1, 1), "failure": _failure(e.payload.failure)}),
    EventType.ACTIVITY_TASK_FAILED: lambda e, _: _activity(e, {
        "attempt": e.attempt or 1, "failure": _failure(e.payload.failure)}),
    EventType.CUSTOM_TASK_STARTED: lambda e, _: _custom(e, {"payload": _custom_payload(e.payload.payload)}),
    EventType.CUSTOM_TASK_IN_PROGRESS: lambda e, _: _custom(e, {
        "payload": _custom_payload(e.payload.payload) or json_payload(None)}),
    EventType.CUSTOM_TASK_COMPLETED: lambda e, _: _custom(e, {
        "payload": _custom_payload(e.payload.payload) or json_payload(None)}),
    EventType.CUSTOM_TASK_FAILED: lambda e, _: _custom(e, {"failure": _failure(e.payload.failure)}),
    EventType.CUSTOM_TASK_TIMED_OUT: lambda e, _: _custom(e, {"timeout_type": None}),
    EventType.CUSTOM_TASK_CANCELED: lambda e, _: _custom(e, {"reason": None}),
}


def stream_name(event: Event) -> str:
    """The ``stream`` of the event's frame: a custom task's type, else `EVENTS_STREAM`."""
    return getattr(event.payload, "custom_task_type", None) or EVENTS_STREAM


def scope_of(event: Event) -> str:
    """``activity`` for activity events and custom tasks reported by an activity, else ``workflow``."""
    if event.event_type.value.startswith("ACTIVITY_TASK_") or getattr(event.payload, "activity_id", None):
        return "activity"
    return "workflow"


def sse_payload(event: Event, cursor: int, data: dict[str, Any]) -> dict[str, Any]:
    """The data of Mistral's SSE frame (StreamEventSsePayload): the event, its context and
    ``broker_sequence``, the position to resume after (``start_seq=broker_sequence + 1``)."""
    context = event.workflow_context
    metadata: dict[str, Any] = {"sequence": event.sequence}
    if event.event_type in SHOWN_AS:
        metadata["treeflow_event_type"] = event.event_type.value
    return {
        "stream": stream_name(event),
        "data": data,
        "workflow_context": {
            "namespace": NAMESPACE, "workflow_name": context.workflow_name,
            "workflow_exec_id": context.workflow_exec_id,
            "parent_workflow_exec_id": context.parent_workflow_exec_id,
            "root_workflow_exec_id": context.root_workflow_exec_id,
        },
        "broker_sequence": cursor,
        "timestamp": event.timestamp.isoformat(),
        "metadata": metadata,
    }


def execution_status(status: str, workflow_task_failure_cause: str | None) -> str:
    """Mistral's status of an execution: treeflow's, and RETRYING_AFTER_ERROR for a running
    execution whose last workflow task failed (it is being retried)."""
    if status == "RUNNING" and workflow_task_failure_cause:
        return "RETRYING_AFTER_ERROR"
    return status


def history_event(event: Event, decode_payloads: bool) -> dict[str, Any]:
    """One event of an execution's history: treeflow's whole event (every type), its
    ``*_json`` fields decoded into values when `decode_payloads`."""
    data = event.model_dump(mode="json")
    if decode_payloads:
        data["payload"] = {(key.removesuffix("_json") if key.endswith("_json") else key):
                           (decoded(value) if key.endswith("_json") else value)
                           for key, value in data["payload"].items()}
    return data


def unknown_event_types(names: Iterable[str]) -> list[str]:
    """The names in `names` that are not Mistral event types."""
    return [name for name in names if name not in MISTRAL_EVENT_TYPES]
