"""Which events a stream keeps: event types, workflow names, execution, parent and root ids."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from treeflow.schemas import Event, EventType

#: What a filter field accepts: one value, several, or None for "any".
Values: TypeAlias = str | Iterable[str] | None
EventTypes: TypeAlias = EventType | str | Iterable[EventType | str] | None


def _values(value: Values) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    found = frozenset(item.strip() for item in value if item and item.strip())
    return found or None


def parse_event_types(value: EventTypes) -> frozenset[EventType] | None:
    """Event types from enum members or their names (a comma-separated string too).

    Raises `ValueError` naming the valid types when a name is unknown.
    """
    if value is None:
        return None
    if isinstance(value, (EventType, str)):
        value = [value]
    found: set[EventType] = set()
    for item in value:
        if isinstance(item, EventType):
            found.add(item)
            continue
        for name in _values(item) or ():
            try:
                found.add(EventType(name.upper()))
            except ValueError:
                raise ValueError(f"unknown event type {name!r}; known: {', '.join(t.value for t in EventType)}") from None
    return frozenset(found) or None


@dataclass(frozen=True)
class EventFilter:
    """Keeps an event when it matches every field that is set (None matches anything).

    Within a field, any of the values matches. Build it with `EventFilter.of`,
    which accepts single values, iterables and comma-separated strings.
    """

    event_types: frozenset[EventType] | None = None
    workflow_names: frozenset[str] | None = None
    workflow_exec_ids: frozenset[str] | None = None
    parent_workflow_exec_ids: frozenset[str] | None = None
    root_workflow_exec_ids: frozenset[str] | None = None

    @classmethod
    def of(cls, *, event_types: EventTypes = None, workflow_names: Values = None, workflow_exec_ids: Values = None,
           parent_workflow_exec_ids: Values = None, root_workflow_exec_ids: Values = None) -> EventFilter:
        return cls(parse_event_types(event_types), _values(workflow_names), _values(workflow_exec_ids),
                   _values(parent_workflow_exec_ids), _values(root_workflow_exec_ids))

    @property
    def matches_everything(self) -> bool:
        return all(value is None for value in (self.event_types, self.workflow_names, self.workflow_exec_ids,
                                                self.parent_workflow_exec_ids, self.root_workflow_exec_ids))

    def matches(self, event: Event) -> bool:
        context = event.workflow_context
        return ((self.event_types is None or event.event_type in self.event_types)
                and (self.workflow_names is None or context.workflow_name in self.workflow_names)
                and (self.workflow_exec_ids is None or context.workflow_exec_id in self.workflow_exec_ids)
                and (self.parent_workflow_exec_ids is None
                     or context.parent_workflow_exec_id in self.parent_workflow_exec_ids)
                and (self.root_workflow_exec_ids is None
                     or context.root_workflow_exec_id in self.root_workflow_exec_ids))
