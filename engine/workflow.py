"""The workflow API: define workflows, and what workflow code may call.

Workflow code is replayed from its history, so it must be deterministic: take time,
randomness and ids from this module (`now()`, `random()`, `uuid4()`), sleep with
`asyncio.sleep` or `sleep()` (durable timers), and do I/O only in activities.
"""

from __future__ import annotations

import asyncio
import inspect
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from treeflow.schemas import ParentClosePolicy

from .definitions import WorkflowDefinition, workflow_definition
from .options import RetryPolicy

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


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
        signals = {getattr(v, "__treeflow_signal__"): attr for attr, v in vars(cls).items()
                   if getattr(v, "__treeflow_signal__", None)}
        queries = {getattr(v, "__treeflow_query__"): attr for attr, v in vars(cls).items()
                   if getattr(v, "__treeflow_query__", None)}
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
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    await asyncio.sleep(seconds)


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
