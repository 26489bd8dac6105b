"""Run one task: replay workflow code or run an activity attempt, and report the outcome."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from treeflow.schemas import EVENT_TYPES, Command, Event, EventType, Failure, WorkflowContext
from treeflow.schemas import models as m

from ..activities import ActivityContext, ActivityInfo, _context
from ..core.decide import run_id_for
from ..core.evolve import TRIGGERS, workflow_task_id
from ..definitions import ActivityDefinition, WorkflowDefinition
from ..ids import new_id
from ..observability import metrics, tracing
from ..errors import UNKNOWN_WORKFLOW, NonDeterminismError, WorkflowQueryError, WorkflowUpdateError, failure_from_exception
from ..payloads import to_json, validate
from .instance import RESOLVING, WorkflowInstance

log = logging.getLogger(__name__)

Send = Callable[[Command], Awaitable[Any]]
#: Sends a claim (a ReportActivityTaskStarted with a claim id) and returns whether the
#: processor granted it.
Claim = Callable[[Command], Awaitable[bool]]
#: Without a claim, a started report is sent for an activity still running after this long.
STARTED_REPORT_AFTER = 0.05


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def command(context: WorkflowContext, payload: Any, timestamp: datetime | None = None) -> Command:
    """A command about `context`'s execution, keyed by its root."""
    return Command(command_id=new_id(), timestamp=timestamp or utc_now(),
                   root_workflow_exec_id=context.root_workflow_exec_id,
                   workflow_exec_id=context.workflow_exec_id, payload=payload)


class TaskRunner:
    """Runs tasks for the workflows and activities it was given.

    Keeps up to `cache_size` workflow instances in memory (sticky execution): a task
    for a cached run only feeds it the new events instead of replaying everything.
    A query task is answered from the cached instance when it has seen every event
    of the task's history that the code reacts to, else from a fresh replay of that
    history (which is then dropped: the cache only holds instances driven by
    workflow tasks).
    """

    def __init__(self, workflows: dict[str, WorkflowDefinition], activities: dict[str, ActivityDefinition],
                 cache_size: int = 1000, clock: Callable[[], datetime] = utc_now) -> None:
        self.workflows = workflows
        self.clock = clock
        self.activities = activities
        self.cache_size = cache_size
        #: Send a closing child's completion with the decisions of its parent's next task
        #: when the parent's run is cached here (`_with_parent_continuation`).
        self.continue_parents = True
        #: Parent continuations made (sent with a child's completion).
        self.parent_continuations = 0
        self._cache: OrderedDict[tuple[str, str], WorkflowInstance] = OrderedDict()
        #: Executions already warned about as naming no registered workflow (logged once each).
        self._warned_unknown: OrderedDict[str, None] = OrderedDict()
        self.replays = 0
        self.query_replays = 0
        #: Activity attempts running in this process, by (execution, run, activity, attempt).
        self._running: set[tuple[str, str, str, int]] = set()
        #: Activity tasks dropped: a copy of an attempt this process was running, or an
        #: attempt the processor said is closed.
        self.duplicate_tasks = 0
        self.closed_tasks = 0

    # ------------------------------------------------------------ workflow tasks

    def run_workflow_task(self, context: WorkflowContext, task_id: str, history: list[Event]) -> Command:
        """Feed the history to the run's instance; a CompleteWorkflowTask or FailWorkflowTask command."""
        key = (context.workflow_exec_id, context.workflow_run_id)
        history_length = history[-1].sequence if history else 0
        definition = self.workflows.get(context.workflow_name)
        if definition is None:
            if context.workflow_exec_id not in self._warned_unknown:
                log.warning("workflow execution %s names workflow %r, which is not registered here (task queue %r; "
                            "registered: %s): its workflow task fails as UNKNOWN_WORKFLOW and is retried",
                            context.workflow_exec_id, context.workflow_name, context.task_queue,
                            sorted(self.workflows) or "none")
                self._warned_unknown[context.workflow_exec_id] = None
                while len(self._warned_unknown) > self.cache_size:
                    self._warned_unknown.popitem(last=False)
            return self._command(context, m.FailWorkflowTask(
                task_id=task_id, workflow_run_id=context.workflow_run_id, cause=UNKNOWN_WORKFLOW,
                failure=Failure(type="WorkflowNotRegistered", message=(
                    f"no workflow named {context.workflow_name!r} is registered on this worker; it has "
                    f"{sorted(self.workflows) or 'none'}"))))
        instance = self._cache.pop(key, None)
        if instance is not None and not _continues(instance, history):
            instance = None
        if instance is None:
            instance = WorkflowInstance(definition, context)
            self.replays += 1
        try:
            decisions = instance.activate(history)
        except NonDeterminismError as exc:
            log.error("workflow %s: %s", context.workflow_exec_id, exc)
            return self._command(context, m.FailWorkflowTask(
                task_id=task_id, workflow_run_id=context.workflow_run_id, cause="NON_DETERMINISTIC",
                failure=failure_from_exception(exc)))
        if instance.task_failure is not None:
            # The code raised an exception that fails the task, not the workflow: the task
            # is retried (by a fresh replay) after a backoff; a fixed deployment lets it pass.
            exc = instance.task_failure
            log.error("workflow %s: the workflow task failed (%s: %s); it will be retried", context.workflow_exec_id,
                      type(exc).__name__, exc)
            return self._command(context, m.FailWorkflowTask(
                task_id=task_id, workflow_run_id=context.workflow_run_id, cause="WORKFLOW_CODE_ERROR",
                failure=failure_from_exception(exc)))
        instance.last_task_id = task_id
        if not instance.closed:
            self._cache[key] = instance
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return self._command(context, m.CompleteWorkflowTask(
            task_id=task_id, workflow_run_id=context.workflow_run_id, history_length=history_length,
            decisions=self._with_parent_continuation(instance, decisions)))

    def continue_after_activity(self, context: WorkflowContext, report: m.CompleteWorkflowTask,
                                completion: m.CompleteActivityTask) -> m.WorkflowTaskContinuation | None:
        """The decisions of the workflow task that `completion` will cause, made now on the
        history the processor will then hold, or None when they cannot be known here.

        `report` is the cached run's last task, which scheduled the completed activity as its
        only decision. The history predicted after it: that task's completion, the activity's
        scheduling, start and completion. Not when the code asks for `workflow.now()` (those
        events' times are the processor's), fails the task, or does not match. The processor
        takes the decisions only if that is the run's history (`treeflow.core.decide`); if it
        does not, the instance is ahead of the log and is not used again until a history
        shows that it was (see `_continues`).
        """
        key = (context.workflow_exec_id, context.workflow_run_id)
        instance = self._cache.get(key)
        if (instance is None or instance.last_task_id != report.task_id
                or instance.applied_sequence != report.history_length or len(report.decisions) != 1):
            return None
        scheduled = report.decisions[0]
        if not isinstance(scheduled, m.ScheduleActivityTask) or scheduled.activity_id != completion.activity_id:
            return None
        del self._cache[key]
        ids = {"activity_id": scheduled.activity_id, "activity_name": scheduled.activity_name}
        predicted = [
            m.WorkflowTaskCompleted(task_id=report.task_id, history_length=report.history_length),
            m.ActivityTaskScheduled(**ids, task_queue=scheduled.task_queue, input_json=scheduled.input_json,
                                    retry_policy=scheduled.retry_policy,
                                    schedule_to_close_timeout_ms=scheduled.schedule_to_close_timeout_ms,
                                    start_to_close_timeout_ms=scheduled.start_to_close_timeout_ms,
                                    heartbeat_timeout_ms=scheduled.heartbeat_timeout_ms),
            m.ActivityTaskStarted(**ids),
            m.ActivityTaskCompleted(**ids, result_json=completion.result_json),
        ]
        return self._predicted_task(instance, predicted, attempt=completion.attempt)

    def last_task_id(self, context: WorkflowContext) -> str | None:
        """The id of the last task the cached run made decisions for (a continuation's included)."""
        instance = self._cache.get((context.workflow_exec_id, context.workflow_run_id))
        return instance.last_task_id if instance is not None else None

    def start_child_eagerly(self, parent: WorkflowContext, command_id: str, start: m.StartChildWorkflowExecution
                            ) -> tuple[WorkflowContext, m.WorkflowTaskContinuation] | None:
        """The child's context and the decisions of its first workflow task, for the child that
        `start` (a decision of the parent's task reported by command `command_id`) starts,
        made now on its predicted WORKFLOW_EXECUTION_STARTED; None when the child's workflow
        is not here, or its id was given by the code (a fresh history is then not certain),
        or as for any prediction."""
        definition = self.workflows.get(start.child_workflow_name)
        cached = self._cache.get((parent.workflow_exec_id, parent.workflow_run_id))
        if definition is None or cached is None or start.child_workflow_exec_id not in cached.generated_child_ids:
            return None
        context = WorkflowContext(
            workflow_exec_id=start.child_workflow_exec_id,
            workflow_run_id=run_id_for(command_id, start.child_workflow_exec_id),
            workflow_name=start.child_workflow_name, parent_workflow_exec_id=parent.workflow_exec_id,
            root_workflow_exec_id=parent.root_workflow_exec_id, task_queue=start.task_queue)
        started = m.WorkflowExecutionStarted(
            input_json=start.input_json, execution_timeout_ms=start.execution_timeout_ms,
            retry_policy=start.retry_policy, parent_close_policy=start.parent_close_policy,
            parent_workflow_run_id=parent.workflow_run_id)
        self.replays += 1
        first = self._predicted_task(WorkflowInstance(definition, context), [started], attempt=None)
        return None if first is None else (context, first)

    def _continued(self, instance: WorkflowInstance, seen_length: int, cause: int, history_length: int,
                   decisions: list[Any]) -> m.WorkflowTaskContinuation:
        """The continuation of `instance`'s run, which now stands past what the log holds: its
        task is the one the predicted event at `cause` asks for."""
        context = instance.context
        instance.last_task_id = workflow_task_id(context.workflow_run_id, cause)
        instance.unconfirmed = True
        if not instance.closed:
            self._cache[(context.workflow_exec_id, context.workflow_run_id)] = instance
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return m.WorkflowTaskContinuation(seen_length=seen_length, history_length=history_length,
                                          decisions=self._with_parent_continuation(instance, decisions))

    def _with_parent_continuation(self, child: WorkflowInstance, decisions: list[Any]) -> list[Any]:
        """`decisions`, with the parent's continuation on a closing CompleteWorkflowExecution.

        When the parent's run is cached here, the parent's next task (caused by this child's
        start or completion) sees the completion of its last task; then, if that task's one
        unrecorded decision started this child, its initiation and start; then
        CHILD_WORKFLOW_EXECUTION_COMPLETED: its code runs on that now. Not when the last task
        left other decisions unrecorded, nor when the code asks for `workflow.now()`, fails
        the task or does not match. The processor takes the decisions only if that is the
        parent's history."""
        closing = decisions[-1] if decisions else None
        context = child.context
        if (not self.continue_parents or not isinstance(closing, m.CompleteWorkflowExecution)
                or context.parent_workflow_exec_id is None or child.parent_run_id is None):
            return decisions
        key = (context.parent_workflow_exec_id, child.parent_run_id)
        parent = self._cache.get(key)
        if parent is None or parent.last_task_id is None or parent.closed:
            return decisions
        payloads: list[Any] = [
            m.WorkflowTaskCompleted(task_id=parent.last_task_id, history_length=parent.applied_sequence)]
        unrecorded = parent.unrecorded_decisions
        if unrecorded:
            start = unrecorded[0]
            if (len(unrecorded) > 1 or not isinstance(start, m.StartChildWorkflowExecution)
                    or start.child_workflow_exec_id != context.workflow_exec_id):
                return decisions
            ids = {"child_workflow_exec_id": start.child_workflow_exec_id,
                   "child_workflow_name": start.child_workflow_name}
            payloads += [
                m.StartChildWorkflowExecutionInitiated(
                    **ids, task_queue=start.task_queue, input_json=start.input_json,
                    parent_close_policy=start.parent_close_policy, execution_timeout_ms=start.execution_timeout_ms,
                    retry_policy=start.retry_policy, wake_on_start=start.wake_on_start),
                m.ChildWorkflowExecutionStarted(**ids, child_workflow_run_id=context.workflow_run_id)]
        del self._cache[key]
        payloads.append(m.ChildWorkflowExecutionCompleted(child_workflow_exec_id=context.workflow_exec_id,
                                                          child_workflow_name=context.workflow_name,
                                                          result_json=closing.result_json))
        continuation = self._predicted_task(parent, payloads, attempt=None)
        if continuation is None:
            return decisions
        self.parent_continuations += 1
        return [*decisions[:-1], closing.model_copy(update={"parent_continuation": continuation})]

    def _predicted_task(self, instance: WorkflowInstance, payloads: list[Any],
                        attempt: int | None) -> m.WorkflowTaskContinuation | None:
        """Feed `instance` the events of `payloads` after its last applied one; the decisions
        its code makes then, or None (the instance is then dropped: it stands past the log)."""
        now = self.clock()
        base = instance.applied_sequence
        events = [Event.model_construct(
            event_id=f"predicted:{n}", event_type=EVENT_TYPES[type(payload)], timestamp=now, sequence=base + n,
            workflow_context=instance.context,
            attempt=attempt if isinstance(payload, (m.ActivityTaskStarted, m.ActivityTaskCompleted)) else None,
            payload=payload)
            for n, payload in enumerate(payloads, start=1)]
        instance.now_read = False
        try:
            decisions = instance.activate(events)
        except NonDeterminismError:
            return None
        if instance.task_failure is not None or instance.now_read:
            return None
        cause = next(e.sequence for e in events if e.event_type in TRIGGERS
                     or e.event_type is EventType.WORKFLOW_EXECUTION_STARTED)
        return self._continued(instance, base, cause, events[-1].sequence, decisions)

    # ------------------------------------------------------------ query tasks

    def run_query_task(self, context: WorkflowContext, task: m.QueryTask) -> Command:
        """Run the query's handler on the run's current state; a RespondQueryTask command.
        For an update's validation (`task.update`): an AcceptWorkflowUpdate command, or a
        RespondQueryTask carrying the rejection."""
        return self._command(context, self._answer(context, task))

    def _answer(self, context: WorkflowContext, task: m.QueryTask) -> Any:
        def refuse(error_type: str, message: str, cause: Failure | None = None) -> m.RespondQueryTask:
            return m.RespondQueryTask(query_id=task.query_id, failure=Failure(
                type=error_type, message=message, non_retryable=True, cause=cause))

        if task.deadline is not None and self.clock() > task.deadline:
            return refuse("QueryExpired", f"query {task.query_name!r} reached this worker after its deadline")
        definition = self.workflows.get(context.workflow_name)
        if definition is None:
            return refuse("WorkflowNotRegistered", f"no workflow named {context.workflow_name!r} is registered on "
                                                   f"the worker of task queue {context.task_queue!r}")
        instance = self._cache.get((context.workflow_exec_id, context.workflow_run_id))
        if instance is None or not _up_to_date(instance, task.history):
            instance = WorkflowInstance(definition, context)
            self.query_replays += 1
            try:
                instance.activate(task.history)
            except NonDeterminismError as exc:
                return refuse("NonDeterministic", f"cannot rebuild the workflow's state: {exc}")
        if task.update:
            try:
                instance.validate_update(task.query_name, task.input_json)
            except WorkflowUpdateError as exc:
                return refuse(exc.type, str(exc), failure_from_exception(exc.cause) if exc.cause else None)
            return m.AcceptWorkflowUpdate(update_id=task.query_id, workflow_run_id=context.workflow_run_id,
                                          update_name=task.query_name, input_json=task.input_json)
        try:
            result = instance.query(task.query_name, task.input_json)
            return m.RespondQueryTask(query_id=task.query_id, result_json=to_json(result))
        except WorkflowQueryError as exc:
            return refuse(exc.type, str(exc))
        except Exception as exc:
            return refuse("QueryFailed", f"query {task.query_name!r} of {context.workflow_exec_id} raised "
                                         f"{type(exc).__name__}: {exc}", failure_from_exception(exc))

    def _command(self, context: WorkflowContext, payload: Any, timestamp: datetime | None = None) -> Command:
        return command(context, payload, timestamp or self.clock())

    def forget(self, exec_id: str, run_id: str) -> None:
        self._cache.pop((exec_id, run_id), None)

    # ------------------------------------------------------------ activity tasks

    async def run_activity(self, context: WorkflowContext, task: m.ActivityTask, send: Send,
                           claim: Claim | None = None, traceparent: bytes | None = None) -> bool:
        """Run one attempt unless it must not run, and send its outcome through `send`.

        It does not run when this process is running the same attempt already (a task
        delivered twice at once), nor, with `claim`, when the processor refuses the
        claim: the attempt is closed (its completion is recorded, say). The attempt
        counts as running here until its outcome was handed to `send`, so a later copy
        of its task claims after that outcome, in the same producer's order, and is
        refused. Returns whether the attempt ran.
        """
        key = (context.workflow_exec_id, context.workflow_run_id, task.activity_id, task.attempt)
        if key in self._running:
            self.duplicate_tasks += 1
            log.info("activity %s attempt %d of %s is running here already: dropped a copy of its task",
                     task.activity_id, task.attempt, context.workflow_exec_id)
            return False
        self._running.add(key)
        try:
            began = time.perf_counter()
            with tracing.activity_span(task.activity_name, task.activity_id, task.attempt, context,
                                       traceparent) as span:
                result = await self.run_activity_task(context, task, send, claim)
                if result is not None:
                    tracing.activity_outcome(span, result)
            if result is None:
                self.closed_tasks += 1
                log.info("activity %s attempt %d of %s is closed: its task was not run", task.activity_id,
                         task.attempt, context.workflow_exec_id)
                return False
            metrics.activity_ran(task.activity_name, isinstance(result.payload, m.CompleteActivityTask),
                                 time.perf_counter() - began)
            await send(result)
            return True
        finally:
            self._running.discard(key)

    async def run_activity_task(self, context: WorkflowContext, task: m.ActivityTask, send: Send,
                                claim: Claim | None = None) -> Command | None:
        """Run one attempt; a CompleteActivityTask or FailActivityTask command, or None
        when `claim` was refused (nothing ran).

        With `claim`, the start is claimed before the activity's code runs (the claim is
        the start report). Without, the start is reported when the attempt is still
        running after a moment. Heartbeats and custom task events go through `send` as
        the code makes them.
        """
        started_at = self.clock()
        claim_id = new_id() if claim is not None else None
        ids = {"activity_id": task.activity_id, "workflow_run_id": context.workflow_run_id, "attempt": task.attempt,
               "claim_id": claim_id}
        if claim is not None and not await claim(
                self._command(context, m.ReportActivityTaskStarted(**ids), started_at)):
            return None
        definition = self.activities.get(task.activity_name)
        if definition is None:
            return self._command(context, m.FailActivityTask(**ids, failure=Failure(
                type="ActivityNotRegistered",
                message=f"no activity named {task.activity_name!r} is registered on this worker; it has "
                        f"{sorted(self.activities) or 'none'}")))
        info = ActivityInfo(task.activity_id, task.activity_name, task.attempt, context.workflow_exec_id,
                            context.workflow_run_id, context.root_workflow_exec_id, context.task_queue)

        async def send_payload(payload: Any) -> None:
            if claim_id is not None and "claim_id" in type(payload).model_fields:
                payload = payload.model_copy(update={"claim_id": claim_id})  # heartbeats, custom task events
            await send(self._command(context, payload))

        token = _context.set(ActivityContext(info, send_payload))
        try:
            work = asyncio.ensure_future(_call(definition, task.input_json))
        finally:
            _context.reset(token)
        try:
            if claim is None:
                done, _ = await asyncio.wait({work}, timeout=STARTED_REPORT_AFTER)
                if not done:
                    await send(self._command(context, m.ReportActivityTaskStarted(**ids), started_at))
            timeout = task.start_to_close_timeout_ms / 1000 if task.start_to_close_timeout_ms else None
            result = await asyncio.wait_for(work, timeout)
        except asyncio.TimeoutError:
            return self._command(context, m.FailActivityTask(**ids, failure=Failure(
                type="ActivityTimeoutError", message=f"attempt {task.attempt} ran out of its start-to-close time")))
        except asyncio.CancelledError:
            work.cancel()
            raise
        except Exception as exc:
            return self._command(context, m.FailActivityTask(**ids, failure=failure_from_exception(exc)))
        try:
            result_json = to_json(result)
        except (TypeError, ValueError) as exc:
            return self._command(context, m.FailActivityTask(**ids, failure=Failure(
                type="PayloadError", message=f"the result of {task.activity_name} is not JSON-able: {exc}",
                non_retryable=True)))
        return self._command(context, m.CompleteActivityTask(**ids, result_json=result_json))


async def _call(definition: ActivityDefinition, input_json: str | None) -> Any:
    arguments = json.loads(input_json) if input_json else {}
    if isinstance(arguments, list):  # positional, as other SDKs send them
        arguments = dict(zip(definition.signature.parameters, arguments))
    kwargs = {name: validate(value, definition.param_types.get(name, Any)) for name, value in arguments.items()}
    if inspect.iscoroutinefunction(definition.fn):
        return await definition.fn(**kwargs)
    # The thread runs in a copy of this context, so activity.info() and heartbeats work there.
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(None, lambda: context.run(definition.fn, **kwargs))


def _up_to_date(instance: WorkflowInstance, history: list[Event]) -> bool:
    """True when the events of `history` the instance has not applied change nothing its
    code sees: only the events of its own decisions, its accepted task, activity
    starts... (no signal, result, timer or cancel request waits for it)."""
    if instance.unconfirmed and not _accepted(instance, history):
        return False
    for event in history:
        if event.sequence <= instance.applied_sequence:
            continue
        if event.event_type in RESOLVING:
            return False
        if (event.event_type is EventType.WORKFLOW_TASK_COMPLETED
                and event.payload.task_id != instance.last_task_id):  # type: ignore[union-attr]
            return False
    return True


def _continues(instance: WorkflowInstance, history: list[Event]) -> bool:
    """True when `history` goes on from where the cached instance stopped: its last task
    was accepted (its WORKFLOW_TASK_COMPLETED is in the new events)."""
    if instance.last_task_id is None:
        return False
    if _accepted(instance, history):
        instance.unconfirmed = False
        return True
    return False


def _accepted(instance: WorkflowInstance, history: list[Event]) -> bool:
    """Whether the first WORKFLOW_TASK_COMPLETED of `history` after the instance's last
    applied event is its last task's."""
    for event in history:
        if event.sequence > instance.applied_sequence and event.event_type is EventType.WORKFLOW_TASK_COMPLETED:
            return event.payload.task_id == instance.last_task_id  # type: ignore[union-attr]
    return False
