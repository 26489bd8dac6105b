"""The functional core: `decide(view, command) -> events` and `evolve(state, event) -> state`.

Pure Python: no Kafka, no faust, no clock, no randomness. Every id and timestamp in
a decision comes from the command, so deciding the same command on the same state
always yields the same events.
"""

from .decide import Outcome, Query, decide, process
from .evolve import evolve, fold
from .state import ActivityState, ChildRef, ExecutionState, Status, WorkflowTaskState
from .work import WorkItem, next_due, pending_work

__all__ = [
    "ActivityState", "ChildRef", "ExecutionState", "Outcome", "Query", "Status", "WorkItem", "WorkflowTaskState",
    "decide", "evolve", "fold", "next_due", "pending_work", "process",
]
