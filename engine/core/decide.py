"""decide(view, command) -> events: what the processor appends for one command.

`view` maps execution ids to their states (at least the executions of the command's
tree). A tick examines the executions named in `due` (all of `view` by default) and
may reach any other in `view` (a parent to notify, a child to close). Ids derive from
the command id and every timestamp is `now`, the decision time the caller passes in
(the command's own timestamp when it passes none), so the same command on the same
state at the same time always yields the same events.

Why the decision time and not the command's timestamp (DESIGN §5 invariant 6): a
command's timestamp is the sender's clock when it was written; a report that waited
in the commands topic through a processor outage would start its deadlines in the
past (an activity scheduled by it would time out the moment it was scheduled).
Deadlines therefore count from when the processor decided. The event records that
time, so folding the log stays deterministic. A command decided again after a crash
(its events never became durable) gets a new decision time: nothing of the first
decision is in the log or left the processor (replies and tasks go out only once the
events are acknowledged), so no reader can see two times for one decision.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

from treeflow.schemas import (
    EVENT_TYPES,
    PAYLOAD_MODELS,
    AvroModel,
    Command,
    Event,
    Failure,
    ParentClosePolicy,
    Reply,
    WorkflowContext,
)
from treeflow.schemas import models as m

from .evolve import caused_at, evolve
from .schedules import (
    InvalidScheduleSpec,
    ScheduleState,
    describe_schedule,
    evolve_schedule,
    latest_due,
    next_fire_after,
    run_id_of,
    validate_spec,
)
from .state import ExecutionState, Status, updated

#: Namespace of the run ids derived from command ids.
RUN_ID_NAMESPACE = uuid.UUID("6f6c0b8e-7a4c-4b0e-9a57-2f1f0c3d5e11")
#: Used when an activity sets no retry policy (Temporal's defaults).
DEFAULT_RETRY = m.RetryPolicy()

CLIENT_COMMANDS = (m.StartWorkflowExecution, m.SignalWorkflowExecution, m.RequestCancelWorkflowExecution,
                   m.TerminateWorkflowExecution)


@dataclass(frozen=True)
class Query:
    """A query to hand to a worker of the execution's task queue (no event: a query
    changes nothing). `query_id` is the QueryWorkflow command's id; the answer is
    the reply to it."""

    exec_id: str
    query_id: str
    query_name: str
    input_json: str | None
    deadline: datetime | None
    #: An update's validation: the worker accepts (AcceptWorkflowUpdate) or rejects it.
    update: bool = False


@dataclass
class Outcome:
    """What one command did: events to append, replies to send, queries to hand to
    workers, and the states after."""

    events: list[Event] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    states: dict[str, ExecutionState] = field(default_factory=dict)
    queries: list[Query] = field(default_factory=list)
    #: The schedules changed (None: deleted).
    schedules: dict[str, ScheduleState | None] = field(default_factory=dict)


def decide(view: Mapping[str, ExecutionState], command: Command, due: Iterable[str] | None = None, *,
           now: datetime | None = None, schedules: Mapping[str, ScheduleState] | None = None) -> list[Event]:
    """The events `command` appends, given the executions in `view` (and the partition's
    `schedules`), decided at `now`."""
    return process(view, command, due, now=now, schedules=schedules).events


def process(view: Mapping[str, ExecutionState], command: Command, due: Iterable[str] | None = None, *,
            now: datetime | None = None, schedules: Mapping[str, ScheduleState] | None = None) -> Outcome:
    """`decide`, plus the replies and the evolved states (so callers need not fold twice).

    `now` is the decision time (the command's timestamp when None): every event's
    timestamp, and where every deadline the command sets counts from. A tick also
    examines the schedules named in `due`.
    """
    session = _Session(view, command, due, now, schedules or EMPTY_SCHEDULES)
    target: Any = view.get(command.workflow_exec_id)
    if isinstance(command.payload, SCHEDULE_COMMANDS):
        target = session.schedule(command.workflow_exec_id)
    if (target is not None and command.command_id in target.recent_commands
            and not _is_claim(command.payload)):
        # Delivered again (a crash before the offset commit, or a client retry):
        # its events are already in the log.
        if isinstance(command.payload, CLIENT_COMMANDS + SCHEDULE_COMMANDS):
            session.reply(accepted=True)
        return session.outcome
    _HANDLERS[type(command.payload)](session, command.payload)
    return session.outcome


def run_id_for(*parts: str) -> str:
    return str(uuid.uuid5(RUN_ID_NAMESPACE, ":".join(parts)))


class _Session:
    """Emits events for one command, evolving an overlay of the view as it goes."""

    def __init__(self, view: Mapping[str, ExecutionState], command: Command, due: Iterable[str] | None,
                 now: datetime | None, schedules: Mapping[str, ScheduleState] = MappingProxyType({})) -> None:
        self.view = view
        self.schedules = schedules
        self.due = due
        self.command = command
        self.now: datetime = now or command.timestamp
        self.outcome = Outcome()

    def get(self, exec_id: str) -> ExecutionState | None:
        return self.outcome.states.get(exec_id) or self.view.get(exec_id)

    def running(self, exec_id: str) -> ExecutionState | None:
        state = self.get(exec_id)
        return state if state is not None and state.open else None

    def emit(self, context: WorkflowContext, payload: AvroModel, attempt: int | None = None) -> ExecutionState:
        exec_id = context.workflow_exec_id
        previous = self.get(exec_id)
        # Built without validation: every field comes from validated models or from here.
        event = Event.model_construct(
            event_id=f"{self.command.command_id}:{len(self.outcome.events)}",
            event_type=EVENT_TYPES[type(payload)],
            timestamp=self.now,
            sequence=(previous.last_sequence if previous else 0) + 1,
            workflow_context=context,
            attempt=attempt,
            payload=payload,
        )
        state = evolve(previous, event)
        self.outcome.events.append(event)
        self.outcome.states[exec_id] = state
        return state

    def schedule(self, schedule_id: str) -> ScheduleState | None:
        if schedule_id in self.outcome.schedules:
            return self.outcome.schedules[schedule_id]
        return self.schedules.get(schedule_id)

    def emit_schedule(self, context: WorkflowContext, payload: AvroModel) -> ScheduleState | None:
        """Append a schedule's event (its own sequence; see `treeflow.core.schedules`)."""
        schedule_id = context.workflow_exec_id
        previous = self.schedule(schedule_id)
        event = Event.model_construct(
            event_id=f"{self.command.command_id}:{len(self.outcome.events)}",
            event_type=EVENT_TYPES[type(payload)], timestamp=self.now,
            sequence=(previous.last_sequence if previous else 0) + 1,
            workflow_context=context, attempt=None, payload=payload)
        state = evolve_schedule(previous, event)
        self.outcome.events.append(event)
        self.outcome.schedules[schedule_id] = state
        return state

    def emit_on(self, exec_id: str, payload: AvroModel, attempt: int | None = None) -> ExecutionState:
        state = self.get(exec_id)
        assert state is not None
        return self.emit(state.context, payload, attempt)

    def reply(self, accepted: bool, error: str | None = None, error_type: str = "CommandRejected") -> None:
        self.reply_to(self.command.command_id, accepted,
                      Failure(type=error_type, message=error, non_retryable=True) if error else None)

    def reply_to(self, command_id: str, accepted: bool, error: Failure | None = None,
                 result_json: str | None = None) -> None:
        state = self.get(self.command.workflow_exec_id)
        self.outcome.replies.append(Reply(
            command_id=command_id, timestamp=self.now,
            root_workflow_exec_id=self.command.root_workflow_exec_id,
            workflow_exec_id=self.command.workflow_exec_id, accepted=accepted,
            workflow_run_id=state.context.workflow_run_id if state else None,
            error=error, result_json=result_json))

    def reject_unless_running(self) -> ExecutionState | None:
        state = self.get(self.command.workflow_exec_id)
        if state is None:
            self.reply(False, f"workflow execution {self.command.workflow_exec_id} not found", "WorkflowNotFound")
            return None
        if not state.open:
            self.reply(False, f"workflow execution {state.exec_id} is already closed ({state.status.value})",
                       "WorkflowClosed")
            return None
        return state

    # ----------------------------------------------------------- closing

    def close(self, exec_id: str, payload: AvroModel, status: Status) -> None:
        """Close a run: record the close policy on each open child, then the closing event
        (always the run's last), then apply the policies and tell the parent."""
        state = self.get(exec_id)
        assert state is not None and state.open
        children = list(state.children.items())
        for child_id, ref in children:
            self.emit(state.context, m.ParentClosePolicyApplied(
                child_workflow_exec_id=child_id, child_workflow_name=ref.workflow_name, policy=ref.policy,
                parent_close_status=status.value))
        self.emit(state.context, payload)
        for update_id, update_name in state.updates.items():
            if update_name is not None:  # accepted, not completed: its caller must not wait forever
                self.reply_to(update_id, False, Failure(
                    type="WorkflowClosed", non_retryable=True,
                    message=f"workflow execution {exec_id} closed ({status.value}) before update {update_name!r} "
                            "completed"))
        for child_id, ref in children:
            if self.running(child_id) is None:
                continue
            if ref.policy is ParentClosePolicy.TERMINATE:
                self.close(child_id, m.WorkflowExecutionTerminated(
                    reason=f"parent {exec_id} closed ({status.value})"), Status.TERMINATED)
            elif ref.policy is ParentClosePolicy.REQUEST_CANCEL:
                self.request_cancel(child_id, f"parent {exec_id} closed ({status.value})")
        if status is not Status.CONTINUED_AS_NEW:
            self.notify_parent(exec_id, status, payload)

    def notify_parent(self, exec_id: str, status: Status, payload: Any) -> None:
        child = self.get(exec_id)
        assert child is not None
        parent_id = child.context.parent_workflow_exec_id
        parent = self.running(parent_id) if parent_id else None
        if parent is None or exec_id not in parent.children:
            return  # top-level, abandoned, or the parent closed first
        ids = {"child_workflow_exec_id": exec_id, "child_workflow_name": child.context.workflow_name}
        notice: AvroModel = {
            Status.COMPLETED: lambda: m.ChildWorkflowExecutionCompleted(**ids, result_json=payload.result_json),
            Status.FAILED: lambda: m.ChildWorkflowExecutionFailed(**ids, failure=payload.failure),
            Status.CANCELED: lambda: m.ChildWorkflowExecutionCanceled(**ids, details_json=payload.details_json),
            Status.TERMINATED: lambda: m.ChildWorkflowExecutionTerminated(**ids, reason=payload.reason),
            Status.TIMED_OUT: lambda: m.ChildWorkflowExecutionTimedOut(**ids),
        }[status]()
        self.emit(parent.context, notice)

    def request_cancel(self, exec_id: str, reason: str, identity: str | None = None) -> None:
        state = self.running(exec_id)
        if state is not None and not state.cancel_requested:
            self.emit(state.context, m.WorkflowExecutionCancelRequested(reason=reason, identity=identity))

    # ----------------------------------------------------------- activities

    def current_activity(self, payload: Any, *, claiming: bool = False) -> tuple[ExecutionState, Any] | None:
        """The execution and activity a worker report is about, if the report is current:
        the run, attempt and (unless `claiming`) the claim are the activity's latest."""
        state = self.running(self.command.workflow_exec_id)
        if state is None or state.context.workflow_run_id != payload.workflow_run_id:
            return None
        activity = state.activities.get(payload.activity_id)
        if activity is None or activity.attempt != payload.attempt or activity.cancel_requested:
            return None
        current = state.claims.get(activity.activity_id)
        if not claiming and current is not None and getattr(payload, "claim_id", None) != current:
            return None  # taken over by a newer claim: that run's report is the one that counts
        return state, activity

    def ensure_started(self, state: ExecutionState, activity: Any) -> None:
        if activity.started_at is None:
            self.emit(state.context, m.ActivityTaskStarted(activity_id=activity.activity_id,
                                                         activity_name=activity.activity_name), activity.attempt)

    def fail_attempt(self, state: ExecutionState, activity: Any, failure: Failure,
                     timeout_type: str | None = None) -> None:
        """Retry the activity by its policy, or fail it for good."""
        ids = {"activity_id": activity.activity_id, "activity_name": activity.activity_name}
        backoff = _retry_backoff(activity, failure, self.now, activity.schedule_deadline(state.resumed_at),
                                 final=timeout_type == "SCHEDULE_TO_CLOSE")
        if timeout_type is not None:
            self.emit(state.context, m.ActivityTaskTimedOut(**ids, timeout_type=timeout_type,
                                                           will_retry=backoff is not None), activity.attempt)
        if backoff is not None:
            self.emit(state.context, m.ActivityTaskRetrying(**ids, failure=failure, next_attempt=activity.attempt + 1,
                                                           backoff_ms=backoff), activity.attempt)
        elif timeout_type is None:
            self.emit(state.context, m.ActivityTaskFailed(**ids, failure=failure), activity.attempt)


def _retry_backoff(activity: Any, failure: Failure, now: datetime, deadline: datetime | None,
                   final: bool) -> int | None:
    """Milliseconds before the next attempt, or None when the activity fails for good."""
    if final:
        return None
    return retry_backoff(activity.retry_policy or DEFAULT_RETRY, activity.attempt, failure, now, deadline)


def retry_backoff(policy: m.RetryPolicy, attempt: int, failure: Failure, now: datetime,
                  deadline: datetime | None) -> int | None:
    """Milliseconds before attempt `attempt + 1` under `policy`, or None when `failure`
    ends it: not retryable, out of attempts, or the next attempt would begin after
    `deadline`."""
    if failure.non_retryable or failure.type in policy.non_retryable_error_types:
        return None
    if policy.maximum_attempts and attempt >= policy.maximum_attempts:
        return None
    maximum = policy.maximum_interval_ms or 100 * policy.initial_interval_ms
    backoff = min(int(policy.initial_interval_ms * policy.backoff_coefficient ** (attempt - 1)), maximum)
    if deadline is not None and now + timedelta(milliseconds=backoff) >= deadline:
        return None
    return backoff


# --------------------------------------------------------------- client requests

def _keyed_by_own_id(s: _Session, what: str) -> bool:
    """Whether the command's root is its own id (a top-level execution, a schedule); else
    it is rejected (InvalidArgument)."""
    if s.command.root_workflow_exec_id == s.command.workflow_exec_id:
        return True
    s.reply(False, f"{what}: {s.command.workflow_exec_id} was sent with root {s.command.root_workflow_exec_id}",
            "InvalidArgument")
    return False


def _start(s: _Session, p: m.StartWorkflowExecution) -> None:
    exec_id = s.command.workflow_exec_id
    if not _keyed_by_own_id(s, "a top-level execution is its own root"):
        return
    held = s.get(exec_id)
    if held is not None and held.context.root_workflow_exec_id != exec_id:
        # README "Execution ids": an id names one tree among the executions a partition holds.
        s.reply(False, f"execution id {exec_id} is taken by an execution of the tree of "
                       f"{held.context.root_workflow_exec_id}", "WorkflowIdInAnotherTree")
        return
    if s.schedule(exec_id) is not None:
        s.reply(False, f"execution id {exec_id} is a schedule's id", "WorkflowIdInAnotherTree")
        return
    existing = s.running(exec_id)
    if existing is not None:
        s.reply(False, f"workflow execution {exec_id} is already running (run {existing.context.workflow_run_id})",
                "WorkflowAlreadyStarted")
        return
    context = WorkflowContext(workflow_exec_id=exec_id, workflow_run_id=run_id_for(s.command.command_id),
                              workflow_name=p.workflow_name, parent_workflow_exec_id=None,
                              root_workflow_exec_id=exec_id, task_queue=p.task_queue)
    s.emit(context, m.WorkflowExecutionStarted(input_json=p.input_json, execution_timeout_ms=p.execution_timeout_ms,
                                               retry_policy=p.retry_policy, identity=p.identity,
                                               reply_partition=s.command.reply_partition))
    s.reply(True)


def _signal(s: _Session, p: m.SignalWorkflowExecution) -> None:
    state = s.reject_unless_running()
    if state is not None:
        s.emit(state.context, m.WorkflowExecutionSignaled(signal_name=p.signal_name, input_json=p.input_json,
                                                          identity=p.identity))
        s.reply(True)


def _request_cancel(s: _Session, p: m.RequestCancelWorkflowExecution) -> None:
    state = s.reject_unless_running()
    if state is not None:
        s.request_cancel(state.exec_id, p.reason, p.identity)
        s.reply(True)


def _terminate(s: _Session, p: m.TerminateWorkflowExecution) -> None:
    state = s.reject_unless_running()
    if state is not None:
        s.close(state.exec_id, m.WorkflowExecutionTerminated(reason=p.reason, identity=p.identity),
                Status.TERMINATED)
        s.reply(True)


def _query(s: _Session, p: m.QueryWorkflow) -> None:
    """A running execution's query goes to a worker; a closed or unknown one is refused
    at once (WorkflowClosed / WorkflowNotFound): queries are not answered by replaying
    a closed run."""
    state = s.reject_unless_running()
    if state is not None:
        s.outcome.queries.append(Query(exec_id=state.exec_id, query_id=s.command.command_id,
                                       query_name=p.query_name, input_json=p.input_json, deadline=p.deadline))


def _update(s: _Session, p: m.UpdateWorkflowExecution) -> None:
    """An update is validated by a worker before anything is recorded: like a query, it
    goes to the execution's task queue (marked update); the worker answers with
    AcceptWorkflowUpdate or a rejection (RespondQueryTask), which becomes the reply."""
    state = s.reject_unless_running()
    if state is not None:
        s.outcome.queries.append(Query(exec_id=state.exec_id, query_id=s.command.command_id,
                                       query_name=p.update_name, input_json=p.input_json, deadline=None,
                                       update=True))


def _accept_update(s: _Session, p: m.AcceptWorkflowUpdate) -> None:
    """A worker accepted an update: record it (its handler runs in the next workflow
    task). Accepted once: a repeated acceptance is ignored."""
    state = s.running(s.command.workflow_exec_id)
    if state is None or state.context.workflow_run_id != p.workflow_run_id:
        s.reply_to(p.update_id, False, Failure(
            type="WorkflowClosed", non_retryable=True,
            message=f"workflow execution {s.command.workflow_exec_id} closed before update {p.update_name!r} "
                    "was accepted"))
        return
    if p.update_id in state.updates:
        return
    s.emit(state.context, m.WorkflowExecutionUpdateAccepted(update_id=p.update_id, update_name=p.update_name,
                                                            input_json=p.input_json, identity=p.identity))


# --------------------------------------------------------------- worker reports

def _respond_query(s: _Session, p: m.RespondQueryTask) -> None:
    """A worker's answer to a query: passed on as the reply to the QueryWorkflow command."""
    s.reply_to(p.query_id, p.failure is None, p.failure, p.result_json)


def _complete_workflow_task(s: _Session, p: m.CompleteWorkflowTask) -> None:
    _complete_task(s, s.command.workflow_exec_id, p)


def _complete_task(s: _Session, exec_id: str, p: m.CompleteWorkflowTask) -> None:
    state = s.running(exec_id)
    if (state is None or state.context.workflow_run_id != p.workflow_run_id or state.workflow_task is None
            or state.workflow_task.task_id != p.task_id):
        return  # a stale task: superseded, timed out, or the run closed
    s.emit(state.context, m.WorkflowTaskCompleted(task_id=p.task_id, history_length=p.history_length))
    for decision in p.decisions:
        current = s.running(state.exec_id)
        if current is None or current.context.workflow_run_id != p.workflow_run_id:
            break  # nothing after a closing decision (a continue-as-new starts another run)
        _DECISIONS[type(decision)](s, state.exec_id, decision)


def _fail_workflow_task(s: _Session, p: m.FailWorkflowTask) -> None:
    state = s.running(s.command.workflow_exec_id)
    if (state is None or state.context.workflow_run_id != p.workflow_run_id or state.workflow_task is None
            or state.workflow_task.task_id != p.task_id):
        return
    s.emit(state.context, m.WorkflowTaskFailed(task_id=p.task_id, cause=p.cause, failure=p.failure))


def _is_claim(payload: Any) -> bool:
    return isinstance(payload, m.ReportActivityTaskStarted) and payload.claim_id is not None


def _activity_started(s: _Session, p: m.ReportActivityTaskStarted) -> None:
    """A start report; with a `claim_id`, a worker asking to run the attempt (invariant 5).

    A claim is granted (replied accepted) while the attempt is open, whoever held it
    before: a worker killed mid-attempt is replaced at once, and the newest claim
    becomes the one whose reports count (a report without a claim, of a run that did
    not need one, is stale then too). It is refused once the attempt is closed
    (completed, failed, timed out, superseded by a retry, canceled, or its run closed),
    so a task read again after its completion is recorded never runs. Claims are
    decided in commands-topic order, after every report written before them.
    """
    found = s.current_activity(p, claiming=True)
    if found is None:
        if p.claim_id is not None:
            s.reply(False, f"activity {p.activity_id} attempt {p.attempt} of run {p.workflow_run_id} is closed",
                    "ActivityTaskClosed")
        return
    state, activity = found
    s.ensure_started(state, activity)
    if p.claim_id is not None:
        current = s.get(state.exec_id)
        assert current is not None
        s.outcome.states[state.exec_id] = updated(
            current, claims=MappingProxyType({**current.claims, activity.activity_id: p.claim_id}))
        s.reply(True)


def _complete_activity(s: _Session, p: m.CompleteActivityTask) -> None:
    found = s.current_activity(p)
    if found is None:
        return  # late or superseded: not an event
    state, activity = found
    s.ensure_started(state, activity)
    completed = s.emit(state.context, m.ActivityTaskCompleted(
        activity_id=activity.activity_id, activity_name=activity.activity_name, result_json=p.result_json),
        activity.attempt)
    if p.continuation is not None:
        _continue_workflow_task(s, completed, p.continuation)


def _continue_workflow_task(s: _Session, state: ExecutionState, continuation: m.WorkflowTaskContinuation) -> None:
    """The decisions a worker made for `state`'s pending workflow task, on the history it
    predicted (README "Eager continuations"): taken only when that is the task's history.
    The run's last event is the one the worker predicted, and the task was caused by an
    event after those the code had seen: so every event since is one the worker
    predicted (any other would have moved the last one on; its own last task, unrecorded,
    would still be pending), and the code saw exactly these events, as a replay of the log
    will. Not once the run's deadline is reached: its tick times it out, as it would
    before a dispatched task came back."""
    task = state.workflow_task
    if (task is None or caused_at(task.task_id) <= continuation.seen_length
            or state.last_sequence != continuation.history_length
            or (state.deadline is not None and state.deadline <= s.now)):
        return  # the task is dispatched as usual
    _complete_task(s, state.exec_id, m.CompleteWorkflowTask(
        task_id=task.task_id, workflow_run_id=state.context.workflow_run_id,
        history_length=continuation.history_length, decisions=continuation.decisions))


def _fail_activity(s: _Session, p: m.FailActivityTask) -> None:
    found = s.current_activity(p)
    if found is not None:
        state, activity = found
        s.ensure_started(state, activity)
        s.fail_attempt(s.get(state.exec_id), activity, p.failure)  # type: ignore[arg-type]


def _heartbeat(s: _Session, p: m.RecordActivityHeartbeat) -> None:
    found = s.current_activity(p)
    if found is not None:
        state, activity = found
        heartbeats = dict(state.heartbeats)
        heartbeats[activity.activity_id] = s.now
        s.outcome.states[state.exec_id] = updated(state, heartbeats=heartbeats)


def _custom_task_event(s: _Session, p: m.RecordCustomTaskEvent) -> None:
    found = s.current_activity(p)
    model = PAYLOAD_MODELS.get(p.event_type)
    if found is None or model is None or not p.event_type.value.startswith("CUSTOM_TASK_"):
        return
    state, activity = found
    fields: dict[str, Any] = {"custom_task_id": p.custom_task_id, "custom_task_type": p.custom_task_type,
                              "activity_id": activity.activity_id, "payload": p.payload}
    if "failure" in model.model_fields:
        fields["failure"] = p.failure
    s.emit(state.context, model(**fields), activity.attempt)


def _tick(s: _Session, p: m.Tick) -> None:
    """Fire what is due at `now` among the executions named due (and the schedules)."""
    for schedule_id in sorted(s.schedules if s.due is None else s.due):
        if s.schedule(schedule_id) is not None:
            _tick_schedule(s, schedule_id)
    for exec_id in sorted(s.view if s.due is None else s.due):
        state = s.running(exec_id)
        if state is None:
            continue
        deadline = state.deadline
        if deadline is not None and deadline <= s.now:  # wall clock: an outage counts
            s.close(exec_id, m.WorkflowExecutionTimedOut(execution_timeout_ms=state.execution_timeout_ms),
                    Status.TIMED_OUT)
            continue
        for timer_id, fire_at in sorted(state.timers.items(), key=lambda item: (item[1], item[0])):
            if fire_at <= s.now:
                s.emit(state.context, m.TimerFired(timer_id=timer_id))
        for activity_id in sorted(state.activities):
            current = s.get(exec_id)
            activity = current.activities[activity_id]  # type: ignore[union-attr]
            schedule_deadline = activity.schedule_deadline(current.resumed_at)  # type: ignore[union-attr]
            if schedule_deadline is not None and schedule_deadline <= s.now:
                s.fail_attempt(current, activity, _timeout_failure("SCHEDULE_TO_CLOSE", activity),  # type: ignore[arg-type]
                               "SCHEDULE_TO_CLOSE")
            elif activity.attempt_deadline(current.resumed_at) <= s.now:  # type: ignore[union-attr]
                s.fail_attempt(current, activity, _timeout_failure("START_TO_CLOSE", activity),  # type: ignore[arg-type]
                               "START_TO_CLOSE")
            elif _heartbeat_deadline(current, activity) <= s.now:  # type: ignore[arg-type]
                s.fail_attempt(current, activity, _timeout_failure("HEARTBEAT", activity),  # type: ignore[arg-type]
                               "HEARTBEAT")
        current = s.running(exec_id)
        if (current is not None and current.workflow_task is not None
                and current.workflow_task.deadline(current.resumed_at) <= s.now):
            s.emit(current.context, m.WorkflowTaskTimedOut(task_id=current.workflow_task.task_id,
                                                          timeout_type="START_TO_CLOSE"))


NEVER = datetime.max.replace(tzinfo=timezone.utc)


def _heartbeat_deadline(state: ExecutionState, activity: Any) -> datetime:
    if activity.heartbeat_timeout_ms is None or activity.started_at is None:
        return NEVER
    last = max(state.heartbeats.get(activity.activity_id, activity.started_at), activity.started_at)
    if state.resumed_at is not None:
        last = max(last, state.resumed_at)  # heartbeats are not events: the fold cannot know the last one
    return last + timedelta(milliseconds=activity.heartbeat_timeout_ms)


def _timeout_failure(timeout_type: str, activity: Any) -> Failure:
    return Failure(type="ActivityTimeoutError",
                   message=f"activity {activity.activity_name} ({activity.activity_id}) attempt {activity.attempt} "
                           f"timed out ({timeout_type})")


# --------------------------------------------------------------- decisions

def _schedule_activity(s: _Session, exec_id: str, d: m.ScheduleActivityTask) -> None:
    state = s.get(exec_id)
    assert state is not None
    if d.activity_id in state.activities:
        return
    s.emit(state.context, m.ActivityTaskScheduled(
        activity_id=d.activity_id, activity_name=d.activity_name, task_queue=d.task_queue or state.context.task_queue,
        input_json=d.input_json, retry_policy=d.retry_policy, schedule_to_close_timeout_ms=d.schedule_to_close_timeout_ms,
        start_to_close_timeout_ms=d.start_to_close_timeout_ms, heartbeat_timeout_ms=d.heartbeat_timeout_ms))


def _start_timer(s: _Session, exec_id: str, d: m.StartTimer) -> None:
    s.emit_on(exec_id, m.TimerStarted(timer_id=d.timer_id, duration_ms=d.duration_ms,
                                      fire_at=s.now + timedelta(milliseconds=d.duration_ms)))


def _cancel_timer(s: _Session, exec_id: str, d: m.CancelTimer) -> None:
    if d.timer_id in s.get(exec_id).timers:  # type: ignore[union-attr]
        s.emit_on(exec_id, m.TimerCanceled(timer_id=d.timer_id))


def _request_cancel_activity(s: _Session, exec_id: str, d: m.RequestCancelActivityTask) -> None:
    activity = s.get(exec_id).activities.get(d.activity_id)  # type: ignore[union-attr]
    if activity is None:
        return
    ids = {"activity_id": activity.activity_id, "activity_name": activity.activity_name}
    s.emit_on(exec_id, m.ActivityTaskCancelRequested(**ids), activity.attempt)
    # The workflow stops waiting at once; a result the attempt still reports is ignored.
    s.emit_on(exec_id, m.ActivityTaskCanceled(**ids), activity.attempt)


def _start_child(s: _Session, exec_id: str, d: m.StartChildWorkflowExecution) -> None:
    parent = s.get(exec_id)
    assert parent is not None
    s.emit(parent.context, m.StartChildWorkflowExecutionInitiated(
        child_workflow_exec_id=d.child_workflow_exec_id, child_workflow_name=d.child_workflow_name,
        task_queue=d.task_queue, input_json=d.input_json, parent_close_policy=d.parent_close_policy,
        execution_timeout_ms=d.execution_timeout_ms, retry_policy=d.retry_policy, wake_on_start=d.wake_on_start))
    ids = {"child_workflow_exec_id": d.child_workflow_exec_id, "child_workflow_name": d.child_workflow_name}
    if s.running(d.child_workflow_exec_id) is not None:
        s.emit(parent.context, m.StartChildWorkflowExecutionFailed(**ids, cause="WORKFLOW_ALREADY_RUNNING"))
        return
    held = s.get(d.child_workflow_exec_id)
    if held is not None and held.context.root_workflow_exec_id != parent.context.root_workflow_exec_id:
        s.emit(parent.context, m.StartChildWorkflowExecutionFailed(**ids, cause="WORKFLOW_ID_IN_ANOTHER_TREE"))
        return
    child_context = WorkflowContext(
        workflow_exec_id=d.child_workflow_exec_id,
        workflow_run_id=run_id_for(s.command.command_id, d.child_workflow_exec_id),
        workflow_name=d.child_workflow_name, parent_workflow_exec_id=exec_id,
        root_workflow_exec_id=parent.context.root_workflow_exec_id, task_queue=d.task_queue)
    s.emit(child_context, m.WorkflowExecutionStarted(
        input_json=d.input_json, execution_timeout_ms=d.execution_timeout_ms, retry_policy=d.retry_policy,
        parent_close_policy=d.parent_close_policy, parent_workflow_run_id=parent.context.workflow_run_id))
    s.emit(s.get(exec_id).context, m.ChildWorkflowExecutionStarted(  # type: ignore[union-attr]
        **ids, child_workflow_run_id=child_context.workflow_run_id))
    if d.first_task is not None:  # eager child start
        _continue_workflow_task(s, s.get(d.child_workflow_exec_id), d.first_task)  # type: ignore[arg-type]


def _request_cancel_child(s: _Session, exec_id: str, d: m.RequestCancelChildWorkflowExecution) -> None:
    ref = s.get(exec_id).children.get(d.child_workflow_exec_id)  # type: ignore[union-attr]
    if ref is None:
        return
    s.emit_on(exec_id, m.ChildWorkflowExecutionCancelRequested(child_workflow_exec_id=d.child_workflow_exec_id,
                                                               child_workflow_name=ref.workflow_name))
    s.request_cancel(d.child_workflow_exec_id, f"parent {exec_id} asked")


def _complete_update(s: _Session, exec_id: str, d: m.CompleteWorkflowUpdate) -> None:
    """An update's handler finished: record it and answer its caller (the reply to the
    UpdateWorkflowExecution command)."""
    name = s.get(exec_id).updates.get(d.update_id)  # type: ignore[union-attr]
    if name is None:
        return  # not accepted in this run, or already completed
    s.emit_on(exec_id, m.WorkflowExecutionUpdateCompleted(update_id=d.update_id, update_name=name,
                                                          result_json=d.result_json, failure=d.failure))
    error = None
    if d.failure is not None:
        error = Failure(type="UpdateFailed", message=f"update {name!r} failed: {d.failure.message}",
                        non_retryable=True, cause=d.failure)
    s.reply_to(d.update_id, d.failure is None, error, d.result_json)


def _signal_external(s: _Session, exec_id: str, d: m.SignalExternalWorkflowExecution) -> None:
    """A workflow signals another execution of its tree (a child, by its handle): both
    histories record it in the same decision, so the sender learns it was delivered."""
    target = s.running(d.target_workflow_exec_id)
    sender = s.get(exec_id)
    assert sender is not None
    delivered = target is not None and target.context.root_workflow_exec_id == sender.context.root_workflow_exec_id
    if delivered:
        s.emit(target.context, m.WorkflowExecutionSignaled(  # type: ignore[union-attr]
            signal_name=d.signal_name, input_json=d.input_json, identity=f"workflow {exec_id}"))
    s.emit_on(exec_id, m.ExternalWorkflowExecutionSignaled(
        target_workflow_exec_id=d.target_workflow_exec_id, signal_name=d.signal_name, input_json=d.input_json,
        delivered=delivered))


def _record_marker(s: _Session, exec_id: str, d: m.RecordMarker) -> None:
    s.emit_on(exec_id, m.MarkerRecorded(marker_name=d.marker_name, marker_id=d.marker_id, deprecated=d.deprecated,
                                        details_json=d.details_json))


def _record_workflow_custom_task(s: _Session, exec_id: str, d: m.RecordWorkflowCustomTask) -> None:
    model = PAYLOAD_MODELS.get(d.event_type)
    if model is None or not d.event_type.value.startswith("CUSTOM_TASK_"):
        return
    fields: dict[str, Any] = {"custom_task_id": d.custom_task_id, "custom_task_type": d.custom_task_type,
                              "payload": d.payload}
    if "failure" in model.model_fields:
        fields["failure"] = d.failure
    s.emit_on(exec_id, model(**fields))


def _complete(s: _Session, exec_id: str, d: m.CompleteWorkflowExecution) -> None:
    parent_id = s.get(exec_id).context.parent_workflow_exec_id  # type: ignore[union-attr]
    s.close(exec_id, m.WorkflowExecutionCompleted(result_json=d.result_json), Status.COMPLETED)
    if d.parent_continuation is not None and parent_id and (parent := s.running(parent_id)) is not None:
        _continue_workflow_task(s, parent, d.parent_continuation)


def _fail(s: _Session, exec_id: str, d: m.FailWorkflowExecution) -> None:
    state = s.get(exec_id)
    assert state is not None
    backoff = None
    if state.retry_policy is not None and not state.cancel_requested:
        backoff = retry_backoff(state.retry_policy, state.attempt, d.failure, s.now, state.deadline)
    if backoff is None:
        s.close(exec_id, m.WorkflowExecutionFailed(failure=d.failure), Status.FAILED)
        return
    # Retried: the run ends like a continue-as-new carrying the failure (the parent
    # hears of the execution only when its last attempt closes), and a new run of
    # the same id starts from the same input after the backoff.
    _next_run(s, state, "retry", state.input_json, failure=d.failure, backoff_ms=backoff, attempt=state.attempt + 1)


def _cancel(s: _Session, exec_id: str, d: m.CancelWorkflowExecution) -> None:
    s.close(exec_id, m.WorkflowExecutionCanceled(details_json=d.details_json), Status.CANCELED)


def _continue_as_new(s: _Session, exec_id: str, d: m.ContinueAsNewWorkflowExecution) -> None:
    state = s.get(exec_id)
    assert state is not None
    _next_run(s, state, "continue-as-new", d.input_json)


def _next_run(s: _Session, state: ExecutionState, why: str, input_json: str | None, *,
              failure: Failure | None = None, backoff_ms: int | None = None, attempt: int | None = None) -> None:
    """Close the current run (CONTINUED_AS_NEW, its children get their close policy) and
    start the next run of the same execution."""
    new_run = run_id_for(s.command.command_id, state.exec_id, why)
    s.close(state.exec_id, m.WorkflowExecutionContinuedAsNew(new_workflow_run_id=new_run, input_json=input_json,
                                                             failure=failure), Status.CONTINUED_AS_NEW)
    s.emit(state.context.model_copy(update={"workflow_run_id": new_run}), m.WorkflowExecutionStarted(
        input_json=input_json, execution_timeout_ms=state.execution_timeout_ms, retry_policy=state.retry_policy,
        parent_close_policy=state.parent_close_policy, continued_from_run_id=state.context.workflow_run_id,
        first_workflow_task_backoff_ms=backoff_ms, reply_partition=state.reply_partition), attempt=attempt)


# --------------------------------------------------------------- schedules
#
# A schedule lives on the partition of its id, and so do its runs: each run is a
# top-level execution (no parent) of the schedule's tree (root: the schedule id), so
# the overlap policy reads whether the previous run is open from this partition's view,
# and a tick's run start and its SCHEDULE_FIRED are one decision. README "Schedules".

def _schedule_context(schedule_id: str, action: m.ScheduleAction) -> WorkflowContext:
    return WorkflowContext(workflow_exec_id=schedule_id, workflow_run_id=run_id_for("schedule", schedule_id),
                           workflow_name=action.workflow_name, parent_workflow_exec_id=None,
                           root_workflow_exec_id=schedule_id, task_queue=action.task_queue)


def _schedule_or_reject(s: _Session) -> ScheduleState | None:
    state = s.schedule(s.command.workflow_exec_id)
    if state is None:
        s.reply(False, f"schedule {s.command.workflow_exec_id} not found", "ScheduleNotFound")
    return state


def _create_schedule(s: _Session, p: m.CreateSchedule) -> None:
    schedule_id = s.command.workflow_exec_id
    if not _keyed_by_own_id(s, "a schedule is keyed by its own id"):
        return
    if s.schedule(schedule_id) is not None:
        s.reply(False, f"schedule {schedule_id} already exists", "ScheduleAlreadyExists")
        return
    held = s.get(schedule_id)
    if held is not None:
        s.reply(False, f"schedule id {schedule_id} is taken by an execution of the tree of "
                       f"{held.context.root_workflow_exec_id}", "WorkflowIdInAnotherTree")
        return
    try:
        validate_spec(p.spec)
    except InvalidScheduleSpec as exc:
        s.reply(False, str(exc), "InvalidArgument")
        return
    s.emit_schedule(_schedule_context(schedule_id, p.action), m.ScheduleCreated(
        spec=p.spec, action=p.action, overlap=p.overlap, catchup_window_ms=p.catchup_window_ms, paused=p.paused,
        note=p.note, identity=p.identity, next_fire_at=next_fire_after(p.spec, s.now)))
    s.reply(True)


def _pause_schedule(s: _Session, p: m.PauseSchedule) -> None:
    state = _schedule_or_reject(s)
    if state is not None:
        if not state.paused:
            s.emit_schedule(state.context, m.SchedulePaused(note=p.note, identity=p.identity))
        s.reply(True)


def _resume_schedule(s: _Session, p: m.ResumeSchedule) -> None:
    """Resumed, the schedule's next tick is the first after now: ticks due while it was
    paused do not fire."""
    state = _schedule_or_reject(s)
    if state is not None:
        if state.paused:
            s.emit_schedule(state.context, m.ScheduleResumed(note=p.note, identity=p.identity,
                                                             next_fire_at=next_fire_after(state.spec, s.now)))
        s.reply(True)


def _delete_schedule(s: _Session, p: m.DeleteSchedule) -> None:
    state = _schedule_or_reject(s)
    if state is not None:
        s.emit_schedule(state.context, m.ScheduleDeleted(identity=p.identity))
        s.reply(True)


def _trigger_schedule(s: _Session, p: m.TriggerSchedule) -> None:
    """Run now (paused or not): a tick at the decision time, under the schedule's overlap
    policy unless the command names one; the reply's result_json says what it did."""
    state = _schedule_or_reject(s)
    if state is not None:
        outcome = _schedule_action(s, state, s.now, "TRIGGERED", 0, p.overlap or state.overlap, state.next_fire_at)
        s.reply_to(s.command.command_id, True, result_json=json.dumps(outcome))


def _describe_schedule(s: _Session, p: m.DescribeSchedule) -> None:
    state = _schedule_or_reject(s)
    if state is not None:
        s.reply_to(s.command.command_id, True, result_json=json.dumps(describe_schedule(state)))


def _list_schedules(s: _Session, p: m.ListSchedules) -> None:
    found = [describe_schedule(state, future=1) for _, state in sorted(s.schedules.items())
             if p.workflow_name is None or state.action.workflow_name == p.workflow_name]
    s.reply_to(s.command.command_id, True, result_json=json.dumps(found))


def _run_open(s: _Session, state: ScheduleState) -> bool:
    return any(s.running(run.workflow_exec_id) is not None for run in state.recent_runs)


def _tick_schedule(s: _Session, schedule_id: str) -> None:
    """Decide a schedule at `now`: a buffered tick whose previous run closed starts; a due
    tick fires, or is skipped or buffered by the overlap policy. After an outage only the
    most recent due tick is decided (the others count as `missed`), and not at all when
    it is older than the catch-up window."""
    state = s.schedule(schedule_id)
    assert state is not None
    if state.paused:
        return
    if state.buffered is not None and not _run_open(s, state):
        nominal, _ = state.buffered
        _schedule_action(s, state, nominal, "BUFFERED", 0, m.ScheduleOverlapPolicy.ALLOW_ALL, state.next_fire_at)
        state = s.schedule(schedule_id)
        assert state is not None
    due_at = state.due_at()
    if state.next_fire_at is None or due_at is None or due_at > s.now:
        return
    nominal, missed = latest_due(state.spec, state.next_fire_at, s.now)
    following = next_fire_after(state.spec, nominal)
    if s.now - nominal > timedelta(milliseconds=state.catchup_window_ms + state.spec.jitter_ms):
        s.emit_schedule(state.context, m.ScheduleSkipped(nominal_time=nominal, reason="CATCHUP_WINDOW",
                                                         missed=missed, next_fire_at=following))
        return
    _schedule_action(s, state, nominal, "SCHEDULED", missed, state.overlap, following)


def _schedule_action(s: _Session, state: ScheduleState, nominal: datetime, trigger: str, missed: int,
                     overlap: m.ScheduleOverlapPolicy, following: datetime | None) -> dict[str, Any]:
    """Start the run of the tick at `nominal` (or skip or buffer it); what happened, as JSON."""
    ids = {"nominal_time": nominal, "missed": missed, "next_fire_at": following}
    if trigger != "BUFFERED" and overlap is not m.ScheduleOverlapPolicy.ALLOW_ALL and _run_open(s, state):
        if overlap is m.ScheduleOverlapPolicy.BUFFER_ONE and state.buffered is None:
            s.emit_schedule(state.context, m.ScheduleBuffered(**ids, trigger=trigger))
            return {"action": "BUFFERED", "nominal_time": nominal.isoformat()}
        s.emit_schedule(state.context, m.ScheduleSkipped(**ids, reason="OVERLAP"))
        return {"action": "SKIPPED", "reason": "OVERLAP", "nominal_time": nominal.isoformat()}
    exec_id = run_id_of(state.schedule_id, nominal)
    held = s.get(exec_id)
    if held is not None and held.context.root_workflow_exec_id != state.schedule_id:
        s.emit_schedule(state.context, m.ScheduleSkipped(**ids, reason="ALREADY_STARTED"))
        return {"action": "SKIPPED", "reason": "ALREADY_STARTED", "execution_id": exec_id}
    if held is None:
        # The run first, its SCHEDULE_FIRED after: a tick decided again after a crash that
        # left only the run in the log finds the id used and records the firing alone.
        action = state.action
        s.emit(WorkflowContext(workflow_exec_id=exec_id, workflow_run_id=run_id_for("schedule", exec_id),
                               workflow_name=action.workflow_name, parent_workflow_exec_id=None,
                               root_workflow_exec_id=state.schedule_id, task_queue=action.task_queue),
               m.WorkflowExecutionStarted(input_json=action.input_json,
                                          execution_timeout_ms=action.execution_timeout_ms,
                                          retry_policy=action.retry_policy, identity=f"schedule {state.schedule_id}"))
        held = s.get(exec_id)
        assert held is not None
    s.emit_schedule(state.context, m.ScheduleFired(**ids, workflow_exec_id=exec_id,
                                                   workflow_run_id=held.context.workflow_run_id, trigger=trigger))
    return {"action": "STARTED", "execution_id": exec_id, "run_id": held.context.workflow_run_id,
            "nominal_time": nominal.isoformat()}


SCHEDULE_COMMANDS = (m.CreateSchedule, m.PauseSchedule, m.ResumeSchedule, m.TriggerSchedule, m.DeleteSchedule)
EMPTY_SCHEDULES: Mapping[str, ScheduleState] = MappingProxyType({})


_HANDLERS: dict[type, Callable[[_Session, Any], None]] = {
    m.StartWorkflowExecution: _start,
    m.SignalWorkflowExecution: _signal,
    m.RequestCancelWorkflowExecution: _request_cancel,
    m.TerminateWorkflowExecution: _terminate,
    m.QueryWorkflow: _query,
    m.RespondQueryTask: _respond_query,
    m.CompleteWorkflowTask: _complete_workflow_task,
    m.FailWorkflowTask: _fail_workflow_task,
    m.ReportActivityTaskStarted: _activity_started,
    m.CompleteActivityTask: _complete_activity,
    m.FailActivityTask: _fail_activity,
    m.RecordActivityHeartbeat: _heartbeat,
    m.RecordCustomTaskEvent: _custom_task_event,
    m.Tick: _tick,
    m.UpdateWorkflowExecution: _update,
    m.AcceptWorkflowUpdate: _accept_update,
    m.CreateSchedule: _create_schedule,
    m.PauseSchedule: _pause_schedule,
    m.ResumeSchedule: _resume_schedule,
    m.TriggerSchedule: _trigger_schedule,
    m.DeleteSchedule: _delete_schedule,
    m.DescribeSchedule: _describe_schedule,
    m.ListSchedules: _list_schedules,
}

_DECISIONS: dict[type, Callable[[_Session, str, Any], None]] = {
    m.ScheduleActivityTask: _schedule_activity,
    m.StartTimer: _start_timer,
    m.CancelTimer: _cancel_timer,
    m.RequestCancelActivityTask: _request_cancel_activity,
    m.StartChildWorkflowExecution: _start_child,
    m.RequestCancelChildWorkflowExecution: _request_cancel_child,
    m.CompleteWorkflowExecution: _complete,
    m.FailWorkflowExecution: _fail,
    m.CancelWorkflowExecution: _cancel,
    m.ContinueAsNewWorkflowExecution: _continue_as_new,
    m.CompleteWorkflowUpdate: _complete_update,
    m.RecordMarker: _record_marker,
    m.SignalExternalWorkflowExecution: _signal_external,
    m.RecordWorkflowCustomTask: _record_workflow_custom_task,
}
