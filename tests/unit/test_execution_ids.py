"""Execution ids name one tree (README "Execution ids"): the processor's side.

Within a partition, an id held by an execution of one tree is refused to another
tree: a child start fails (WORKFLOW_ID_IN_ANOTHER_TREE), a top-level start is rejected
(WorkflowIdInAnotherTree). Across partitions, lookups decide (tests/integration/
test_execution_ids.py).
"""

from __future__ import annotations

from typing import Any

from treeflow.core import process
from treeflow.schemas import Command
from treeflow.schemas import models as m

from .test_core_properties import at


class Partition:
    def __init__(self) -> None:
        self.states: dict[str, Any] = {}
        self.count = 0

    def send(self, root: str, exec_id: str, payload: Any) -> Any:
        self.count += 1
        outcome = process(self.states, Command(command_id=f"k{self.count}", timestamp=at(self.count),
                                               root_workflow_exec_id=root, workflow_exec_id=exec_id,
                                               payload=payload))
        self.states.update(outcome.states)
        return outcome

    def start(self, root: str) -> Any:
        return self.send(root, root, m.StartWorkflowExecution(workflow_name="wf", task_queue="q"))

    def decide(self, exec_id: str, *decisions: Any) -> Any:
        s = self.states[exec_id]
        return self.send(s.context.root_workflow_exec_id, exec_id, m.CompleteWorkflowTask(
            task_id=s.workflow_task.task_id, workflow_run_id=s.context.workflow_run_id,
            history_length=s.last_sequence, decisions=list(decisions)))


def child(exec_id: str) -> m.StartChildWorkflowExecution:
    return m.StartChildWorkflowExecution(child_workflow_exec_id=exec_id, child_workflow_name="c", task_queue="q",
                                         parent_close_policy=m.ParentClosePolicy.ABANDON)


def test_a_child_id_held_by_another_tree_of_the_partition_is_refused_even_once_closed() -> None:
    p = Partition()
    p.start("a")
    p.start("b")
    p.decide("a", child("shared"))
    assert p.states["shared"].context.root_workflow_exec_id == "a"
    p.decide("shared", m.CompleteWorkflowExecution())
    assert not p.states["shared"].open
    [*_, failed] = p.decide("b", child("shared")).events
    assert failed.payload.cause == "WORKFLOW_ID_IN_ANOTHER_TREE"
    assert p.states["shared"].context.root_workflow_exec_id == "a"
    # Its own tree may start it again (a new run, the history goes on).
    p.decide("a", child("shared"))
    assert p.states["shared"].open and p.states["shared"].context.root_workflow_exec_id == "a"


def test_a_top_level_start_of_an_id_that_is_a_child_elsewhere_is_rejected() -> None:
    p = Partition()
    p.start("a")
    p.decide("a", child("x"))
    p.decide("x", m.CompleteWorkflowExecution())
    [reply] = p.start("x").replies
    assert not reply.accepted and reply.error.type == "WorkflowIdInAnotherTree"
    assert "tree of a" in reply.error.message
