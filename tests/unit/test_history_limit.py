"""A run whose history reaches `history_limit` events is terminated by the processor
(TREEFLOW_HISTORY_LIMIT): what an open execution costs stays bounded. The termination
is recorded like any other (its parent learns of it), and the fold of the log equals the
live state (DESIGN.md §5 invariant 1)."""

from __future__ import annotations

from typing import Any

import pytest

from treeflow.core import fold
from treeflow.kafka.settings import SettingsError
from treeflow.processor.engine import PartitionEngine
from treeflow.processor.snapshots import HISTORY_LIMIT_ENV, SnapshotOptions
from treeflow.schemas import Command, EventType
from treeflow.schemas import models as m
from tests.inmemory import EPOCH

ROOT = "root"


def send(engine: PartitionEngine, log: list[Any], exec_id: str, payload: Any, n: int) -> Any:
    command = Command(command_id=f"c{n}", timestamp=EPOCH, root_workflow_exec_id=ROOT, workflow_exec_id=exec_id,
                      payload=payload)
    effects = engine.handle(command, EPOCH)
    log.extend(effects.events)
    return effects


def test_a_run_that_reaches_the_limit_is_terminated_and_its_parent_told() -> None:
    engine, log = PartitionEngine(0, history_limit=30), []
    send(engine, log, ROOT, m.StartWorkflowExecution(workflow_name="parent", task_queue="q"), 0)
    task = engine.states[ROOT].workflow_task
    send(engine, log, ROOT, m.CompleteWorkflowTask(
        task_id=task.task_id, workflow_run_id=engine.states[ROOT].context.workflow_run_id,  # type: ignore[union-attr]
        history_length=engine.states[ROOT].last_sequence,
        decisions=[m.StartChildWorkflowExecution(child_workflow_exec_id="child", child_workflow_name="child",
                                                 task_queue="q", parent_close_policy=m.ParentClosePolicy.ABANDON)]),
         1)
    n = 2
    while engine.states["child"].open:
        send(engine, log, "child", m.SignalWorkflowExecution(signal_name="tick", input_json="1"), n)
        n += 1
        assert n < 100, "the child was never terminated"
    child = [e for e in log if e.workflow_context.workflow_exec_id == "child"]
    # The limit reached, the termination is recorded after it (here one more event).
    assert len(child) == 31 and child[-1].event_type is EventType.WORKFLOW_EXECUTION_TERMINATED
    assert "TREEFLOW_HISTORY_LIMIT" in child[-1].payload.reason  # type: ignore[union-attr]
    assert engine.states[ROOT].open and "child" not in engine.states[ROOT].children
    assert any(e.event_type is EventType.CHILD_WORKFLOW_EXECUTION_TERMINATED for e in log
               if e.workflow_context.workflow_exec_id == ROOT)
    # A command to the terminated run is rejected as closed; the log folds to the live state.
    effects = send(engine, log, "child", m.SignalWorkflowExecution(signal_name="tick"), n)
    assert not effects.replies[0].accepted and effects.replies[0].error.type == "WorkflowClosed"  # type: ignore[union-attr]
    assert fold(log) == engine.states


def test_below_the_limit_nothing_is_terminated() -> None:
    engine, log = PartitionEngine(0, history_limit=1000), []
    send(engine, log, ROOT, m.StartWorkflowExecution(workflow_name="w", task_queue="q"), 0)
    for n in range(1, 200):
        send(engine, log, ROOT, m.SignalWorkflowExecution(signal_name="tick"), n)
    assert engine.states[ROOT].open and len(engine.histories[ROOT]) == len(log) < 1000


@pytest.mark.parametrize("raw", ["ten", "-5", "3", "1.5"])
def test_a_bad_history_limit_is_a_settings_error(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HISTORY_LIMIT_ENV, raw)
    with pytest.raises(SettingsError, match=HISTORY_LIMIT_ENV):
        SnapshotOptions.from_env()


def test_the_history_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HISTORY_LIMIT_ENV, "500")
    assert SnapshotOptions.from_env().history_limit == 500
    monkeypatch.delenv(HISTORY_LIMIT_ENV)
    assert SnapshotOptions.from_env().history_limit == 51_200

