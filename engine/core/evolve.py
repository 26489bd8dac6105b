"""evolve(state, event) -> state: how each event changes an execution."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from treeflow.schemas import SCHEDULE_EVENTS, Event, EventType
from treeflow.schemas import models as m

from .state import (
    EMPTY,
    RECENT_COMMANDS,
    ActivityState,
    ChildRef,
    ExecutionState,
    Status,
    WorkflowTaskState,
    updated,
)

T = EventType

CLOSING = {
    T.WORKFLOW_EXECUTION_COMPLETED: Status.COMPLETED,
    T.WORKFLOW_EXECUTION_FAILED: Status.FAILED,
    T.WORKFLOW_EXECUTION_CANCELED: Status.CANCELED,
    T.WORKFLOW_EXECUTION_TERMINATED: Status.TERMINATED,
    T.WORKFLOW_EXECUTION_TIMED_OUT: Status.TIMED_OUT,
    T.WORKFLOW_EXECUTION_CONTINUED_AS_NEW: Status.CONTINUED_AS_NEW,
}

#: Events the workflow code must see: each asks for a workflow task.
TRIGGERS = {
    T.WORKFLOW_EXECUTION_SIGNALED, T.WORKFLOW_EXECUTION_CANCEL_REQUESTED,
    T.ACTIVITY_TASK_COMPLETED, T.ACTIVITY_TASK_FAILED, T.ACTIVITY_TASK_CANCELED,
    T.TIMER_FIRED, T.START_CHILD_WORKFLOW_EXECUTION_FAILED, T.CHILD_WORKFLOW_EXECUTION_STARTED,
    T.CHILD_WORKFLOW_EXECUTION_COMPLETED, T.CHILD_WORKFLOW_EXECUTION_FAILED,
    T.CHILD_WORKFLOW_EXECUTION_CANCELED, T.CHILD_WORKFLOW_EXECUTION_TERMINATED,
    T.CHILD_WORKFLOW_EXECUTION_TIMED_OUT, T.WORKFLOW_EXECUTION_UPDATE_ACCEPTED,
    T.EXTERNAL_WORKFLOW_EXECUTION_SIGNALED,
}

def workflow_task_backoff(attempt: int) -> timedelta:
    """Delay before a failed workflow task is given out again: doubling, at most a minute."""
    return timedelta(seconds=min(60, 2 ** (attempt - 1)))


def command_id_of(event: Event) -> str:
    return event.event_id.rsplit(":", 1)[0]


def evolve(state: ExecutionState | None, event: Event) -> ExecutionState:
    """The execution after `event`. `state` is None before its first event."""
    if event.event_type is T.WORKFLOW_EXECUTION_STARTED:
        return _started(state, event)
    if state is None:
        raise ValueError(f"event {event.event_id} ({event.event_type.value}) for an execution that never started")
    command_id = command_id_of(event)
    recent = state.recent_commands
    if not recent or recent[-1] != command_id:
        recent = (*recent[-(RECENT_COMMANDS - 1):], command_id)
    state = updated(state, last_sequence=event.sequence, recent_commands=recent)
    handler = _HANDLERS.get(event.event_type)
    if handler is not None:
        state = handler(state, event, event.payload)
    if (event.event_type in TRIGGERS and not _start_unheeded(state, event)) or _final_timeout(event):
        state = _trigger(state, event)
    return state


def _start_unheeded(state: ExecutionState, event: Event) -> bool:
    """A child's start that its parent's code does not wait for (it awaits the result only)."""
    if event.event_type is not T.CHILD_WORKFLOW_EXECUTION_STARTED:
        return False
    ref = state.children.get(event.payload.child_workflow_exec_id)  # type: ignore[union-attr]
    return ref is not None and not ref.wake_on_start


def _final_timeout(event: Event) -> bool:
    """An activity's last timeout is its end: the workflow must learn of it."""
    return event.event_type is T.ACTIVITY_TASK_TIMED_OUT and not event.payload.will_retry  # type: ignore[union-attr]


def fold(events: Iterable[Event], states: Mapping[str, ExecutionState] | None = None) -> dict[str, ExecutionState]:
    """The states of every execution after `events`, starting from `states` (a schedule's
    events are left out)."""
    result = dict(states or {})
    for event in events:
        if event.event_type in SCHEDULE_EVENTS:
            continue  # a schedule's, not an execution's (treeflow.core.schedules folds those)
        exec_id = event.workflow_context.workflow_exec_id
        result[exec_id] = evolve(result.get(exec_id), event)
    return result


def _started(previous: ExecutionState | None, event: Event) -> ExecutionState:
    payload: m.WorkflowExecutionStarted = event.payload  # type: ignore[assignment]
    if previous is not None and event.sequence != previous.last_sequence + 1:
        # A new history of a reused id (the processor had forgotten the closed one, see
        # PartitionEngine.evict_closed): nothing carries over from the old one.
        previous = None
    continued = payload.continued_from_run_id is not None and previous is not None
    return ExecutionState(
        context=event.workflow_context,
        status=Status.RUNNING,
        last_sequence=event.sequence,
        first_sequence=event.sequence,
        execution_started_at=previous.execution_started_at if continued else event.timestamp,
        run_started_at=event.timestamp,
        start_command_id=command_id_of(event),
        input_json=payload.input_json,
        execution_timeout_ms=payload.execution_timeout_ms,
        retry_policy=payload.retry_policy,
        attempt=event.attempt or 1,
        parent_close_policy=payload.parent_close_policy,
        reply_partition=payload.reply_partition,
        workflow_task=WorkflowTaskState(task_id=_task_id(event), ready_at=event.timestamp + timedelta(
            milliseconds=payload.first_workflow_task_backoff_ms or 0)),
        last_trigger_sequence=event.sequence,
        # Kept across runs: a command re-delivered after a continue-as-new or a restart
        # of the same id must still be recognised.
        recent_commands=(*(previous.recent_commands[-(RECENT_COMMANDS - 1):] if previous else ()),
                         command_id_of(event)),
    )


def workflow_task_id(run_id: str, sequence: int) -> str:
    """The id of the workflow task that the run's event at `sequence` causes."""
    return f"{run_id}:{sequence}"


def caused_at(task_id: str) -> int:
    """The sequence of the event that caused the workflow task `task_id` (`workflow_task_id`)."""
    return int(task_id.rsplit(":", 1)[1])


def _task_id(event: Event) -> str:
    return workflow_task_id(event.workflow_context.workflow_run_id, event.sequence)


def _trigger(state: ExecutionState, event: Event) -> ExecutionState:
    if not state.open:
        return state
    task = state.workflow_task or WorkflowTaskState(task_id=_task_id(event), ready_at=event.timestamp)
    return updated(state, last_trigger_sequence=event.sequence, workflow_task=task)


def _with(mapping: Mapping[str, Any], key: str, value: Any = None, *, remove: bool = False) -> Mapping[str, Any]:
    updated = dict(mapping)
    if remove:
        updated.pop(key, None)
    else:
        updated[key] = value
    return MappingProxyType(updated) if updated else EMPTY


def _closed(state: ExecutionState, event: Event, payload: Any) -> ExecutionState:
    return updated(
        state,
        status=CLOSING[event.event_type],
        closed_at=event.timestamp,
        closed_by_command_id=command_id_of(event),
        result_json=getattr(payload, "result_json", None),
        failure=getattr(payload, "failure", None),
        workflow_task=None,
        activities=EMPTY,
        timers=EMPTY,
        children=EMPTY,
        updates=EMPTY,
        heartbeats=EMPTY,
        claims=EMPTY,
    )


def _workflow_task_completed(state: ExecutionState, event: Event, payload: m.WorkflowTaskCompleted) -> ExecutionState:
    # Events the worker had not seen when it ran the task ask for the next task at once.
    task = None
    if state.last_trigger_sequence > payload.history_length:
        task = WorkflowTaskState(task_id=_task_id(event), ready_at=event.timestamp)
    return updated(state, workflow_task=task)


def _workflow_task_retried(state: ExecutionState, event: Event, payload: Any) -> ExecutionState:
    attempt = (state.workflow_task.attempt if state.workflow_task else 0) + 1
    ready = event.timestamp
    if event.event_type is T.WORKFLOW_TASK_FAILED:
        ready += workflow_task_backoff(attempt - 1)
    return updated(state, workflow_task=WorkflowTaskState(_task_id(event), ready, attempt))


def _activity_scheduled(state: ExecutionState, event: Event, payload: m.ActivityTaskScheduled) -> ExecutionState:
    activity = ActivityState(
        activity_id=payload.activity_id, activity_name=payload.activity_name, task_queue=payload.task_queue,
        input_json=payload.input_json, retry_policy=payload.retry_policy,
        schedule_to_close_timeout_ms=payload.schedule_to_close_timeout_ms,
        start_to_close_timeout_ms=payload.start_to_close_timeout_ms,
        heartbeat_timeout_ms=payload.heartbeat_timeout_ms,
        scheduled_at=event.timestamp, ready_at=event.timestamp)
    return updated(state, activities=_with(state.activities, payload.activity_id, activity))


def _activity_update(**changes: Any) -> Callable[[ExecutionState, Event, Any], ExecutionState]:
    def handler(state: ExecutionState, event: Event, payload: Any) -> ExecutionState:
        activity = state.activities.get(payload.activity_id)
        if activity is None:
            return state
        values = {k: (event.timestamp if v is _NOW else v) for k, v in changes.items()}
        changed = updated(activity, **values)
        return updated(state, activities=_with(state.activities, payload.activity_id, changed))
    return handler


_NOW = object()


def _activity_closed(state: ExecutionState, event: Event, payload: Any) -> ExecutionState:
    if getattr(payload, "will_retry", False):
        return state  # a RETRYING event follows and starts the next attempt
    return updated(state, activities=_with(state.activities, payload.activity_id, remove=True),
                   heartbeats=_with(state.heartbeats, payload.activity_id, remove=True),
                   claims=_with(state.claims, payload.activity_id, remove=True))


def _activity_retrying(state: ExecutionState, event: Event, payload: m.ActivityTaskRetrying) -> ExecutionState:
    activity = state.activities.get(payload.activity_id)
    if activity is None:
        return state
    changed = updated(activity, attempt=payload.next_attempt, started_at=None,
                      ready_at=event.timestamp + timedelta(milliseconds=payload.backoff_ms))
    return updated(state, activities=_with(state.activities, payload.activity_id, changed),
                   heartbeats=_with(state.heartbeats, payload.activity_id, remove=True),
                   claims=_with(state.claims, payload.activity_id, remove=True))


def _timer_started(state: ExecutionState, event: Event, payload: m.TimerStarted) -> ExecutionState:
    return updated(state, timers=_with(state.timers, payload.timer_id, payload.fire_at))


def _timer_closed(state: ExecutionState, event: Event, payload: Any) -> ExecutionState:
    return updated(state, timers=_with(state.timers, payload.timer_id, remove=True))


def _child_initiated(state: ExecutionState, event: Event,
                     payload: m.StartChildWorkflowExecutionInitiated) -> ExecutionState:
    ref = ChildRef(payload.child_workflow_name, payload.parent_close_policy, wake_on_start=payload.wake_on_start)
    return updated(state, children=_with(state.children, payload.child_workflow_exec_id, ref))


def _child_started(state: ExecutionState, event: Event, payload: m.ChildWorkflowExecutionStarted) -> ExecutionState:
    ref = state.children.get(payload.child_workflow_exec_id)
    if ref is None:
        return state
    return updated(state, children=_with(state.children, payload.child_workflow_exec_id,
                                         updated(ref, started=True)))


def _child_closed(state: ExecutionState, event: Event, payload: Any) -> ExecutionState:
    return updated(state, children=_with(state.children, payload.child_workflow_exec_id, remove=True))


def _cancel_requested(state: ExecutionState, event: Event, payload: Any) -> ExecutionState:
    return updated(state, cancel_requested=True)


def _update_accepted(state: ExecutionState, event: Event, payload: m.WorkflowExecutionUpdateAccepted) -> ExecutionState:
    return updated(state, updates=_with(state.updates, payload.update_id, payload.update_name))


def _update_completed(state: ExecutionState, event: Event, payload: m.WorkflowExecutionUpdateCompleted) -> ExecutionState:
    return updated(state, updates=_with(state.updates, payload.update_id, None))


_HANDLERS: dict[EventType, Callable[[ExecutionState, Event, Any], ExecutionState]] = {
    **{event_type: _closed for event_type in CLOSING},
    T.WORKFLOW_EXECUTION_CANCEL_REQUESTED: _cancel_requested,
    T.WORKFLOW_TASK_COMPLETED: _workflow_task_completed,
    T.WORKFLOW_TASK_TIMED_OUT: _workflow_task_retried,
    T.WORKFLOW_TASK_FAILED: _workflow_task_retried,
    T.ACTIVITY_TASK_SCHEDULED: _activity_scheduled,
    T.ACTIVITY_TASK_STARTED: _activity_update(started_at=_NOW),
    T.ACTIVITY_TASK_CANCEL_REQUESTED: _activity_update(cancel_requested=True),
    T.ACTIVITY_TASK_COMPLETED: _activity_closed,
    T.ACTIVITY_TASK_FAILED: _activity_closed,
    T.ACTIVITY_TASK_CANCELED: _activity_closed,
    T.ACTIVITY_TASK_TIMED_OUT: _activity_closed,
    T.ACTIVITY_TASK_RETRYING: _activity_retrying,
    T.TIMER_STARTED: _timer_started,
    T.TIMER_FIRED: _timer_closed,
    T.TIMER_CANCELED: _timer_closed,
    T.START_CHILD_WORKFLOW_EXECUTION_INITIATED: _child_initiated,
    T.START_CHILD_WORKFLOW_EXECUTION_FAILED: _child_closed,
    T.CHILD_WORKFLOW_EXECUTION_STARTED: _child_started,
    T.CHILD_WORKFLOW_EXECUTION_COMPLETED: _child_closed,
    T.CHILD_WORKFLOW_EXECUTION_FAILED: _child_closed,
    T.CHILD_WORKFLOW_EXECUTION_CANCELED: _child_closed,
    T.CHILD_WORKFLOW_EXECUTION_TERMINATED: _child_closed,
    T.CHILD_WORKFLOW_EXECUTION_TIMED_OUT: _child_closed,
    T.WORKFLOW_EXECUTION_UPDATE_ACCEPTED: _update_accepted,
    T.WORKFLOW_EXECUTION_UPDATE_COMPLETED: _update_completed,
}
