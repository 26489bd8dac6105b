"""The errors treeflow raises, and their conversion to and from `Failure` records."""

from __future__ import annotations

import traceback

from treeflow.schemas import Failure


class TreeflowError(Exception):
    """Base of the errors treeflow raises.

    `exit_code` is what the `treeflow` command exits with when the error ends it (the
    table in README.md, "Errors and exit codes"): 1 failed or rejected, 2 usage or bad
    input, 3 configuration, 4 Kafka unreachable or broker error, 5 topics missing or
    reset, 6 deadline expired, 7 not found, 130 interrupted.
    """

    exit_code: int = 1


class ApplicationError(TreeflowError):
    """An error raised by user code, or rebuilt from a recorded `Failure`.

    Raise it from an activity or workflow to choose the error's `type` or to make it
    `non_retryable`. `stack_trace` holds the original traceback text when rebuilt.
    """

    def __init__(self, message: str, *, type: str | None = None, non_retryable: bool = False,
                 stack_trace: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.type = type or "ApplicationError"
        self.non_retryable = non_retryable
        self.stack_trace = stack_trace

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.type != "ApplicationError" else self.message


class WorkflowError(ApplicationError):
    """Mistral's `WorkflowError`: an `ApplicationError` raised on purpose by workflow or
    activity code (it fails the workflow, not just its task)."""


class ActivityError(TreeflowError):
    """Raised in a workflow when an activity it awaits failed for good; `cause` says why."""

    def __init__(self, activity_name: str, activity_id: str, cause: ApplicationError, reason: str = "failed") -> None:
        super().__init__(f"activity {activity_name} ({activity_id}) {reason}: {cause}")
        self.activity_name = activity_name
        self.activity_id = activity_id
        self.__cause__ = cause

    @property
    def cause(self) -> ApplicationError:
        return self.__cause__  # type: ignore[return-value]


class ChildWorkflowError(TreeflowError):
    """Raised in a parent when a child it awaits did not complete; `status` says how it ended."""

    def __init__(self, workflow_name: str, execution_id: str, status: str, cause: ApplicationError | None) -> None:
        detail = f": {cause}" if cause else ""
        super().__init__(f"child workflow {workflow_name} ({execution_id}) {status.lower()}{detail}")
        self.workflow_name = workflow_name
        self.execution_id = execution_id
        self.status = status
        self.__cause__ = cause

    @property
    def cause(self) -> ApplicationError | None:
        return self.__cause__  # type: ignore[return-value]


class WorkflowFailureError(TreeflowError):
    """Raised by a client waiting for a result when the execution did not complete."""

    def __init__(self, execution_id: str, status: str, cause: ApplicationError | None) -> None:
        detail = f": {cause}" if cause else ""
        super().__init__(f"workflow execution {execution_id} {status.lower()}{detail}")
        self.execution_id = execution_id
        self.status = status
        self.__cause__ = cause

    @property
    def cause(self) -> ApplicationError | None:
        return self.__cause__  # type: ignore[return-value]


class WorkflowAlreadyStartedError(TreeflowError):
    """An execution with this id is already running."""


class CommandRejectedError(TreeflowError):
    """The processor rejected a request (e.g. a signal to a closed execution)."""


class ExecutionNotFoundError(CommandRejectedError, LookupError):
    """No execution has this id (no event of it in the events topic, or the processor
    knows none)."""

    exit_code = 7


class ScheduleNotFoundError(CommandRejectedError, LookupError):
    """No schedule has this id (never created, or deleted)."""

    exit_code = 7


class ScheduleAlreadyExistsError(CommandRejectedError):
    """A schedule with this id exists already (delete it first, or pick another id)."""


class InvalidScheduleError(TreeflowError, ValueError):
    """A schedule spec or option that cannot work (a bad cron expression, an unknown time
    zone, an interval under a second...)."""

    exit_code = 2


#: The WORKFLOW_TASK_FAILED cause when no worker of the queue registers the workflow's name.
UNKNOWN_WORKFLOW = "UNKNOWN_WORKFLOW"


class WorkflowNotRegisteredError(TreeflowError):
    """A worker took the execution's workflow task but registers no workflow of its name.

    Raised to a caller waiting for the result after the first such workflow-task failure
    (UNKNOWN_WORKFLOW). The execution itself stays open and its workflow task is retried
    with backoff, so a worker that registers the workflow later still runs it.
    """

    def __init__(self, execution_id: str, workflow_name: str, task_queue: str, detail: str) -> None:
        super().__init__(
            f"workflow execution {execution_id} waits for a worker: {detail}. Its workflow task is retried "
            f"with backoff; start a worker that registers {workflow_name!r} on task queue {task_queue!r}, "
            f"or terminate it (treeflow terminate {execution_id})")
        self.execution_id = execution_id
        self.workflow_name = workflow_name
        self.task_queue = task_queue


class DeadlineExceededError(TreeflowError, TimeoutError):
    """A call did not get its answer within its deadline (a `TimeoutError` too)."""

    exit_code = 6


class CommandTimeoutError(DeadlineExceededError):
    """No processor answered a command (start, signal, cancel, terminate) within its deadline.

    `delivered` is True when the broker acknowledged the command: it then stays in the
    commands topic (at `partition`, `offset`) and is applied when a processor takes
    that partition, possibly after this error. The message says why no answer came
    and what a retry does.
    """

    def __init__(self, message: str, *, command_id: str, delivered: bool, partition: int | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message)
        self.command_id = command_id
        self.delivered = delivered
        self.partition = partition
        self.offset = offset


class NonDeterminismError(TreeflowError):
    """Workflow code did not do on replay what its history says it did."""


class WorkflowQueryError(TreeflowError):
    """A query got no answer. `type` says why:

    - `QueryNotFound`: the workflow has no query handler of that name;
    - `QueryFailed`: the handler raised (`cause` holds its error);
    - `WorkflowClosed` / `WorkflowNotFound`: only running executions answer queries;
    - `WorkflowNotRegistered`, `NonDeterministic`: the worker could not rebuild the
      workflow's state from its history;
    - `QueryTimeout`: no answer within the timeout (raised as `QueryTimeoutError`).
    """

    def __init__(self, message: str, type: str, cause: ApplicationError | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.exit_code = 7 if type == "WorkflowNotFound" else 1
        self.__cause__ = cause

    @property
    def cause(self) -> ApplicationError | None:
        return self.__cause__  # type: ignore[return-value]


class WorkflowUpdateError(TreeflowError):
    """An update did not complete. `type` says why:

    - `UpdateNotFound`: the workflow has no update handler of that name;
    - `UpdateRejected`: its input does not fit the handler or its validator raised
      (nothing was recorded);
    - `UpdateFailed`: the handler raised (`cause` holds its error);
    - `WorkflowClosed` / `WorkflowNotFound`: the execution is not running, or closed
      before the update completed;
    - `UpdateTimeout`: no answer within the caller's timeout.
    """

    exit_code = 1

    def __init__(self, message: str, type: str, cause: ApplicationError | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.__cause__ = cause

    @property
    def cause(self) -> ApplicationError | None:
        return self.__cause__  # type: ignore[return-value]


class QueryTimeoutError(WorkflowQueryError, TimeoutError):
    """No worker answered a query in time (none runs for the execution's task queue,
    or all are busy)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "QueryTimeout")
        self.exit_code = 6


class ContinueAsNewError(BaseException):
    """Raised by `workflow.continue_as_new()`: ends the run and starts a new run of the
    same execution with `params`. A BaseException, so `except Exception` in workflow
    code does not swallow it."""

    def __init__(self, params: object = None) -> None:
        super().__init__("continue as new")
        self.params = params


def failure_from_exception(exc: BaseException) -> Failure:
    """A `Failure` record of `exc` and its cause chain (type, message, stack)."""
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if isinstance(exc, ApplicationError):
        return Failure(type=exc.type, message=exc.message, non_retryable=exc.non_retryable,
                       stack_trace=exc.stack_trace or _stack(exc),
                       cause=failure_from_exception(cause) if cause else None)
    if isinstance(exc, (ActivityError, ChildWorkflowError, WorkflowFailureError)):
        return Failure(type=type(exc).__name__, message=str(exc), stack_trace=_stack(exc),
                       cause=failure_from_exception(exc.cause) if exc.cause else None)
    return Failure(type=type(exc).__name__, message=str(exc), stack_trace=_stack(exc),
                   cause=failure_from_exception(cause) if cause else None)


def exception_from_failure(failure: Failure) -> ApplicationError:
    """The `ApplicationError` a recorded failure stands for, with its cause chain."""
    error = ApplicationError(failure.message, type=failure.type, non_retryable=failure.non_retryable,
                             stack_trace=failure.stack_trace)
    if failure.cause:
        error.__cause__ = exception_from_failure(failure.cause)
    return error


def _stack(exc: BaseException) -> str | None:
    if exc.__traceback__ is None:
        return None
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, chain=False))
