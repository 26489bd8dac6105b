"""The activity API: `@activity()` and what activity code may call while it runs."""

from __future__ import annotations

import contextvars
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any

from treeflow.schemas import CustomTaskPayload, CustomTaskPayloadKind, EventType
from treeflow.schemas import models as m

from .definitions import ActivityDefinition, ActivityOptions
from .errors import failure_from_exception
from .options import RetryPolicy
from .payloads import to_json


@dataclass(frozen=True)
class ActivityInfo:
    activity_id: str
    activity_name: str
    attempt: int
    workflow_exec_id: str
    workflow_run_id: str
    root_workflow_exec_id: str
    task_queue: str


@dataclass
class ActivityContext:
    """Set while an activity attempt runs; `send` reports a command for it."""

    info: ActivityInfo
    send: Callable[[Any], Awaitable[None]]


_context: contextvars.ContextVar[ActivityContext | None] = contextvars.ContextVar("treeflow_activity", default=None)


def activity(name: str | None = None, *, retry_policy: RetryPolicy | None = None,
             start_to_close_timeout: timedelta | None = None, schedule_to_close_timeout: timedelta | None = None,
             heartbeat_timeout: timedelta | None = None,
             task_queue: str | None = None) -> Callable[[Callable[..., Any]], ActivityDefinition]:
    """Decorator: the function is an activity named `name` (default: its name).

    Called inside a workflow it is run durably by a worker: at least once, retried by
    `retry_policy` (default: unlimited attempts, 1 s doubling to 100 s), each attempt
    bounded by `start_to_close_timeout` (default 5 minutes), all attempts by
    `schedule_to_close_timeout`, and, when set, failing after `heartbeat_timeout`
    without a `activity.heartbeat()`. Raise `ApplicationError(non_retryable=True)`
    to fail at once.
    """
    options = ActivityOptions(retry_policy=retry_policy, start_to_close_timeout=start_to_close_timeout,
                              schedule_to_close_timeout=schedule_to_close_timeout,
                              heartbeat_timeout=heartbeat_timeout, task_queue=task_queue)

    def decorate(fn: Callable[..., Any]) -> ActivityDefinition:
        return ActivityDefinition(fn, name or fn.__name__, options)

    return decorate


def _current() -> ActivityContext:
    context = _context.get()
    if context is None:
        raise RuntimeError("this call works only inside a running activity")
    return context


def info() -> ActivityInfo:
    """The running activity attempt."""
    return _current().info


async def heartbeat(details: Any = None) -> None:
    """Tell the engine the attempt is alive (resets its heartbeat timeout)."""
    context = _current()
    await context.send(m.RecordActivityHeartbeat(
        activity_id=context.info.activity_id, workflow_run_id=context.info.workflow_run_id,
        attempt=context.info.attempt, details_json=None if details is None else to_json(details)))


class CustomTask:
    """A unit of progress reported by an activity, recorded in the execution's history
    as CUSTOM_TASK_* events (Mistral's custom task events).

        async with activity.custom_task("summarize", type="llm") as task:
            await task.progress({"tokens": 120})
            await task.progress_patch([{"op": "replace", "path": "/tokens", "value": 240}])

    Leaving the block records COMPLETED (with the value given to `complete()`, if
    any), or FAILED / CANCELED when the block raises.
    """

    def __init__(self, custom_task_id: str, type: str = "custom") -> None:
        self.custom_task_id = custom_task_id
        self.type = type
        self._result: Any = None
        self._has_result = False

    async def _record(self, event_type: EventType, payload: CustomTaskPayload | None = None,
                      failure: Any = None) -> None:
        context = _current()
        await context.send(m.RecordCustomTaskEvent(
            activity_id=context.info.activity_id, workflow_run_id=context.info.workflow_run_id,
            attempt=context.info.attempt, event_type=event_type, custom_task_id=self.custom_task_id,
            custom_task_type=self.type, payload=payload, failure=failure))

    async def progress(self, value: Any) -> None:
        await self._record(EventType.CUSTOM_TASK_IN_PROGRESS,
                           CustomTaskPayload(kind=CustomTaskPayloadKind.JSON, value_json=to_json(value)))

    async def progress_patch(self, patch: list[dict[str, Any]]) -> None:
        """Report progress as an RFC 6902 JSON patch to the previous value."""
        await self._record(EventType.CUSTOM_TASK_IN_PROGRESS,
                           CustomTaskPayload(kind=CustomTaskPayloadKind.JSON_PATCH, value_json=json.dumps(patch)))

    def complete(self, value: Any = None) -> None:
        self._result, self._has_result = value, True

    async def __aenter__(self) -> CustomTask:
        await self._record(EventType.CUSTOM_TASK_STARTED)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is None:
            payload = (CustomTaskPayload(kind=CustomTaskPayloadKind.JSON, value_json=to_json(self._result))
                       if self._has_result else None)
            await self._record(EventType.CUSTOM_TASK_COMPLETED, payload)
        elif isinstance(exc, TimeoutError):
            await self._record(EventType.CUSTOM_TASK_TIMED_OUT)
        elif isinstance(exc, BaseException) and type(exc).__name__ == "CancelledError":
            await self._record(EventType.CUSTOM_TASK_CANCELED)
        else:
            await self._record(EventType.CUSTOM_TASK_FAILED, failure=failure_from_exception(exc))


def custom_task(custom_task_id: str, type: str = "custom") -> CustomTask:
    return CustomTask(custom_task_id, type)


activity.info = info  # type: ignore[attr-defined]
activity.heartbeat = heartbeat  # type: ignore[attr-defined]
activity.custom_task = custom_task  # type: ignore[attr-defined]
