"""The workflow API: define workflows, and what workflow code may call.

Workflow code is replayed from its history, so it must be deterministic: take time,
randomness and ids from this module (`now()`, `random()`, `uuid4()`), sleep with
`asyncio.sleep` or `sleep()` (durable timers), wait with `wait_condition()`, and do
I/O only in activities.
"""

from __future__ import annotations

import asyncio
import inspect
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar, overload

from treeflow.schemas import ParentClosePolicy

from .definitions import WorkflowDefinition, workflow_definition
from .errors import ContinueAsNewError
from .options import RetryPolicy

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])

#: `should_continue_as_new()` turns true once the current run's history holds this many
#: events. Every workflow task carries the run's history, so a long run makes each task
#: (and each replay) costlier; continuing as new starts the next run with an empty one.
CONTINUE_AS_NEW_SUGGESTED_AFTER = 4096


def define(name: str | None = None, *, execution_timeout: timedelta | None = None,
           task_queue: str | None = None) -> Callable[[C], C]:
    """Class decorator: the class is a workflow named `name` (default: the class name).

    Exactly one method is marked `@entrypoint`; it takes the workflow's params (one
    argument, pydantic models and JSON-able values welcome) and returns its result.
    `execution_timeout` bounds every execution of it unless a start overrides it;
    `task_queue` is the queue its workflow tasks go to (default: the starter's).
    """

    def decorate(cls: C) -> C:
        entrypoints = [attr for attr, value in vars(cls).items() if getattr(value, "__treeflow_entrypoint__", False)]
        if len(entrypoints) != 1:
            raise TypeError(f"workflow {cls.__name__} needs exactly one @workflow.entrypoint method, "
                            f"found {len(entrypoints)}")
        run = getattr(cls, entrypoints[0])
        if not inspect.iscoroutinefunction(run):
            raise TypeError(f"{cls.__name__}.{entrypoints[0]} must be `async def`")
        hints = typing.get_type_hints(run)
        params = [p for p in inspect.signature(run).parameters.values() if p.name != "self"]
        if len(params) > 1:
            raise TypeError(f"{cls.__name__}.{entrypoints[0]} takes one params argument at most")
        signals = _handlers(cls, "__treeflow_signal__", "signal")
        queries = _handlers(cls, "__treeflow_query__", "query")
        cls.__treeflow_workflow__ = WorkflowDefinition(  # type: ignore[attr-defined]
            name=name or cls.__name__, cls=cls, run_method=entrypoints[0],
            param_type=hints.get(params[0].name, Any) if params else None,
            return_type=hints.get("return", Any), execution_timeout=execution_timeout, task_queue=task_queue,
            signals=signals, queries=queries)
        return cls

    return decorate


def entrypoint(method: F) -> F:
    """Marks the method that runs the workflow."""
    method.__treeflow_entrypoint__ = True  # type: ignore[attr-defined]
    return method


@overload
def signal(method: F, *, name: str | None = None) -> F: ...
@overload
def signal(method: None = None, *, name: str | None = None) -> Callable[[F], F]: ...


def signal(method: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Marks a method as the handler of signal `name` (default: the method's name).

    `@workflow.signal` or `@workflow.signal(name="approve")`. The handler takes no
    argument or one (the signal's payload, validated against its annotation: a
    pydantic model, a dataclass, any JSON-able type) and may be `async def` (it may then
    await activities, timers, children). Signals are durable: each is a
    WORKFLOW_EXECUTION_SIGNALED event, delivered once, in the order they were
    accepted, and again in that order on replay. Signals that arrive with the start
    are handled before the entrypoint begins. A handler that raises fails the
    workflow; a signal with no handler, or with a payload that does not fit, is
    logged and dropped.
    """
    def mark(fn: F) -> F:
        fn.__treeflow_signal__ = name or fn.__name__  # type: ignore[attr-defined]
        return fn

    return mark(method) if method is not None else mark


@overload
def query(method: F, *, name: str | None = None) -> F: ...
@overload
def query(method: None = None, *, name: str | None = None) -> Callable[[F], F]: ...


def query(method: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Marks a method as the handler of query `name` (default: the method's name).

    `@workflow.query` or `@workflow.query(name="status")`. The handler is a plain
    `def` (not async) taking no argument or one (the query's payload, validated like a
    signal's) and returns a JSON-able value. It reads the workflow's state and must
    not change it: a query appends nothing to the history, and a handler that starts
    an activity, timer or child fails the query. It sees every event of the run
    accepted before the query, signals included.
    """
    def mark(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"query handler {fn.__qualname__} must be a plain `def`: a query reads state, "
                            "it does not wait")
        fn.__treeflow_query__ = name or fn.__name__  # type: ignore[attr-defined]
        return fn

    return mark(method) if method is not None else mark


def _handlers(cls: type, marker: str, kind: str) -> dict[str, str]:
    """Handler names of `kind` defined on `cls` (and its bases), mapped to their methods."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            handler_name = getattr(value, marker, None)
            if not handler_name:
                continue
            params = [p for p in inspect.signature(value).parameters.values() if p.name != "self"]
            if len(params) > 1:
                raise TypeError(f"{kind} handler {cls.__name__}.{attr} takes one payload argument at most")
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
    return _instance().now


def random() -> float:
    """A random float in [0, 1), the same on replay."""
    return _instance().random.random()


def uuid4() -> uuid.UUID:
    """A random UUID, the same on replay."""
    return _instance().uuid4()


async def sleep(duration: timedelta | float) -> None:
    """A durable timer: the workflow resumes after `duration`, even across worker restarts."""
    await asyncio.sleep(_seconds(duration))


async def wait_condition(predicate: Callable[[], bool], *, timeout: timedelta | float | None = None) -> None:
    """Wait until `predicate()` is true.

    The predicate is evaluated now and again each time the workflow's code has run
    (after a signal handler, an activity result, a timer...), in the same order on
    replay, so it must only read workflow state. With `timeout`, a durable timer bounds
    the wait: `asyncio.TimeoutError` is raised when it fires first (the timer is
    canceled when the condition holds first).
    """
    if predicate():
        return
    future = _instance().wait_for(predicate)
    if timeout is None:
        await future
    else:
        await asyncio.wait_for(future, _seconds(timeout))


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
        policy = parent_close_policy or (ParentClosePolicy.TERMINATE if wait else ParentClosePolicy.ABANDON)
        handle = await instance.start_child(_definition(workflow), params, execution_id=execution_id,
                                            execution_timeout=execution_timeout, task_queue=task_queue,
                                            parent_close_policy=policy, retry_policy=retry_policy)
        return await handle if wait else handle
    if parent_close_policy is not None:
        raise ValueError("parent_close_policy applies to child workflows; this call is outside a workflow")
    from .client import default_client

    client = await default_client()
    return await client.execute_workflow(workflow, params, execution_id=execution_id,
                                         execution_timeout=execution_timeout, wait=wait, task_queue=task_queue,
                                         retry_policy=retry_policy)


def _definition(workflow: type | str) -> WorkflowDefinition | str:
    return workflow if isinstance(workflow, str) else workflow_definition(workflow)
