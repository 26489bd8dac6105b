"""The state of one execution, as folded from its events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from types import MappingProxyType
from typing import Any, TypeVar

from treeflow.schemas import Failure, ParentClosePolicy, RetryPolicy, WorkflowContext

EMPTY: Mapping = MappingProxyType({})

S = TypeVar("S")


def updated(state: S, **changes: Any) -> S:
    """A copy of a frozen dataclass with `changes`: `dataclasses.replace` without running
    `__init__` (which costs a tenth of the processor's time otherwise)."""
    copy = object.__new__(type(state))
    copy.__dict__.update(state.__dict__)
    copy.__dict__.update(changes)
    return copy

#: How long a worker may take over a workflow task before it is given to another; it
#: doubles with each attempt (a queue no worker serves yet must not fill the history)
#: up to MAX_WORKFLOW_TASK_TIMEOUT.
WORKFLOW_TASK_TIMEOUT = timedelta(seconds=10)
MAX_WORKFLOW_TASK_TIMEOUT = timedelta(minutes=10)
#: Bound of one activity attempt when the activity sets no timeout.
DEFAULT_START_TO_CLOSE = timedelta(minutes=5)
#: How many recent command ids an execution remembers to drop a re-delivered command.
RECENT_COMMANDS = 64


class Status(str, Enum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    TERMINATED = "TERMINATED"
    TIMED_OUT = "TIMED_OUT"
    CONTINUED_AS_NEW = "CONTINUED_AS_NEW"


@dataclass(frozen=True)
class ActivityState:
    """An activity scheduled and not yet closed; `attempt` is the current attempt."""

    activity_id: str
    activity_name: str
    task_queue: str
    input_json: str | None
    retry_policy: RetryPolicy | None
    schedule_to_close_timeout_ms: int | None
    start_to_close_timeout_ms: int | None
    heartbeat_timeout_ms: int | None
    scheduled_at: datetime
    ready_at: datetime
    attempt: int = 1
    started_at: datetime | None = None
    cancel_requested: bool = False

    @property
    def attempt_bound(self) -> timedelta:
        """How long one attempt may take (start-to-close)."""
        return (timedelta(milliseconds=self.start_to_close_timeout_ms) if self.start_to_close_timeout_ms
                else DEFAULT_START_TO_CLOSE)

    def attempt_deadline(self, resumed_at: datetime | None = None) -> datetime:
        """When the current attempt times out: start-to-close, counted from its start, or
        from when it was ready if no worker reported a start; never before a full
        attempt after `resumed_at` (the processor's recovery, see `ExecutionState.resumed_at`)."""
        since = self.started_at or self.ready_at
        if resumed_at is not None and resumed_at > since:
            since = resumed_at
        return since + self.attempt_bound

    def schedule_deadline(self, resumed_at: datetime | None = None) -> datetime | None:
        """When the whole activity times out (schedule-to-close); after a recovery at
        `resumed_at`, not before one attempt's worth of time (bounded by the
        schedule-to-close itself) has passed since."""
        if self.schedule_to_close_timeout_ms is None:
            return None
        window = timedelta(milliseconds=self.schedule_to_close_timeout_ms)
        deadline = self.scheduled_at + window
        if resumed_at is not None:
            deadline = max(deadline, resumed_at + min(window, self.attempt_bound))
        return deadline


@dataclass(frozen=True)
class ChildRef:
    """A child this execution started and that has not closed (from the parent's view)."""

    workflow_name: str
    policy: ParentClosePolicy
    started: bool = False
    #: Whether its CHILD_WORKFLOW_EXECUTION_STARTED asks for a workflow task.
    wake_on_start: bool = True


@dataclass(frozen=True)
class WorkflowTaskState:
    """The workflow task the execution waits on: dispatched from `ready_at` on."""

    task_id: str
    ready_at: datetime
    attempt: int = 1

    def deadline(self, resumed_at: datetime | None = None) -> datetime:
        """When this attempt of the task times out, counted from when it was ready (or
        from `resumed_at`, the processor's recovery, when later)."""
        since = self.ready_at if resumed_at is None else max(self.ready_at, resumed_at)
        return since + min(WORKFLOW_TASK_TIMEOUT * 2 ** min(self.attempt - 1, 16), MAX_WORKFLOW_TASK_TIMEOUT)


@dataclass(frozen=True)
class ExecutionState:
    """One execution: its current run, what it waits on, and how it closed."""

    context: WorkflowContext
    status: Status
    last_sequence: int
    execution_started_at: datetime
    run_started_at: datetime
    start_command_id: str
    input_json: str | None = None
    execution_timeout_ms: int | None = None
    retry_policy: RetryPolicy | None = None
    #: The run's attempt under `retry_policy` (1 unless a failed run was retried).
    attempt: int = 1
    parent_close_policy: ParentClosePolicy | None = None
    first_sequence: int = 1
    activities: Mapping[str, ActivityState] = field(default_factory=lambda: EMPTY)
    timers: Mapping[str, datetime] = field(default_factory=lambda: EMPTY)
    children: Mapping[str, ChildRef] = field(default_factory=lambda: EMPTY)
    #: The run's accepted updates: id -> name while the handler runs, -> None once completed
    #: (kept, so that a repeated acceptance is not recorded twice).
    updates: Mapping[str, str | None] = field(default_factory=lambda: EMPTY)
    workflow_task: WorkflowTaskState | None = None
    #: Sequence of the newest event the workflow code has to see.
    last_trigger_sequence: int = 0
    cancel_requested: bool = False
    recent_commands: tuple[str, ...] = ()
    closed_at: datetime | None = None
    closed_by_command_id: str | None = None
    result_json: str | None = None
    failure: Failure | None = None
    #: The replies partition of the client that started it: its closing event goes there too.
    reply_partition: int | None = None
    #: Volatile (not folded from events): when the current attempt of each activity
    #: last heartbeated. Excluded from equality, so that state == fold(events).
    heartbeats: Mapping[str, datetime] = field(default_factory=lambda: EMPTY, compare=False)
    #: Volatile: the claim each activity's current attempt was last handed to (a
    #: worker's ReportActivityTaskStarted with a `claim_id`). A report carrying another
    #: claim is stale: that attempt was taken over by the newer claim.
    claims: Mapping[str, str] = field(default_factory=lambda: EMPTY, compare=False)
    #: Volatile: when a processor recovered this execution from the log. Activity and
    #: workflow-task timeouts count from here at the earliest (invariant 6: an outage is
    #: not time in which the work could progress); execution timeouts and timers do not.
    resumed_at: datetime | None = field(default=None, compare=False)

    @property
    def exec_id(self) -> str:
        return self.context.workflow_exec_id

    @property
    def open(self) -> bool:
        return self.status is Status.RUNNING

    @property
    def deadline(self) -> datetime | None:
        if self.execution_timeout_ms is None:
            return None
        return self.execution_started_at + timedelta(milliseconds=self.execution_timeout_ms)
