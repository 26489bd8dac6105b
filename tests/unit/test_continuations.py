"""The processor's rule for a worker's continuation (README "Eager continuations"): the
decisions are taken as the workflow task the completion causes only when that task's
history is exactly the one the worker predicted; the log then folds to the live state."""

from __future__ import annotations

from typing import Any

from treeflow.core import fold
from treeflow.processor.engine import PartitionEngine
from treeflow.schemas import Command, EventType
from treeflow.schemas import models as m
from tests.inmemory import EPOCH

ROOT = "root"
STEP = m.ScheduleActivityTask(activity_id="a1", activity_name="step", task_queue="q", eager=True)
DONE = m.CompleteWorkflowExecution(result_json='"done"')


class Run:
    """One top-level run on one partition, driven by commands, with its log."""

    def __init__(self) -> None:
        self.engine = PartitionEngine(0)
        self.log: list[Any] = []
        self.sent = 0
        self.send(m.StartWorkflowExecution(workflow_name="flow", task_queue="q"))

    @property
    def state(self) -> Any:
        return self.engine.states[ROOT]

    def send(self, payload: Any) -> Any:
        self.sent += 1
        command = Command(command_id=f"c{self.sent}", timestamp=EPOCH, root_workflow_exec_id=ROOT,
                          workflow_exec_id=ROOT, payload=payload)
        effects = self.engine.handle(command, EPOCH)
        self.log.extend(effects.events)
        return effects

    def schedule_step(self) -> int:
        """The first task schedules the activity eagerly; the history length it saw."""
        seen = self.state.last_sequence
        self.send(m.CompleteWorkflowTask(task_id=self.state.workflow_task.task_id,
                                         workflow_run_id=self.state.context.workflow_run_id,
                                         history_length=seen, decisions=[STEP]))
        return seen

    def complete_step(self, continuation: m.WorkflowTaskContinuation | None) -> Any:
        return self.send(m.CompleteActivityTask(activity_id="a1", workflow_run_id=self.state.context.workflow_run_id,
                                                attempt=1, result_json='"ok"', continuation=continuation))


def predicted(seen: int) -> m.WorkflowTaskContinuation:
    # The task's completion, the activity's scheduling, start and completion.
    return m.WorkflowTaskContinuation(seen_length=seen, history_length=seen + 4, decisions=[DONE])


def test_a_continuation_on_the_predicted_history_is_the_task_the_completion_causes() -> None:
    run = Run()
    effects = run.complete_step(predicted(run.schedule_step()))
    assert [e.event_type for e in effects.events] == [
        EventType.ACTIVITY_TASK_STARTED, EventType.ACTIVITY_TASK_COMPLETED, EventType.WORKFLOW_TASK_COMPLETED,
        EventType.WORKFLOW_EXECUTION_COMPLETED]
    assert effects.events[2].payload.history_length == effects.events[1].sequence
    assert not [d for d in effects.dispatches if d.item.kind == "workflow"]  # the task never travels
    assert not run.state.open and run.state.result_json == '"done"'
    assert fold(run.log) == run.engine.states


def test_a_continuation_is_dropped_when_the_run_heard_more() -> None:
    run = Run()
    seen = run.schedule_step()
    run.send(m.SignalWorkflowExecution(signal_name="note", input_json='"hello"'))
    effects = run.complete_step(predicted(seen))
    assert [e.event_type for e in effects.events] == [EventType.ACTIVITY_TASK_STARTED,
                                                       EventType.ACTIVITY_TASK_COMPLETED]
    # The task the signal caused (dispatched then) goes on as usual, with both events to see.
    assert run.state.open and run.state.workflow_task is not None
    assert fold(run.log) == run.engine.states


def test_a_continuation_is_dropped_when_its_history_length_is_not_the_runs() -> None:
    run = Run()
    seen = run.schedule_step()
    effects = run.complete_step(m.WorkflowTaskContinuation(seen_length=seen, history_length=seen + 3,
                                                           decisions=[DONE]))
    assert EventType.WORKFLOW_TASK_COMPLETED not in [e.event_type for e in effects.events]
    assert run.state.open and [d.item.kind for d in effects.dispatches] == ["workflow"]


def test_a_signal_before_the_task_completion_shifts_the_prediction() -> None:
    """A signal recorded after what the worker's task saw and before its completion: the
    worker's prediction (from what it saw) ends one event short, and is dropped."""
    run = Run()
    seen = run.state.last_sequence
    run.send(m.SignalWorkflowExecution(signal_name="note"))
    run.send(m.CompleteWorkflowTask(task_id=run.state.workflow_task.task_id,
                                    workflow_run_id=run.state.context.workflow_run_id,
                                    history_length=seen, decisions=[STEP]))  # saw only the start
    effects = run.complete_step(predicted(seen))
    assert EventType.WORKFLOW_TASK_COMPLETED not in [e.event_type for e in effects.events]
    assert run.state.open and run.state.workflow_task is not None
    assert fold(run.log) == run.engine.states
