"""Typed events as the consumer library yields them: the event, its payload and its cursor."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from treeflow.schemas import PAYLOAD_MODELS, AvroModel, Event, EventType, WorkflowContext

from .cursor import Cursor

P = TypeVar("P", bound=AvroModel)


class TreeEvent(BaseModel, Generic[P]):
    """One event of a workflow tree, with the cursor that resumes a stream after it.

    There is one model per event type, ``TreeEvent[<payload model>]`` (see
    `TREE_EVENT_MODELS`), so ``payload`` is typed: match on ``event_type`` or on
    ``isinstance(event.payload, WorkflowExecutionCompleted)``.
    """

    model_config = ConfigDict(frozen=True)

    event_id: str
    event_type: EventType
    #: Position in the execution's history: 1, 2, 3, ... with no gaps.
    sequence: int
    timestamp: datetime
    #: The attempt, where it applies (activities).
    attempt: int | None = None
    #: Opaque, monotonic within the tree, never reused (see `treeflow.consumers.cursor`).
    cursor: str
    workflow_context: WorkflowContext
    payload: P

    @classmethod
    def of(cls, event: Event, cursor: Cursor) -> TreeEvent[Any]:
        """The typed event for a decoded `Event` read at `cursor` (no validation: it was decoded)."""
        model = TREE_EVENT_MODELS[event.event_type]
        return model.model_construct(
            event_id=event.event_id, event_type=event.event_type, sequence=event.sequence,
            timestamp=event.timestamp, attempt=event.attempt, cursor=str(cursor),
            workflow_context=event.workflow_context, payload=event.payload)

    @property
    def position(self) -> Cursor:
        """The cursor taken apart: partition and offset in the events topic."""
        return Cursor.parse(self.cursor)

    @property
    def workflow_exec_id(self) -> str:
        return self.workflow_context.workflow_exec_id

    @property
    def root_workflow_exec_id(self) -> str:
        return self.workflow_context.root_workflow_exec_id

    def to_event(self) -> Event:
        """The event as the schemas package models it (without the cursor)."""
        return Event.model_construct(
            event_id=self.event_id, event_type=self.event_type, timestamp=self.timestamp, sequence=self.sequence,
            workflow_context=self.workflow_context, attempt=self.attempt, payload=self.payload)

    def to_json(self) -> str:
        """The event as one line of JSON, payload and workflow context included."""
        return self.model_dump_json()


#: The typed model of each event type: ``TreeEvent[<its payload model>]``.
TREE_EVENT_MODELS: dict[EventType, type[TreeEvent[Any]]] = {
    event_type: TreeEvent[payload_model]  # type: ignore[valid-type]
    for event_type, payload_model in PAYLOAD_MODELS.items()
}
