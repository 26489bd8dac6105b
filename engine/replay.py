"""Check workflow code against recorded histories (Temporal's replayer), for CI before a deploy.

    from treeflow.testing import Replayer

    Replayer(workflows=[OrderWorkflow]).replay(events)   # raises NonDeterminismError on a mismatch

A history is what `treeflow history ID --json` prints (one JSON event per line), a
list of `Event`s, or the events of the log (`treeflow replay --module FILE ID`). Each
run in it is replayed by a fresh instance of its workflow, exactly as a worker that
lost its cache would, and the replay fails at the first event the code does not
account for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from treeflow.schemas import Event, EventType
from treeflow.schemas import models as m

from .definitions import WorkflowDefinition, collect, workflow_definition
from .errors import NonDeterminismError
from .worker.instance import WorkflowInstance

#: The events that close a run because its code decided so (a replay must end there too).
CODE_CLOSES = {EventType.WORKFLOW_EXECUTION_COMPLETED, EventType.WORKFLOW_EXECUTION_FAILED,
               EventType.WORKFLOW_EXECUTION_CANCELED, EventType.WORKFLOW_EXECUTION_CONTINUED_AS_NEW}


@dataclass(frozen=True)
class ReplayResult:
    """The replay of one run: `error` names the first mismatch (None when the code
    accounts for every event)."""

    execution_id: str
    run_id: str
    workflow_name: str
    events: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __str__(self) -> str:
        where = f"{self.execution_id} run {self.run_id} ({self.workflow_name}, {self.events} events)"
        return f"ok        {where}" if self.ok else f"MISMATCH  {where}: {self.error}"


class Replayer:
    """Replays recorded runs against the given workflows (classes, or the workflows
    found in `modules`)."""

    def __init__(self, workflows: Iterable[type] = (), *, modules: Iterable[ModuleType] = ()) -> None:
        found, _ = collect(modules)
        self.workflows: dict[str, WorkflowDefinition] = {
            **found, **{d.name: d for d in map(workflow_definition, workflows)}}

    def replay(self, history: Iterable[Event] | str | Path, *, raise_on_failure: bool = True) -> list[ReplayResult]:
        """Replay every run in `history` (events, or the path of a JSON-lines file).

        Raises `NonDeterminismError` naming the first mismatch when `raise_on_failure`;
        otherwise returns one result per run, mismatches included.
        """
        events = list(read_history(history) if isinstance(history, (str, Path)) else history)
        results = [self._replay_run(run) for run in _runs(events)]
        if raise_on_failure:
            for result in results:
                if not result.ok:
                    raise NonDeterminismError(str(result))
        return results

    def _replay_run(self, events: list[Event]) -> ReplayResult:
        context = events[0].workflow_context
        result = {"execution_id": context.workflow_exec_id, "run_id": context.workflow_run_id,
                  "workflow_name": context.workflow_name, "events": len(events)}
        definition = self.workflows.get(context.workflow_name)
        if definition is None:
            return ReplayResult(**result, error=f"no workflow named {context.workflow_name!r} is given; "
                                                f"given: {sorted(self.workflows) or 'none'}")
        instance = WorkflowInstance(definition, context)
        try:
            decisions = instance.activate(events)
        except NonDeterminismError as error:
            return ReplayResult(**result, error=str(error))
        if instance.task_failure is not None:
            failure = instance.task_failure
            return ReplayResult(**result, error=f"the code raised {type(failure).__name__}: {failure} "
                                                "(a workflow task failure)")
        closed_by_code = events[-1].event_type in CODE_CLOSES
        leftover = [d for d in decisions if not isinstance(d, m.CancelTimer)]
        if closed_by_code and leftover:
            return ReplayResult(**result, error=(
                f"the history ends with {events[-1].event_type.value} (#{events[-1].sequence}) but the code goes on "
                f"to {type(leftover[0]).__name__}"))
        return ReplayResult(**result)


def read_history(path: str | Path) -> Iterator[Event]:
    """The events of a JSON-lines file (`treeflow history ID --json`); also accepts a
    JSON array of events."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        for item in json.loads(text):
            yield Event.model_validate(item)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield Event.model_validate_json(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not an event: {error}") from None


def _runs(events: list[Event]) -> list[list[Event]]:
    """The events grouped by (execution, run), each run's in sequence order."""
    runs: dict[tuple[str, str], list[Event]] = {}
    for event in events:
        context = event.workflow_context
        runs.setdefault((context.workflow_exec_id, context.workflow_run_id), []).append(event)
    return [sorted(run, key=lambda e: e.sequence) for run in runs.values()
            if any(e.event_type is EventType.WORKFLOW_EXECUTION_STARTED for e in run)]
