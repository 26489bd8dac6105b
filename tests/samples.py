"""Deterministic sample records for tests: one valid instance of any generated model."""

from __future__ import annotations

import types
import typing
from datetime import datetime, timezone
from enum import Enum
from typing import Any


from treeflow.kafka import KafkaSettings, clients
from treeflow.schemas import EVENTS, EVENT_TYPES, PAYLOAD_MODELS, AvroModel, Event, EventType, WorkflowContext

EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


def sample_value(annotation: Any, label: str, depth: int = 0) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # Timestamp
        return sample_value(typing.get_args(annotation)[0], label, depth)
    if origin in (typing.Union, types.UnionType):
        branches = [a for a in typing.get_args(annotation) if a is not type(None)]
        if depth > 1 and len(branches) < len(typing.get_args(annotation)):
            return None  # stop recursive types (a failure's cause) at two levels
        return sample_value(branches[0], label, depth)
    if origin is list:
        return [sample_value(typing.get_args(annotation)[0], label, depth)]
    if isinstance(annotation, type):
        if issubclass(annotation, AvroModel):
            return sample(annotation, depth + 1)
        if issubclass(annotation, Enum):
            return list(annotation)[-1]
        if annotation is bool:
            return True
        if annotation is int:
            return 7
        if annotation is float:
            return 1.5
        if annotation is datetime:
            return EPOCH
        if annotation is str:
            return '{"sample": "' + label + '"}' if label.endswith("_json") else f"sample-{label}"
    raise TypeError(f"no sample for {annotation!r}")


def sample(model: type[AvroModel], depth: int = 0) -> AvroModel:
    """An instance of `model` with every field set, optional ones included."""
    values = {name: sample_value(field.annotation, name, depth) for name, field in model.model_fields.items()}
    if model is Event:
        values["event_type"] = EVENT_TYPES[type(values["payload"])]
    return model(**values)


def context(exec_id: str, root: str, parent: str | None = None, name: str = "wf") -> WorkflowContext:
    return WorkflowContext(workflow_exec_id=exec_id, workflow_run_id=f"run-{exec_id}", workflow_name=name,
                           parent_workflow_exec_id=parent, root_workflow_exec_id=root, task_queue="default")


def event_of(event_type: EventType, ctx: WorkflowContext, sequence: int) -> Event:
    """An event of `event_type` with a sample payload."""
    return Event(event_id=f"{ctx.workflow_exec_id}:{sequence}", event_type=event_type, timestamp=EPOCH,
                 sequence=sequence, workflow_context=ctx, attempt=None,
                 payload=sample(PAYLOAD_MODELS[event_type]))


async def write_events(settings: KafkaSettings, events: list[Event]) -> None:
    """Produce events keyed by their root id, in order (as the processor would)."""
    producer = await clients.start(clients.producer(settings, "test"), settings)
    try:
        for event in events:
            await producer.send(settings.topics.events, EVENTS.encode(event),
                                key=event.workflow_context.root_workflow_exec_id.encode())
        await producer.flush()
    finally:
        await producer.stop()
