"""The activity API: `@activity()` and what activity code may call while it runs."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

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
    #: The loop the attempt's reports are sent from (a sync activity runs in a thread).
    loop: asyncio.AbstractEventLoop = dataclasses.field(default_factory=asyncio.get_running_loop)


_context: contextvars.ContextVar[ActivityContext | None] = contextvars.ContextVar("treeflow_activity", default=None)


#: The retry policy of an activity that sets none (Mistral's: 3 attempts, delays from 1 s
#: doubling). The engine's own default, for commands that carry no policy, is Temporal's
#: (unlimited attempts).
DEFAULT_ACTIVITY_RETRY = RetryPolicy(maximum_attempts=3)
#: Bound of one attempt when the activity sets none (Mistral's and treeflow's).
DEFAULT_START_TO_CLOSE = timedelta(minutes=5)


def activity(start_to_close_timeout: timedelta | float | str | Callable[..., Any] | None = None,
             retry_policy_max_attempts: int | None = None, retry_policy_backoff_coefficient: float | None = None,
             name: str | None = None, sticky_to_worker: bool = False, rate_limit: Any = None,
             heartbeat_timeout: timedelta | None = None, *, retry_policy: RetryPolicy | None = None,
             schedule_to_close_timeout: timedelta | None = None,
             task_queue: str | None = None) -> Any:
    """Decorator: the function is an activity named `name` (default: its name).

    The positional arguments are Mistral's, in Mistral's order (`@activity(timedelta(
    seconds=30), 5)`); `@activity("name")` also names it. Called inside a workflow it is
    run durably by a worker: at least once, each attempt bounded by
    `start_to_close_timeout` (default 5 minutes), all attempts by
    `schedule_to_close_timeout`, and, when set, failing after `heartbeat_timeout`
    without an `activity_heartbeat()`. A failed attempt is retried up to
    `retry_policy_max_attempts` attempts in all (default 3, Mistral's), the delay
    growing from 1 s by `retry_policy_backoff_coefficient` (default 2); a full
    `retry_policy` replaces both. Raise `ApplicationError(non_retryable=True)` to fail
    at once. `sticky_to_worker` and `rate_limit` are accepted for Mistral's programs and
    not enforced. `@activity` without parentheses takes every default.
    """
    if callable(start_to_close_timeout):
        return activity()(start_to_close_timeout)
    if isinstance(start_to_close_timeout, str):
        start_to_close_timeout, name = None, name or start_to_close_timeout
    if isinstance(start_to_close_timeout, (int, float)):
        start_to_close_timeout = timedelta(seconds=start_to_close_timeout)
    if retry_policy is not None and (retry_policy_max_attempts is not None
                                     or retry_policy_backoff_coefficient is not None):
        raise ValueError("give either retry_policy or retry_policy_max_attempts / retry_policy_backoff_coefficient")
    if retry_policy is None:
        retry_policy = dataclasses.replace(
            DEFAULT_ACTIVITY_RETRY,
            maximum_attempts=DEFAULT_ACTIVITY_RETRY.maximum_attempts if retry_policy_max_attempts is None
            else retry_policy_max_attempts,
            backoff_coefficient=DEFAULT_ACTIVITY_RETRY.backoff_coefficient if retry_policy_backoff_coefficient is None
            else retry_policy_backoff_coefficient)
    options = ActivityOptions(retry_policy=retry_policy,
                              start_to_close_timeout=start_to_close_timeout or DEFAULT_START_TO_CLOSE,
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


async def heartbeat(*details: Any) -> None:
    """Tell the engine the attempt is alive (resets its heartbeat timeout); `details`
    (JSON-able) say how far it got."""
    context = _current()
    await context.send(m.RecordActivityHeartbeat(
        activity_id=context.info.activity_id, workflow_run_id=context.info.workflow_run_id,
        attempt=context.info.attempt, details_json=_details(details)))


def activity_heartbeat(*details: Any) -> None:
    """`heartbeat()` for code that cannot await (Mistral's): sends the heartbeat in the
    background, from async or from sync activities (which run in a thread)."""
    context = _current()
    coroutine = heartbeat(*details)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is context.loop:
        task = loop.create_task(coroutine)
        _pending.add(task)
        task.add_done_callback(_pending.discard)
    else:
        asyncio.run_coroutine_threadsafe(_in_context(context, coroutine), context.loop)


async def _in_context(context: ActivityContext, coroutine: Any) -> None:
    token = _context.set(context)
    try:
        await coroutine
    finally:
        _context.reset(token)


_pending: set[asyncio.Task[None]] = set()


def _details(details: tuple[Any, ...]) -> str | None:
    if not details:
        return None
    return to_json(details[0] if len(details) == 1 else list(details))


class CustomTask:
    """A unit of progress reported by an activity or by workflow code, recorded in the
    execution's history as CUSTOM_TASK_* events (Mistral's custom task events): from an
    activity with its `activity_id`, from workflow code as decisions of the workflow (no
    `activity_id`; replayed like any decision).

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
        from .worker.instance import current_instance

        instance = current_instance()
        if instance is not None:
            instance.record_custom_task(event_type, self.custom_task_id, self.type, payload, failure)
            return
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


S = TypeVar("S")


class Task(CustomTask, Generic[S]):
    """Mistral's observable task, in an activity or in workflow code:

        async with workflows.task("export", state={"progress": 0}) as t:
            await t.update_state({"progress": 50})     # CUSTOM_TASK_IN_PROGRESS, a JSON patch
            await t.set_state({"progress": 100})

    Entering records CUSTOM_TASK_STARTED with the initial state, each state change
    CUSTOM_TASK_IN_PROGRESS with an RFC 6902 JSON patch from the previous state, and
    leaving COMPLETED with the final state (or FAILED / CANCELED / TIMED_OUT when the
    block raises). The id is `id`, else a fresh one (`workflow.uuid4()` in workflow
    code, so the same on replay).
    """

    def __init__(self, type: str, state: S | None = None, id: str | None = None) -> None:
        super().__init__(id or _new_task_id(), type)
        self._state = state

    @property
    def id(self) -> str:
        return self.custom_task_id

    @property
    def state(self) -> S | None:
        return self._state

    async def __aenter__(self) -> Task[S]:
        await self._record(EventType.CUSTOM_TASK_STARTED, _json_payload(self._state))
        return self

    async def set_state(self, state: S) -> None:
        if self._state is None:
            raise RuntimeError("set_state() needs a task created with a state")
        previous, self._state = self._state, state
        await self.progress_patch(json_patch(_plain_json(previous), _plain_json(state)))

    async def update_state(self, updates: dict[str, Any]) -> None:
        """Change some fields of a dict or pydantic state."""
        if isinstance(self._state, BaseModel):
            await self.set_state(self._state.model_copy(update=updates))  # type: ignore[arg-type]
        elif isinstance(self._state, dict):
            await self.set_state({**self._state, **updates})  # type: ignore[arg-type]
        else:
            raise TypeError(f"update_state() needs a dict or pydantic state, got {type(self._state).__name__}")

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is None:
            self.complete(self._state)
        await super().__aexit__(exc_type, exc, tb)


def task(type: str, state: Any = None, *, id: str | None = None) -> Task[Any]:
    """Mistral's `task(type, state=None, id=None)`: see `Task`."""
    return Task(type, state, id)


def task_from(state: Any, type: str | None = None, *, id: str | None = None) -> Task[Any]:
    """Mistral's `task_from(state)`: a `Task` whose type is the state's class name (or
    its pydantic `model_config["title"]`) unless `type` is given."""
    if type is None:
        if isinstance(state, BaseModel):
            type = state.model_config.get("title") or state.__class__.__name__
        elif dataclasses.is_dataclass(state):
            type = state.__class__.__name__
        else:
            raise ValueError("cannot infer a task type from this state: pass type=")
    return Task(type, state, id)


def _new_task_id() -> str:
    from .worker.instance import current_instance

    instance = current_instance()
    return str(instance.uuid4() if instance is not None else uuid.uuid4())


def _plain_json(value: Any) -> Any:
    return json.loads(to_json(value))


def _json_payload(value: Any) -> CustomTaskPayload | None:
    if value is None:
        return None
    return CustomTaskPayload(kind=CustomTaskPayloadKind.JSON, value_json=to_json(value))


def json_patch(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """RFC 6902 operations that turn JSON value `old` into `new` (objects are compared
    key by key, anything else is replaced whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict[str, Any]] = []
        for key in old:
            pointer = f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"
            if key not in new:
                ops.append({"op": "remove", "path": pointer})
            elif old[key] != new[key]:
                ops.extend(json_patch(old[key], new[key], pointer))
        for key in new:
            if key not in old:
                ops.append({"op": "add", "path": f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}",
                            "value": new[key]})
        return ops
    return [] if old == new else [{"op": "replace", "path": path, "value": new}]


activity.info = info  # type: ignore[attr-defined]
activity.heartbeat = heartbeat  # type: ignore[attr-defined]
activity.activity_heartbeat = activity_heartbeat  # type: ignore[attr-defined]
activity.custom_task = custom_task  # type: ignore[attr-defined]
