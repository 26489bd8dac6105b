"""Workflow code, run deterministically from its history.

A `WorkflowInstance` owns one run of one workflow. Its event loop executes nothing
but the workflow's own callbacks: timers become durable timers, activities and
children become decisions, and results arrive as history events. Fed the same
history it issues the same decisions, so a worker that lost an instance rebuilds it
by replaying the history, and a worker that kept it (sticky) just feeds it the new
events.

Signals run their handlers as tasks of the workflow, in history order (those that
came with the start before the entrypoint begins); `wait_condition` predicates are
re-checked each time the ready callbacks have run; a query runs its handler on the
instance as it is, with decisions forbidden and the random state restored.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import random
import uuid
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from treeflow.schemas import Event, EventType, ParentClosePolicy, WorkflowContext
from treeflow.schemas import models as m

from ..definitions import DEFAULT_TASK_QUEUE, ActivityDefinition, WorkflowDefinition
from ..errors import (
    ApplicationError,
    ActivityError,
    ChildWorkflowError,
    ContinueAsNewError,
    NonDeterminismError,
    TreeflowError,
    WorkflowQueryError,
    WorkflowUpdateError,
    exception_from_failure,
    failure_from_exception,
)
from ..options import RetryPolicy, millis
from ..payloads import Parameters, from_json, handler_input, handler_name, to_json

log = logging.getLogger(__name__)
T = EventType

#: Events that answer something the workflow code waits for.
RESOLVING = {
    T.WORKFLOW_EXECUTION_STARTED, T.WORKFLOW_EXECUTION_SIGNALED, T.WORKFLOW_EXECUTION_CANCEL_REQUESTED,
    T.ACTIVITY_TASK_COMPLETED, T.ACTIVITY_TASK_FAILED, T.ACTIVITY_TASK_CANCELED, T.ACTIVITY_TASK_TIMED_OUT,
    T.TIMER_FIRED, T.START_CHILD_WORKFLOW_EXECUTION_FAILED, T.CHILD_WORKFLOW_EXECUTION_STARTED,
    T.CHILD_WORKFLOW_EXECUTION_COMPLETED, T.CHILD_WORKFLOW_EXECUTION_FAILED, T.CHILD_WORKFLOW_EXECUTION_CANCELED,
    T.CHILD_WORKFLOW_EXECUTION_TERMINATED, T.CHILD_WORKFLOW_EXECUTION_TIMED_OUT,
    T.WORKFLOW_EXECUTION_UPDATE_ACCEPTED, T.EXTERNAL_WORKFLOW_EXECUTION_SIGNALED,
}
#: Custom task events: a decision when the workflow code reported them (no activity_id).
CUSTOM_TASK_EVENTS = {
    T.CUSTOM_TASK_STARTED, T.CUSTOM_TASK_IN_PROGRESS, T.CUSTOM_TASK_COMPLETED, T.CUSTOM_TASK_FAILED,
    T.CUSTOM_TASK_TIMED_OUT, T.CUSTOM_TASK_CANCELED,
}
#: The `marker_name` of the markers `workflow.patched()` records.
VERSION_MARKER = "version"
#: Resolved first in an activation (see `WorkflowInstance._apply_buffer`).
FIRST_IN_ACTIVATION = {T.WORKFLOW_EXECUTION_STARTED, T.WORKFLOW_EXECUTION_SIGNALED}
#: The events a decision leads to, and the decision each stands for.
EFFECTS = {
    T.ACTIVITY_TASK_SCHEDULED: (m.ScheduleActivityTask, "activity_id"),
    T.TIMER_STARTED: (m.StartTimer, "timer_id"),
    T.TIMER_CANCELED: (m.CancelTimer, "timer_id"),
    T.ACTIVITY_TASK_CANCEL_REQUESTED: (m.RequestCancelActivityTask, "activity_id"),
    T.START_CHILD_WORKFLOW_EXECUTION_INITIATED: (m.StartChildWorkflowExecution, "child_workflow_exec_id"),
    T.CHILD_WORKFLOW_EXECUTION_CANCEL_REQUESTED: (m.RequestCancelChildWorkflowExecution, "child_workflow_exec_id"),
    T.WORKFLOW_EXECUTION_COMPLETED: (m.CompleteWorkflowExecution, None),
    T.WORKFLOW_EXECUTION_FAILED: (m.FailWorkflowExecution, None),
    T.WORKFLOW_EXECUTION_CANCELED: (m.CancelWorkflowExecution, None),
    T.WORKFLOW_EXECUTION_CONTINUED_AS_NEW: (m.ContinueAsNewWorkflowExecution, None),
    T.WORKFLOW_EXECUTION_UPDATE_COMPLETED: (m.CompleteWorkflowUpdate, "update_id"),
    T.MARKER_RECORDED: (m.RecordMarker, "marker_id"),
    T.EXTERNAL_WORKFLOW_EXECUTION_SIGNALED: (m.SignalExternalWorkflowExecution, "target_workflow_exec_id"),
    **{t: (m.RecordWorkflowCustomTask, "custom_task_id") for t in CUSTOM_TASK_EVENTS},
}
CHILD_CLOSED = {
    T.CHILD_WORKFLOW_EXECUTION_FAILED: "FAILED", T.CHILD_WORKFLOW_EXECUTION_CANCELED: "CANCELED",
    T.CHILD_WORKFLOW_EXECUTION_TERMINATED: "TERMINATED", T.CHILD_WORKFLOW_EXECUTION_TIMED_OUT: "TIMED_OUT",
}


def current_instance() -> WorkflowInstance | None:
    """The instance whose code is running, if any."""
    loop = asyncio._get_running_loop()
    return loop.instance if isinstance(loop, WorkflowLoop) else None


class WorkflowLoop(asyncio.AbstractEventLoop):
    """An event loop that only runs the workflow's callbacks, in order, when asked."""

    def __init__(self, instance: WorkflowInstance) -> None:
        self.instance = instance
        self.ready: deque[asyncio.Handle] = deque()

    def call_soon(self, callback: Callable[..., Any], *args: Any,
                  context: contextvars.Context | None = None) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self.ready.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any,
                   context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        return self.instance.start_timer(delay, callback, args, context)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any,
                context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        return self.call_later(when - self.time(), callback, *args, context=context)

    def time(self) -> float:
        return self.instance.now.timestamp()

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(self, coro: Any, *, name: str | None = None,
                    context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=self, name=name, context=context)

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        self.instance.cancel_timer(handle)

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return True

    def is_closed(self) -> bool:
        return False

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if context.get("message") == "Task was destroyed but it is pending!":
            return  # an evicted instance's tasks: expected, the history keeps its progress
        log.error("workflow %s: %s", self.instance.context.workflow_exec_id, context.get("message"),
                  exc_info=context.get("exception"))

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    def run_ready(self) -> None:
        """Run callbacks until none is ready and no `wait_condition` predicate turned true."""
        outer = asyncio._get_running_loop()
        asyncio._set_running_loop(self)
        try:
            while True:
                while self.ready:
                    handle = self.ready.popleft()
                    if not handle._cancelled:
                        handle._run()
                if not self.instance.check_conditions():
                    break
        finally:
            asyncio._set_running_loop(outer)


@dataclass
class _Issued:
    decision: Any
    key: str | None


@dataclass
class _Activity:
    definition: ActivityDefinition | None
    name: str
    future: asyncio.Future[Any]


class ChildHandle:
    """A started child workflow: `await handle` gives its result (or raises its failure).

    When the task awaiting the child is cancelled (the workflow got a cancel request),
    the child is asked to cancel and the await returns only once the child has closed,
    then raises `asyncio.CancelledError` (Temporal's WAIT_CANCELLATION_COMPLETED).
    """

    def __init__(self, instance: WorkflowInstance, execution_id: str, workflow_name: str,
                 result: asyncio.Future[Any]) -> None:
        self.execution_id = execution_id
        self.workflow_name = workflow_name
        self._instance = instance
        self._result = result

    @property
    def id(self) -> str:
        """The child's execution id (Temporal's and Mistral's name for it)."""
        return self.execution_id

    def __await__(self) -> Generator[Any, None, Any]:
        return self._instance.child_result(self.execution_id, self._result).__await__()

    async def result(self) -> Any:
        return await self

    def cancel(self) -> None:
        """Ask the child to cancel (a decision: it reaches the child as a cancel request)."""
        self._instance.request_cancel_child(self.execution_id)

    async def signal(self, signal: str | Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Send the child signal `signal` (a name or its `@workflow.signal` method), with
        its input given as to a client handle's `signal()`. Returns once the signal is in
        the child's history (EXTERNAL_WORKFLOW_EXECUTION_SIGNALED in this one); raises
        `ApplicationError` (SignalNotDelivered) when the child is no longer running."""
        await self._instance.signal_external(self.execution_id, handler_name(signal, "__treeflow_signal__"),
                                             handler_input(args, kwargs))


@dataclass
class _Child:
    workflow_name: str
    return_type: Any
    started: asyncio.Future[Any]
    result: asyncio.Future[Any]
    cancel_requested: bool = False


class WorkflowInstance:
    """One run of one workflow, fed its history one task at a time."""

    def __init__(self, definition: WorkflowDefinition, context: WorkflowContext) -> None:
        self.definition = definition
        self.context = context
        self.loop = WorkflowLoop(self)
        self.now: datetime = datetime.fromtimestamp(0).astimezone()
        #: Whether the code asked for `workflow.now()` since this was last cleared (a
        #: continuation on predicted events is only sent when it did not: their times are not known).
        self.now_read = False
        #: The last task was a continuation the processor has not been seen to accept yet.
        self.unconfirmed = False
        #: The parent's run, for a child (from its WORKFLOW_EXECUTION_STARTED).
        self.parent_run_id: str | None = None
        #: Ids of children the SDK named (no `execution_id` given): unique, so a start of one
        #: begins a fresh history.
        self.generated_child_ids: set[str] = set()
        self.random = random.Random(uuid.UUID(context.workflow_run_id).int
                                    if _is_uuid(context.workflow_run_id) else context.workflow_run_id)
        self.applied_sequence = 0
        #: Sequence of the newest event the code has seen, and of the run's first event.
        self.seen_sequence = 0
        self.first_sequence = 0
        self.last_task_id: str | None = None
        self.closed = False
        self.cancel_requested = False
        self.main: asyncio.Task[Any] | None = None
        self.workflow_object: Any = None
        self._start: tuple[str | None] | None = None
        self._start_error: Exception | None = None
        self._conditions: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._querying = False
        self._issued: deque[_Issued] = deque()
        self._buffer: list[Event] = []
        self._times: dict[int, datetime] = {}
        self._activities: dict[str, _Activity] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._timer_ids: dict[int, str] = {}
        self._children: dict[str, _Child] = {}
        self._counters = {"activity": 0, "timer": 0}
        #: Signals the code sent to other executions and awaits, by target, in order.
        self._signals_out: dict[str, deque[asyncio.Future[None]]] = {}
        #: `patched()` answers of this run, by patch id.
        self._patches: dict[str, bool] = {}
        #: While replaying a workflow task: the patch ids its decisions recorded (None when
        #: the code runs past the history, deciding anew).
        self._replay_markers: set[str] | None = None
        #: Set when the code raised an exception that fails the workflow task, not the workflow.
        self.task_failure: BaseException | None = None

    # ------------------------------------------------------------ feeding history

    def activate(self, events: list[Event]) -> list[Any]:
        """Feed the events after `applied_sequence`; return the decisions the code makes now.

        Raises `NonDeterminismError` when the code does not do what the history says.
        """
        for index, event in enumerate(events):
            if event.sequence <= self.applied_sequence:
                self._times[event.sequence] = event.timestamp  # the log's, after a continuation's predicted one
                continue
            self.applied_sequence = event.sequence
            self._times[event.sequence] = event.timestamp
            if event.event_type is T.WORKFLOW_TASK_COMPLETED:
                # The code ran here, having seen the history up to history_length.
                self._apply_buffer(upto=event.payload.history_length)  # type: ignore[union-attr]
                self._replay_markers = _markers_of_task(events, index + 1)
                try:
                    self._run(event.payload.history_length)  # type: ignore[union-attr]
                finally:
                    self._replay_markers = None
            elif event.event_type in EFFECTS and not _reported_by_activity(event):
                self._match(event)
                if event.event_type in RESOLVING:  # a decision whose outcome the code awaits
                    self._buffer.append(event)
            elif event.event_type in RESOLVING:
                self._buffer.append(event)
        self._apply_buffer(upto=self.applied_sequence)
        self._run(self.applied_sequence)
        return [issued.decision for issued in self._issued]

    def _apply_buffer(self, upto: int) -> None:
        """Resolve the buffered events up to `upto`, as one activation: the start and the
        signals first, then (after the code has run and conditions were re-checked) the
        rest, timers included. So a signal that arrived with a timer's firing is seen
        before the timer, whatever their order in the history: `wait_condition(pred,
        timeout=...)` returns when the signal made `pred` true (Temporal's Python SDK
        orders an activation's jobs the same way: signals and updates first)."""
        now = [e for e in self._buffer if e.sequence <= upto]
        self._buffer = [e for e in self._buffer if e.sequence > upto]
        first = [e for e in now if e.event_type in FIRST_IN_ACTIVATION]
        rest = [e for e in now if e.event_type not in FIRST_IN_ACTIVATION]
        for event in first:
            self._resolve(event)
        if first and rest and self.main is not None:
            self._run(upto)
        for event in rest:
            self._resolve(event)
        if self._start is not None:
            # The entrypoint starts after the signals delivered with the start event, so
            # their handlers have run (on the workflow object) when it begins.
            self._start_main(self._start[0])
            self._start = None

    def _run(self, seen: int) -> None:
        # The code sees the time of the newest event it has seen, on replay too.
        self.now = self._times.get(seen, self.now)
        self.seen_sequence = seen
        self.loop.run_ready()

    @property
    def run_length(self) -> int:
        """Events in the current run's history that the code has seen (same on replay)."""
        return max(0, self.seen_sequence - self.first_sequence + 1) if self.first_sequence else 0

    @property
    def unrecorded_decisions(self) -> list[Any]:
        """The decisions the code made that no event of the history has matched yet, in order."""
        return [issued.decision for issued in self._issued]

    def _issue(self, decision: Any, key: str | None) -> None:
        if self._querying:
            raise RuntimeError("a query handler only reads the workflow's state: it may not start activities, "
                               "children or timers, nor end the workflow")
        if not self.closed:
            self._issued.append(_Issued(decision, key))
            if isinstance(decision, (m.CompleteWorkflowExecution, m.FailWorkflowExecution,
                                     m.CancelWorkflowExecution, m.ContinueAsNewWorkflowExecution)):
                self.closed = True

    def _match(self, event: Event) -> None:
        decision_type, key_field = EFFECTS[event.event_type]
        key = getattr(event.payload, key_field) if key_field else None
        if not self._issued:
            raise NonDeterminismError(
                f"history event #{event.sequence} {event.event_type.value}"
                f"{f' ({key})' if key else ''} has no matching command: the workflow code did not ask for it")
        issued = self._issued.popleft()
        if type(issued.decision) is not decision_type or issued.key != key:
            raise NonDeterminismError(
                f"history event #{event.sequence} {event.event_type.value}{f' ({key})' if key else ''} does not "
                f"match the workflow code's next command {type(issued.decision).__name__}"
                f"{f' ({issued.key})' if issued.key else ''}")
        if isinstance(issued.decision, m.RecordWorkflowCustomTask) and issued.decision.event_type is not event.event_type:
            raise NonDeterminismError(f"history event #{event.sequence} {event.event_type.value} ({key}) does not "
                                      f"match the workflow code's {issued.decision.event_type.value} of that task")
        name = getattr(event.payload, "activity_name", None) or getattr(event.payload, "child_workflow_name", None)
        expected = (getattr(issued.decision, "activity_name", None)
                    or getattr(issued.decision, "child_workflow_name", None))
        if expected is not None and name != expected:  # (a cancel request names only the id)
            raise NonDeterminismError(f"history event #{event.sequence} {event.event_type.value} ({key}) is for "
                                      f"{name}, the workflow code asked for {expected}")

    def _resolve(self, event: Event) -> None:
        t, p = event.event_type, event.payload
        if t is T.WORKFLOW_EXECUTION_STARTED:
            self.first_sequence = event.sequence
            self.parent_run_id = p.parent_workflow_run_id  # type: ignore[union-attr]
            self._start = (p.input_json,)  # type: ignore[union-attr]
            try:
                self.workflow_object = self.definition.cls()
            except Exception as exc:  # reported by the entrypoint's task: the workflow fails
                self._start_error = exc
        elif t is T.WORKFLOW_EXECUTION_CANCEL_REQUESTED:
            self.cancel_requested = True
            if self.main is not None and not self.main.done():
                self.main.cancel()
        elif t is T.WORKFLOW_EXECUTION_SIGNALED:
            self._deliver_signal(p.signal_name, p.input_json)  # type: ignore[union-attr]
        elif t is T.EXTERNAL_WORKFLOW_EXECUTION_SIGNALED:
            waiting = self._signals_out.get(p.target_workflow_exec_id)  # type: ignore[union-attr]
            future = waiting.popleft() if waiting else None
            if future is not None and not future.done():
                if p.delivered:  # type: ignore[union-attr]
                    future.set_result(None)
                else:
                    future.set_exception(ApplicationError(
                        f"signal {p.signal_name!r} not delivered: {p.target_workflow_exec_id} is not running",  # type: ignore[union-attr]
                        type="SignalNotDelivered", non_retryable=True))
        elif t is T.WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            self._deliver_update(p.update_id, p.update_name, p.input_json)  # type: ignore[union-attr]
        elif t is T.TIMER_FIRED:
            handle = self._timers.pop(p.timer_id, None)  # type: ignore[union-attr]
            if handle is not None and not handle.cancelled():
                self.loop.ready.append(handle)
            elif handle is None:
                # The code cancelled it before seeing it fire (a signal resolved first, or
                # the fire was decided while the task ran): no TIMER_CANCELED will follow.
                self._issued = deque(i for i in self._issued if not (
                    isinstance(i.decision, m.CancelTimer) and i.key == p.timer_id))  # type: ignore[union-attr]
        elif t in (T.ACTIVITY_TASK_COMPLETED, T.ACTIVITY_TASK_FAILED, T.ACTIVITY_TASK_CANCELED):
            self._resolve_activity(event)
        elif t is T.ACTIVITY_TASK_TIMED_OUT:
            if not p.will_retry:  # type: ignore[union-attr]
                self._resolve_activity(event)
        else:
            self._resolve_child(event)

    def _resolve_activity(self, event: Event) -> None:
        p = event.payload
        activity = self._activities.pop(p.activity_id, None)  # type: ignore[union-attr]
        if activity is None or activity.future.done():
            return
        if event.event_type is T.ACTIVITY_TASK_COMPLETED:
            return_type = activity.definition.return_type if activity.definition else Any
            _settle(activity.future, lambda: from_json(p.result_json, return_type))  # type: ignore[union-attr]
        elif event.event_type is T.ACTIVITY_TASK_FAILED:
            activity.future.set_exception(ActivityError(activity.name, p.activity_id,  # type: ignore[union-attr]
                                                        exception_from_failure(p.failure)))  # type: ignore[union-attr]
        elif event.event_type is T.ACTIVITY_TASK_TIMED_OUT:
            timeout = ApplicationError(f"activity timed out ({p.timeout_type})",  # type: ignore[union-attr]
                                       type="ActivityTimeoutError", non_retryable=True)
            activity.future.set_exception(ActivityError(activity.name, p.activity_id, timeout,  # type: ignore[union-attr]
                                                        reason="timed out"))
        else:
            activity.future.cancel()

    def _resolve_child(self, event: Event) -> None:
        p = event.payload
        child = self._children.get(p.child_workflow_exec_id)  # type: ignore[union-attr]
        if child is None:
            return
        t = event.event_type
        if t is T.CHILD_WORKFLOW_EXECUTION_STARTED:
            if not child.started.done():
                child.started.set_result(p.child_workflow_run_id)  # type: ignore[union-attr]
            return
        if t is T.START_CHILD_WORKFLOW_EXECUTION_FAILED:
            error = ChildWorkflowError(child.workflow_name, p.child_workflow_exec_id, "START_FAILED",  # type: ignore[union-attr]
                                       exception_from_failure(m.Failure(type=p.cause, message=p.cause)))  # type: ignore[union-attr]
            for future in (child.started, child.result):
                if not future.done():
                    future.set_exception(error)
            return
        del self._children[p.child_workflow_exec_id]  # type: ignore[union-attr]
        if child.result.done():
            return
        if t is T.CHILD_WORKFLOW_EXECUTION_COMPLETED:
            _settle(child.result, lambda: from_json(p.result_json, child.return_type))  # type: ignore[union-attr]
            return
        failure = getattr(p, "failure", None)
        cause = exception_from_failure(failure) if failure else None
        if t is T.CHILD_WORKFLOW_EXECUTION_TERMINATED:
            cause = exception_from_failure(m.Failure(type="Terminated", message=p.reason))  # type: ignore[union-attr]
        child.result.set_exception(ChildWorkflowError(child.workflow_name, p.child_workflow_exec_id,  # type: ignore[union-attr]
                                                      CHILD_CLOSED[t], cause))

    # ------------------------------------------------------------ the main coroutine

    def _start_main(self, input_json: str | None) -> None:
        self.main = self.loop.create_task(self._main(input_json), name=f"workflow {self.context.workflow_exec_id}")
        if self.cancel_requested:  # requested before the code ever ran: it gets it at its first await
            self.loop.call_soon(self.main.cancel)

    async def _main(self, input_json: str | None) -> None:
        definition = self.definition
        try:
            if self._start_error is not None:
                raise self._start_error
            run = getattr(self.workflow_object, definition.run_method)
            args, kwargs = definition.parameters.bind(input_json)
            result = await run(*args, **kwargs)
        except asyncio.CancelledError:
            if self.cancel_requested:
                self._issue(m.CancelWorkflowExecution(), None)
            else:
                self._issue(m.FailWorkflowExecution(failure=failure_from_exception(
                    RuntimeError("the workflow was cancelled without a cancel request"))), None)
        except ContinueAsNewError as request:
            self._issue(m.ContinueAsNewWorkflowExecution(
                input_json=None if request.params is None else to_json(request.params)), None)
        except Exception as exc:
            # (GeneratorExit is not caught: an evicted instance's coroutine must just close.)
            if self._fails_workflow(exc):
                self._issue(m.FailWorkflowExecution(failure=failure_from_exception(exc)), None)
            else:
                self._fail_task(exc)
        else:
            self._issue(m.CompleteWorkflowExecution(result_json=to_json(result)), None)

    def _deliver_signal(self, name: str, input_json: str | None) -> None:
        """Run the signal's handler as a task of the workflow (signals run in history order).

        A signal with no handler, or whose payload does not fit the handler, is logged
        and dropped (the same on replay); a handler that raises fails the workflow.
        """
        method = self.definition.signals.get(name)
        if method is None or self.workflow_object is None:
            log.warning("workflow %s (%s) got signal %r and has no handler for it; it has %s",
                        self.context.workflow_exec_id, self.definition.name, name, sorted(self.definition.signals))
            return
        handler = getattr(self.workflow_object, method)
        try:
            args = _handler_args(handler, input_json)
        except Exception as exc:
            log.warning("workflow %s: dropped signal %r: %s", self.context.workflow_exec_id, name, exc)
            return
        self.loop.create_task(self._signal(name, handler, args), name=f"signal {name}")

    async def _signal(self, name: str, handler: Callable[..., Any],
                      args: tuple[list[Any], dict[str, Any]]) -> None:
        try:
            result = handler(*args[0], **args[1])
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._fails_workflow(exc):
                self._fail_task(exc)
                return
            error = ApplicationError(f"signal handler {name!r} raised {type(exc).__name__}: {exc}",
                                     type="SignalHandlerError")
            error.__cause__ = exc
            self._issue(m.FailWorkflowExecution(failure=failure_from_exception(error)), None)

    def _fails_workflow(self, exc: BaseException) -> bool:
        """True when `exc`, raised by the workflow's code, fails the workflow; any other
        exception fails the workflow task (retried: a bug can be fixed under a waiting run)."""
        return isinstance(exc, (TreeflowError, *self.definition.failure_exception_types))

    def _fail_task(self, exc: BaseException) -> None:
        if self.task_failure is None and not self._querying:
            self.task_failure = exc

    # ------------------------------------------------------------ updates

    def _update_handler(self, name: str) -> Callable[..., Any]:
        method = self.definition.updates.get(name)
        if method is None:
            raise WorkflowUpdateError(f"workflow {self.definition.name} has no update named {name!r}; it has "
                                      f"{sorted(self.definition.updates) or 'none'}", "UpdateNotFound")
        if self.workflow_object is None:
            raise WorkflowUpdateError(f"workflow {self.context.workflow_exec_id} has not started", "UpdateRejected")
        return getattr(self.workflow_object, method)

    def validate_update(self, name: str, input_json: str | None) -> None:
        """Check update `name` against the workflow's current state, changing nothing:
        its handler exists, its input fits the handler's parameters, and its validator
        (if any) does not raise. Raises `WorkflowUpdateError` (UpdateNotFound,
        UpdateRejected) otherwise."""
        handler = self._update_handler(name)
        try:
            args, kwargs = _handler_args(handler, input_json)
        except Exception as exc:
            raise WorkflowUpdateError(f"update {name!r} rejected: {exc}", "UpdateRejected") from exc
        validator = self.definition.validators.get(name)
        if validator is None:
            return
        try:
            self._read_only(lambda: getattr(self.workflow_object, validator)(*args, **kwargs))
        except Exception as exc:
            raise WorkflowUpdateError(f"update {name!r} rejected by its validator: {type(exc).__name__}: {exc}",
                                      "UpdateRejected", exception_from_failure(failure_from_exception(exc))) from exc

    def _deliver_update(self, update_id: str, name: str, input_json: str | None) -> None:
        """Run an accepted update's handler as a task of the workflow (in history order,
        like a signal's); its outcome is a CompleteWorkflowUpdate decision."""
        try:
            handler = self._update_handler(name)
            args = _handler_args(handler, input_json)
        except Exception as exc:  # accepted by a worker with other code: the update fails
            self._issue(m.CompleteWorkflowUpdate(update_id=update_id, failure=failure_from_exception(exc)), update_id)
            return
        self.loop.create_task(self._update(update_id, handler, args), name=f"update {name}")

    async def _update(self, update_id: str, handler: Callable[..., Any],
                      args: tuple[list[Any], dict[str, Any]]) -> None:
        try:
            result = handler(*args[0], **args[1])
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._fails_workflow(exc):  # the update fails; the workflow goes on
                self._issue(m.CompleteWorkflowUpdate(update_id=update_id, failure=failure_from_exception(exc)),
                            update_id)
            else:
                self._fail_task(exc)
            return
        try:
            outcome = m.CompleteWorkflowUpdate(update_id=update_id, result_json=to_json(result))
        except (TypeError, ValueError) as exc:
            outcome = m.CompleteWorkflowUpdate(update_id=update_id, failure=failure_from_exception(
                ApplicationError(f"the result of the update is not JSON-able: {exc}", type="PayloadError")))
        self._issue(outcome, update_id)

    # ------------------------------------------------------------ versioning and custom tasks

    def patched(self, patch_id: str, deprecated: bool = False) -> bool:
        """Temporal's `patched()`: True for code deciding anew (and a 'version' marker is
        recorded), and on replay True iff the replayed task recorded the marker. The
        first answer holds for the rest of the run."""
        if patch_id in self._patches:
            return self._patches[patch_id]
        replaying = self._replay_markers
        use_new = True if replaying is None else patch_id in replaying
        self._patches[patch_id] = use_new
        if use_new:
            self._issue(m.RecordMarker(marker_name=VERSION_MARKER, marker_id=patch_id, deprecated=deprecated),
                        patch_id)
        return use_new

    def signal_external(self, target: str, name: str, input_json: str | None) -> asyncio.Future[None]:
        """Signal execution `target` of this tree; the future is done once it is delivered."""
        self._issue(m.SignalExternalWorkflowExecution(target_workflow_exec_id=target, signal_name=name,
                                                      input_json=input_json), target)
        future: asyncio.Future[None] = self.loop.create_future()
        self._signals_out.setdefault(target, deque()).append(future)
        return future

    def record_custom_task(self, event_type: EventType, custom_task_id: str, custom_task_type: str,
                           payload: Any = None, failure: Any = None) -> None:
        self._issue(m.RecordWorkflowCustomTask(event_type=event_type, custom_task_id=custom_task_id,
                                               custom_task_type=custom_task_type, payload=payload,
                                               failure=failure), custom_task_id)

    # ------------------------------------------------------------ conditions and queries

    def wait_for(self, predicate: Callable[[], bool]) -> asyncio.Future[None]:
        """A future done once `predicate()` is true (checked whenever the code has run)."""
        future: asyncio.Future[None] = self.loop.create_future()
        self._conditions.append((predicate, future))
        return future

    def check_conditions(self) -> bool:
        """Settle the conditions that hold now; True when any did (their waiters are ready)."""
        settled = False
        waiting = []
        for predicate, future in self._conditions:
            if future.done():
                continue
            try:
                holds = predicate()
            except Exception as exc:
                future.set_exception(exc)
                settled = True
                continue
            if holds:
                future.set_result(None)
                settled = True
            else:
                waiting.append((predicate, future))
        self._conditions = waiting
        return settled

    def query(self, name: str, input_json: str | None) -> Any:
        """Run query handler `name` on the workflow object as it is now; changes nothing.

        Raises `WorkflowQueryError` (QueryNotFound) for an unknown name; whatever the
        handler raises propagates.
        """
        method = self.definition.queries.get(name)
        if method is None:
            raise WorkflowQueryError(f"workflow {self.definition.name} has no query named {name!r}; it has "
                                     f"{sorted(self.definition.queries) or 'none'}", "QueryNotFound")
        if self.workflow_object is None:
            raise WorkflowQueryError(f"workflow {self.context.workflow_exec_id} has not started", "QueryFailed")
        handler = getattr(self.workflow_object, method)
        args, kwargs = _handler_args(handler, input_json)
        return self._read_only(lambda: handler(*args, **kwargs))

    def _read_only(self, call: Callable[[], Any]) -> Any:
        """Run `call` on the instance with decisions forbidden and the random state and
        counters restored after (a query handler, an update validator)."""
        random_state, counters, patches = self.random.getstate(), dict(self._counters), dict(self._patches)
        outer = asyncio._get_running_loop()
        asyncio._set_running_loop(self.loop)
        self._querying = True
        try:
            return call()
        finally:
            self._querying = False
            asyncio._set_running_loop(outer)
            self.random.setstate(random_state)  # workflow.random() in a handler must not shift the run's
            self._counters, self._patches = counters, patches

    # ------------------------------------------------------------ what workflow code calls

    def schedule_activity(self, definition: ActivityDefinition, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> asyncio.Future[Any]:
        self._counters["activity"] += 1
        activity_id = str(self._counters["activity"])
        options = definition.options
        bound = definition.signature.bind(*args, **kwargs)
        self._issue(m.ScheduleActivityTask(
            activity_id=activity_id, activity_name=definition.name,
            task_queue=options.task_queue or self.context.task_queue,
            input_json=to_json(dict(bound.arguments)),
            retry_policy=options.retry_policy.to_record() if options.retry_policy else None,
            schedule_to_close_timeout_ms=millis(options.schedule_to_close_timeout),
            start_to_close_timeout_ms=millis(options.start_to_close_timeout),
            heartbeat_timeout_ms=millis(options.heartbeat_timeout)), activity_id)
        future = self.loop.create_future()
        self._activities[activity_id] = _Activity(definition, definition.name, future)
        future.add_done_callback(lambda f: self._activity_done(activity_id, f))
        return future

    def _activity_done(self, activity_id: str, future: asyncio.Future[Any]) -> None:
        if future.cancelled() and activity_id in self._activities:
            del self._activities[activity_id]
            self._issue(m.RequestCancelActivityTask(activity_id=activity_id), activity_id)

    async def start_child(self, workflow: WorkflowDefinition | str, params: Any, *, execution_id: str | None,
                          execution_timeout: timedelta | None, task_queue: str | None,
                          parent_close_policy: ParentClosePolicy, retry_policy: RetryPolicy | None,
                          wake_on_start: bool = True) -> ChildHandle:
        name = workflow if isinstance(workflow, str) else workflow.name
        child_id = execution_id or f"{self.context.workflow_exec_id}.{self.uuid4().hex[:12]}"
        if execution_id is None:
            self.generated_child_ids.add(child_id)
        timeout = execution_timeout or (None if isinstance(workflow, str) else workflow.execution_timeout)
        queue = task_queue or (None if isinstance(workflow, str) else workflow.task_queue) or self.context.task_queue
        self._issue(m.StartChildWorkflowExecution(
            child_workflow_exec_id=child_id, child_workflow_name=name, task_queue=queue,
            input_json=None if params is None else to_json(params), parent_close_policy=parent_close_policy,
            execution_timeout_ms=millis(timeout), retry_policy=retry_policy.to_record() if retry_policy else None,
            wake_on_start=wake_on_start), child_id)
        child = _Child(name, Any if isinstance(workflow, str) else workflow.return_type,
                       self.loop.create_future(), self.loop.create_future())
        self._children[child_id] = child
        try:
            await asyncio.shield(child.started)
        except asyncio.CancelledError:
            await self._cancel_child_and_wait(child_id, child.result)
            raise
        return ChildHandle(self, child_id, name, child.result)

    async def child_result(self, child_id: str, result: asyncio.Future[Any]) -> Any:
        """The child's result; a cancel of the awaiting task is passed on to the child."""
        try:
            return await asyncio.shield(result)
        except asyncio.CancelledError:
            await self._cancel_child_and_wait(child_id, result)
            raise

    async def _cancel_child_and_wait(self, child_id: str, result: asyncio.Future[Any]) -> None:
        if result.done():
            return
        self.request_cancel_child(child_id)
        try:
            await asyncio.shield(result)
        except (Exception, asyncio.CancelledError):
            pass  # how the child ended does not matter: the awaiting task was cancelled

    def request_cancel_child(self, child_id: str) -> None:
        child = self._children.get(child_id)
        if child is not None and not child.cancel_requested:
            child.cancel_requested = True
            self._issue(m.RequestCancelChildWorkflowExecution(child_workflow_exec_id=child_id), child_id)

    def start_timer(self, delay: float, callback: Callable[..., Any], args: tuple[Any, ...],
                    context: contextvars.Context | None) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(self.loop.time() + max(delay, 0), callback, args, self.loop, context)
        if delay <= 0:
            self.loop.ready.append(handle)
            return handle
        self._counters["timer"] += 1
        timer_id = str(self._counters["timer"])
        self._timers[timer_id] = handle
        self._timer_ids[id(handle)] = timer_id
        self._issue(m.StartTimer(timer_id=timer_id, duration_ms=max(1, round(delay * 1000))), timer_id)
        return handle

    def cancel_timer(self, handle: asyncio.TimerHandle) -> None:
        timer_id = self._timer_ids.pop(id(handle), None)
        if timer_id is not None and self._timers.pop(timer_id, None) is not None:
            self._issue(m.CancelTimer(timer_id=timer_id), timer_id)

    def uuid4(self) -> uuid.UUID:
        return uuid.UUID(int=self.random.getrandbits(128), version=4)


def _settle(future: asyncio.Future[Any], value: Callable[[], Any]) -> None:
    try:
        future.set_result(value())
    except Exception as exc:
        future.set_exception(exc)


def _handler_args(handler: Callable[..., Any], input_json: str | None) -> tuple[list[Any], dict[str, Any]]:
    """The arguments of a (bound) signal, query or update handler from its payload
    (`Parameters.bind`: the raw value of one parameter, or an object of them by name)."""
    return Parameters.of(handler).bind(input_json)


def _reported_by_activity(event: Event) -> bool:
    """A custom task event an activity reported: no decision of the workflow code stands for it."""
    return event.event_type in CUSTOM_TASK_EVENTS and event.payload.activity_id is not None  # type: ignore[union-attr]


def _markers_of_task(events: list[Event], start: int) -> set[str]:
    """The patch ids of the version markers among a replayed workflow task's decisions
    (the events from `start` up to the next WORKFLOW_TASK_COMPLETED)."""
    found: set[str] = set()
    for event in events[start:]:
        if event.event_type is T.WORKFLOW_TASK_COMPLETED:
            break
        if event.event_type is T.MARKER_RECORDED and event.payload.marker_name == VERSION_MARKER:  # type: ignore[union-attr]
            found.add(event.payload.marker_id)  # type: ignore[union-attr]
    return found


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


__all__ = ["ChildHandle", "WorkflowInstance", "WorkflowLoop", "current_instance", "DEFAULT_TASK_QUEUE"]
