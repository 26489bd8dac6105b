"""What an execution waits on: tasks to hand to workers, and when a tick is due."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .decide import _heartbeat_deadline
from .state import ExecutionState


@dataclass(frozen=True)
class WorkItem:
    """A task to dispatch once `ready_at` has passed.

    `key` identifies it: the same key is dispatched once per processor lifetime
    (after a restart everything pending is dispatched again: at least once).
    """

    exec_id: str
    kind: str  # "workflow", "activity" or "query"
    key: str
    task_queue: str
    ready_at: datetime
    activity_id: str | None = None


def pending_work(state: ExecutionState) -> list[WorkItem]:
    if not state.open:
        return []
    items = []
    task = state.workflow_task
    if task is not None:
        items.append(WorkItem(state.exec_id, "workflow", f"{state.exec_id}|{task.task_id}", state.context.task_queue,
                              task.ready_at))
    for activity in state.activities.values():
        if not activity.cancel_requested:
            items.append(WorkItem(state.exec_id, "activity",
                                  f"{state.exec_id}|{state.context.workflow_run_id}|{activity.activity_id}|"
                                  f"{activity.attempt}", activity.task_queue, activity.ready_at,
                                  activity.activity_id))
    return items


def next_due(state: ExecutionState) -> datetime | None:
    """The earliest time a tick has something to decide for this execution."""
    if not state.open:
        return None
    times = [t for t in (state.deadline, *state.timers.values()) if t is not None]
    if state.workflow_task is not None:
        times.append(state.workflow_task.deadline(state.resumed_at))
    for activity in state.activities.values():
        times.append(activity.attempt_deadline(state.resumed_at))
        schedule_deadline = activity.schedule_deadline(state.resumed_at)
        if schedule_deadline is not None:
            times.append(schedule_deadline)
        if activity.heartbeat_timeout_ms is not None and activity.started_at is not None:
            times.append(_heartbeat_deadline(state, activity))
    return min(times) if times else None
