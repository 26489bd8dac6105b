"""The workflow API: define workflows, and what workflow code may call.

Workflow code is replayed from its history, so it must be deterministic: take time,
randomness and ids from this module (`now()`, `random()`, `uuid4()`), sleep with
`asyncio.sleep` or `sleep()` (durable timers), wait with `wait_condition()`, and do
I/O only in activities.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import typing
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from random import Random
from typing import Any, NoReturn, TypeVar, overload

from treeflow.schemas import ParentClosePolicy

from .definitions import WorkflowDefinition, workflow_definition
from .errors import ContinueAsNewError
from .options import RetryPolicy, resolve_parent_close_policy
from .payloads import Parameters

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])
G = TypeVar("G", bound=Callable[..., Any])

#: `should_continue_as_new()` turns true once the current run's history holds this many
#: events. Every workflow task carries the run's history, so a long run makes each task
#: (and each replay) costlier; continuing as new starts the next run with an empty one.
CONTINUE_AS_NEW_SUGGESTED_AFTER = 4096


#: An execution's bound when neither its start nor its `define()` sets one (Mistral's default).
DEFAULT_EXECUTION_TIMEOUT = timedelta(hours=1)
_UNSET: Any = object()


def define(name: str | None = None, workflow_description: str | None = None, schedules: list[Any] | None = None,
           workflow_display_name: str | None = None, is_technical: bool = False,
           enforce_determinism: bool | None = None, execution_timeout: timedelta | None = _UNSET,
           on_behalf_of: bool = False, search_keys: list[str] | None = None, *, task_queue: str | None = None,
           failure_exception_types: Iterable[type[BaseException]] = ()) -> Callable[[C], C]:
    """Class decorator: the class is a workflow named `name` (default: the class name).

    The arguments are Mistral's, in Mistral's order. Exactly one method is marked
    `@entrypoint`; its parameters take the workflow's input (see
    `treeflow.payloads.Parameters` for how a JSON input maps onto several), and it
    returns the result. `execution_timeout` bounds every execution started from this
    class unless the start overrides it: 1 hour by default (Mistral's), `None` for no
    bound. `task_queue` is the queue its workflow tasks go to (default: the starter's).
    `workflow_description` and `workflow_display_name` are kept on the definition;
    `schedules`, `is_technical`, `enforce_determinism`, `on_behalf_of` and `search_keys`
    are kept in `metadata` and not acted on.

    A treeflow error raised by the workflow's code (`ApplicationError`,
    `ActivityError`, `ChildWorkflowError`, ...) fails the workflow; any other
    exception fails the workflow *task*, which is retried with backoff, so a fix can
    be deployed while the execution waits (Temporal's and Mistral's rule). List
    exception classes in `failure_exception_types` to make them fail the workflow too
    (`[Exception]` for all).
    """
    timeout = DEFAULT_EXECUTION_TIMEOUT if execution_timeout is _UNSET else execution_timeout
    metadata = {key: value for key, value in (
        ("schedules", schedules), ("is_technical", is_technical), ("enforce_determinism", enforce_determinism),
        ("on_behalf_of", on_behalf_of), ("search_keys", search_keys)) if value}

    def decorate(cls: C) -> C:
        if not isinstance(cls, type):
            raise TypeError(f"@workflow.define decorates a class, got {cls!r}")
        entrypoints = [attr for attr, value in vars(cls).items() if getattr(value, "__treeflow_entrypoint__", False)]
        if len(entrypoints) != 1:
            raise TypeError(f"workflow {cls.__name__} needs exactly one @workflow.entrypoint method, "
                            f"found {len(entrypoints)}")
        run = getattr(cls, entrypoints[0])
        if not inspect.iscoroutinefunction(run):
            raise TypeError(f"{cls.__name__}.{entrypoints[0]} must be `async def`")
        hints = typing.get_type_hints(run)
        updates = _handlers(cls, "__treeflow_update__")
        validators = {update: validator for update, method in updates.items()
                      if (validator := getattr(getattr(cls, method), "__treeflow_validator__", None))}
        cls.__treeflow_workflow__ = WorkflowDefinition(  # type: ignore[attr-defined]
            name=name or cls.__name__, cls=cls, run_method=entrypoints[0], parameters=Parameters.of(run),
            return_type=hints.get("return", Any), execution_timeout=timeout, task_queue=task_queue,
            signals=_handlers(cls, "__treeflow_signal__"), queries=_handlers(cls, "__treeflow_query__"),
            updates=updates, validators=validators, description=workflow_description,
            display_name=workflow_display_name, failure_exception_types=tuple(failure_exception_types),
            metadata=metadata)
        return cls

    return decorate


def entrypoint(method: F) -> F:
    """Marks the method that runs the workflow."""
    method.__treeflow_entrypoint__ = True  # type: ignore[attr-defined]
    return method


def _marker(marker: str, method: F | str | None, name: str | None,
            check: Callable[[F], None] | None = None) -> F | Callable[[F], F]:
    """`@decorator`, `@decorator()`, `@decorator("name")` and `@decorator(name="name")`."""
    if isinstance(method, str):
        method, name = None, method

    def mark(fn: F) -> F:
        if check is not None:
            check(fn)
        setattr(fn, marker, name or fn.__name__)
        return fn

    return mark(method) if method is not None else mark


@overload
def signal(method: F, *, name: str | None = None, description: str | None = None) -> F: ...
@overload
def signal(method: str | None = None, *, name: str | None = None,
           description: str | None = None) -> Callable[[F], F]: ...


def signal(method: F | str | None = None, *, name: str | None = None,
           description: str | None = None) -> F | Callable[[F], F]:
    """Marks a method as the handler of signal `name` (default: the method's name).

    `@workflow.signal`, `@workflow.signal()` or `@workflow.signal(name="approve")`. The
    handler takes any parameters; the signal's payload maps onto them as the raw value of
    a single one or a JSON object of them by name (`treeflow.payloads.Parameters`),
    validated against their annotations. It may be `async def` (it may then await
    activities, timers, children). Signals are durable: each is a
    WORKFLOW_EXECUTION_SIGNALED event, delivered once, in the order they were
    accepted, and again in that order on replay. Signals that arrive with the start
    are handled before the entrypoint begins. A handler that raises fails the
    workflow; a signal with no handler, or with a payload that does not fit, is
    logged and dropped.
    """
    return _marker("__treeflow_signal__", method, name)


def _plain_def(fn: Callable[..., Any]) -> None:
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"query handler {fn.__qualname__} must be a plain `def`: a query reads state, "
                        "it does not wait")


@overload
def query(method: F, *, name: str | None = None, description: str | None = None) -> F: ...
@overload
def query(method: str | None = None, *, name: str | None = None,
          description: str | None = None) -> Callable[[F], F]: ...


def query(method: F | str | None = None, *, name: str | None = None,
          description: str | None = None) -> F | Callable[[F], F]:
    """Marks a method as the handler of query `name` (default: the method's name).

    `@workflow.query` or `@workflow.query(name="status")`. The handler is a plain
    `def` (not async) taking any parameters (the payload maps onto them as a signal's
    does) and returns a JSON-able value. It reads the workflow's state and must
    not change it: a query appends nothing to the history, and a handler that starts
    an activity, timer or child fails the query. It sees every event of the run
    accepted before the query, signals included.
    """
    return _marker("__treeflow_query__", method, name, _plain_def)


@overload
def update(method: F, *, name: str | None = None, description: str | None = None) -> F: ...
@overload
def update(method: str | None = None, *, name: str | None = None,
           description: str | None = None) -> Callable[[F], F]: ...


def update(method: F | str | None = None, *, name: str | None = None,
           description: str | None = None) -> F | Callable[[F], F]:
    """Marks a method as the handler of update `name` (default: the method's name).

    An update is a signal that answers: `handle.update(name, ...)` waits for the
    handler's return value (or its error). The handler takes parameters as a signal
    handler does and may be `async def` and await activities, timers and children.

        @workflow.update(name="add_item")
        async def add_item(self, item: str, qty: int = 1) -> int: ...

        @add_item.validator
        def check_item(self, item: str, qty: int = 1) -> None:
            if qty < 1:
                raise ValueError("qty must be positive")

    The optional validator (a plain `def` with the handler's parameters) runs on the
    workflow's current state before anything is recorded: when it raises, the caller
    gets the error and the history is unchanged. An accepted update is recorded
    (WORKFLOW_EXECUTION_UPDATE_ACCEPTED), its handler runs like a signal's, in history
    order and again on replay, and its outcome is recorded
    (WORKFLOW_EXECUTION_UPDATE_COMPLETED, with the result or the failure). A handler
    that raises fails the update, not the workflow.
    """
    def attach(fn: F) -> None:
        def validator(check: G) -> G:
            _plain_def(check)
            fn.__treeflow_validator__ = check.__name__  # type: ignore[attr-defined]
            return check
        fn.validator = validator  # type: ignore[attr-defined]

    return _marker("__treeflow_update__", method, name, attach)


def _handlers(cls: type, marker: str) -> dict[str, str]:
    """Handler names marked with `marker` on `cls` (and its bases), mapped to their methods."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            handler_name = getattr(value, marker, None)
            if handler_name:
                found[handler_name] = attr
    return found


@dataclass(frozen=True)
class Info:
    """Where the running workflow sits."""

    workflow_exec_id: str
    workflow_run_id: str
    workflow_name: str
    parent_workflow_exec_id: str | None
    root_workflow_exec_id: str
    task_queue: str


def in_workflow() -> bool:
    """True inside workflow code."""
    from .worker.instance import current_instance

    return current_instance() is not None


def _instance() -> Any:
    from .worker.instance import current_instance

    instance = current_instance()
    if instance is None:
        raise RuntimeError("this call works only inside workflow code")
    return instance


def info() -> Info:
    context = _instance().context
    return Info(context.workflow_exec_id, context.workflow_run_id, context.workflow_name,
                context.parent_workflow_exec_id, context.root_workflow_exec_id, context.task_queue)


def now() -> datetime:
    """The workflow's current time: the time of the newest event it has seen (same on replay)."""
    instance = _instance()
    instance.now_read = True
    return instance.now


def random() -> Random:
    """The workflow's deterministic `random.Random` (Mistral's and Temporal's): seeded
    from the run, so the same draws come out on replay. `workflow.random().random()`
    is a float in [0, 1)."""
    return _instance().random


def get_execution_id() -> str | None:
    """The running workflow's execution id; None outside workflow code (Mistral's)."""
    from .worker.instance import current_instance

    instance = current_instance()
    return instance.context.workflow_exec_id if instance is not None else None


def uuid4() -> uuid.UUID:
    """A random UUID, the same on replay."""
    return _instance().uuid4()


async def sleep(duration: timedelta | float, *, summary: str | None = None) -> None:
    """A durable timer: the workflow resumes after `duration`, even across worker restarts.
    (`summary`, Mistral's timer label, is accepted and not recorded.)"""
    await asyncio.sleep(_seconds(duration))


async def wait_condition(predicate: Callable[[], bool], timeout: timedelta | float | None = None,
                         timeout_summary: str | None = None) -> None:
    """Wait until `predicate()` is true.

    The predicate is evaluated now and again each time the workflow's code has run
    (after a signal handler, an activity result, a timer...), in the same order on
    replay, so it must only read workflow state. With `timeout`, a durable timer bounds
    the wait: `asyncio.TimeoutError` is raised when it fires first (the timer is
    canceled when the condition holds first). `timeout_summary` (Mistral's timer label)
    is accepted and not recorded.
    """
    if predicate():
        return
    future = _instance().wait_for(predicate)
    if timeout is None:
        await future
    else:
        await asyncio.wait_for(future, _seconds(timeout))


def patched(patch_id: str) -> bool:
    """Temporal's versioning: guard changed workflow code so that executions that
    started under the old code replay deterministically.

        if workflow.patched("send-receipt"):
            await send_receipt(order)      # the new code
        # else: what the old code did (here: nothing)

    Returns True when the code decides anew (new executions, and running ones past
    their recorded history), recording a MARKER_RECORDED event ("version",
    `patch_id`); on replay it returns True iff the replayed workflow task recorded that
    marker, so histories written by the old code take the old branch. The first answer
    holds for the rest of the run. Once no execution that predates the patch is running,
    replace the call with `deprecate_patch(patch_id)` and drop the old branch.
    """
    return _instance().patched(patch_id)


def deprecate_patch(patch_id: str) -> None:
    """Mark `patch_id` as fully deployed: the old branch is gone. Histories recorded with
    or without the patch's marker replay; new executions record a deprecated marker.
    Remove the call once no execution recorded before it is running."""
    _instance().patched(patch_id, deprecated=True)


def continue_as_new(params: Any = None) -> NoReturn:
    """End this run and start a new run of the same execution with `params` as its input.

    Raises `ContinueAsNewError`, which ends the run (let it propagate; it is a
    BaseException, so `except Exception` does not catch it). The execution keeps its
    id; the new run gets a new `workflow_run_id` and a fresh history, after a
    WORKFLOW_EXECUTION_CONTINUED_AS_NEW event. The run's open children get their
    parent close policy as at any close. A client waiting for the result gets the
    result of the last run.
    """
    _instance()
    raise ContinueAsNewError(params)


def should_continue_as_new() -> bool:
    """True once the current run's history holds `CONTINUE_AS_NEW_SUGGESTED_AFTER` (4,096)
    events or more: a good moment to `continue_as_new()`. Deterministic (it counts the
    events the code has seen)."""
    return _instance().run_length >= CONTINUE_AS_NEW_SUGGESTED_AFTER


def _seconds(duration: timedelta | float) -> float:
    return duration.total_seconds() if isinstance(duration, timedelta) else float(duration)


async def execute_workflow(
    workflow: type | str,
    params: Any = None,
    *,
    execution_id: str | None = None,
    execution_timeout: timedelta | None = None,
    wait: bool = True,
    task_queue: str | None = None,
    parent_close_policy: ParentClosePolicy | None = None,
    retry_policy: RetryPolicy | None = None,
) -> Any:
    """Run a workflow: a child of the current one inside workflow code, a top-level
    execution (through the default client) anywhere else.

    With `wait=True` (default) it returns the workflow's result, or raises
    `ChildWorkflowError` / `WorkflowFailureError` carrying the cause. With
    `wait=False` it returns a handle as soon as the execution has started;
    `await handle` gives the result later.

    Inside a workflow, `parent_close_policy` says what happens to the child when
    this workflow closes first: TERMINATE by default with `wait=True`, ABANDON by
    default with `wait=False`.
    """
    from .worker.instance import current_instance

    instance = current_instance()
    if instance is not None:
        policy = resolve_parent_close_policy(parent_close_policy, wait)
        # Awaiting only the result, the code needs no task of its own for the child's start.
        handle = await instance.start_child(_definition(workflow), params, execution_id=execution_id,
                                            execution_timeout=execution_timeout, task_queue=task_queue,
                                            parent_close_policy=policy, retry_policy=retry_policy,
                                            wake_on_start=not wait)
        return await handle if wait else handle
    if parent_close_policy not in (None, ParentClosePolicy.UNSPECIFIED):
        raise ValueError("parent_close_policy applies to child workflows; this call is outside a workflow")
    from .client import default_client

    client = await default_client()
    return await client.execute_workflow(workflow, params, execution_id=execution_id,
                                         execution_timeout=execution_timeout, wait=wait, task_queue=task_queue,
                                         retry_policy=retry_policy)


def _definition(workflow: type | str) -> WorkflowDefinition | str:
    return workflow if isinstance(workflow, str) else workflow_definition(workflow)


class unsafe:  # noqa: N801 - Mistral's (and Temporal's) name
    """Mistral's `workflow.unsafe`: treeflow runs workflow code without a sandbox, so
    both context managers do nothing (imports inside them are ordinary imports)."""

    @staticmethod
    @contextlib.contextmanager
    def imports_passed_through() -> Iterator[None]:
        yield

    @staticmethod
    @contextlib.contextmanager
    def skip_determinism_enforcement() -> Iterator[None]:
        yield
