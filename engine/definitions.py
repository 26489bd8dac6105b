"""What `@workflow.define` and `@activity()` record about user code, and finding it in modules."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .options import RetryPolicy
from .payloads import Parameters

DEFAULT_TASK_QUEUE = "default"


@dataclass(frozen=True)
class WorkflowDefinition:
    name: str
    cls: type
    run_method: str
    #: The entrypoint's parameters (`self` excluded) and how an input maps onto them.
    parameters: Parameters
    return_type: Any
    execution_timeout: timedelta | None = None
    task_queue: str | None = None
    #: Handler names mapped to the methods of the class.
    signals: dict[str, str] = field(default_factory=dict)
    queries: dict[str, str] = field(default_factory=dict)
    updates: dict[str, str] = field(default_factory=dict)
    #: Update names mapped to the methods that validate them (only those that have one).
    validators: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    display_name: str | None = None
    #: Exceptions (besides treeflow's own errors) that fail the workflow when its code
    #: raises them; any other exception fails the workflow *task*, which is retried.
    failure_exception_types: tuple[type[BaseException], ...] = ()
    #: Mistral `define(...)` arguments treeflow keeps but does not act on (is_technical,
    #: enforce_determinism, on_behalf_of, search_keys, schedules).
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def param_type(self) -> Any:
        """The annotation of the entrypoint's one parameter; `dict` when it takes several,
        None when it takes none."""
        return self.parameters.single_type


@dataclass(frozen=True)
class ActivityOptions:
    retry_policy: RetryPolicy | None = None
    start_to_close_timeout: timedelta | None = None
    schedule_to_close_timeout: timedelta | None = None
    heartbeat_timeout: timedelta | None = None
    task_queue: str | None = None


class ActivityDefinition:
    """An activity: call it inside a workflow to run it durably (`await process(x)`);
    called anywhere else it is the plain function."""

    def __init__(self, fn: Callable[..., Any], name: str, options: ActivityOptions) -> None:
        if not inspect.iscoroutinefunction(fn) and not callable(fn):
            raise TypeError(f"@activity() needs a function, got {fn!r}")
        self.fn = fn
        self.name = name
        self.options = options
        self.signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        self.param_types = {name: hints.get(name, Any) for name in self.signature.parameters}
        self.return_type = hints.get("return", Any)
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .worker.instance import current_instance

        instance = current_instance()
        if instance is None:
            return self.fn(*args, **kwargs)
        return instance.schedule_activity(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<activity {self.name}>"


def workflow_definition(workflow: Any) -> WorkflowDefinition:
    definition = getattr(workflow, "__treeflow_workflow__", None)
    if not isinstance(definition, WorkflowDefinition) or getattr(workflow, "__dict__", {}).get(
            "__treeflow_workflow__") is None:
        raise TypeError(f"{workflow!r} is not a workflow: decorate its class with @workflow.define(name=...)")
    return definition


def collect(modules: Iterable[types.ModuleType]) -> tuple[dict[str, WorkflowDefinition],
                                                          dict[str, ActivityDefinition]]:
    """The workflows and activities defined at the top level of `modules`, by name."""
    workflows: dict[str, WorkflowDefinition] = {}
    activities: dict[str, ActivityDefinition] = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, ActivityDefinition):
                _register(activities, value.name, value, "activity")
            elif isinstance(value, type) and "__treeflow_workflow__" in vars(value):
                _register(workflows, value.__treeflow_workflow__.name, value.__treeflow_workflow__, "workflow")
    return workflows, activities


def _register(registry: dict[str, Any], name: str, value: Any, kind: str) -> None:
    existing = registry.get(name)
    if existing is not None and existing is not value:
        raise ValueError(f"two {kind}s are named {name!r}: names must be unique within a worker")
    registry[name] = value
