"""treeflow: a durable workflow engine for Python whose source of truth is a keyed Kafka topic.

The user-facing surface mirrors the Mistral Workflows SDK (itself on Temporal):

    import treeflow as workflows

    @workflows.activity()
    async def process_item(value: str) -> str: ...

    @workflows.workflow.define(name="child_workflow")
    class ChildWorkflow:
        @workflows.workflow.entrypoint
        async def run(self, params: ChildInput) -> str:
            return await process_item(params.value)

    result = await workflows.execute_workflow(ChildWorkflow, params=ChildInput(value="x"))

Subpackages: `treeflow.schemas` (the event contract), `treeflow.kafka` (brokers,
topics, partitioning), `treeflow.consumers` (the consumer library), `treeflow.core`
(the pure decider), `treeflow.processor`, `treeflow.worker`, `treeflow.testing`.
"""

from treeflow.schemas import ParentClosePolicy

from . import workflow
from .activities import Task, activity, activity_heartbeat, task, task_from
from .client import Client, ExecutionDescription, WorkflowHandle, connect
from .errors import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    CommandRejectedError,
    ContinueAsNewError,
    QueryTimeoutError,
    TreeflowError,
    WorkflowAlreadyStartedError,
    WorkflowError,
    WorkflowFailureError,
    WorkflowQueryError,
    WorkflowUpdateError,
)
from .options import RetryPolicy
from .schedules import (
    ScheduleDescription,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
)
from .workflow import execute_workflow, get_execution_id

__version__ = "0.1.0"

__all__ = [
    "ScheduleDescription", "ScheduleHandle", "ScheduleIntervalSpec", "ScheduleOverlapPolicy", "SchedulePolicy",
    "ScheduleSpec",
    "ActivityError", "ApplicationError", "ChildWorkflowError", "Client", "CommandRejectedError",
    "ContinueAsNewError", "ExecutionDescription", "ParentClosePolicy", "QueryTimeoutError", "RetryPolicy",
    "TreeflowError", "WorkflowAlreadyStartedError", "WorkflowError", "WorkflowFailureError", "WorkflowHandle", "WorkflowQueryError", "WorkflowUpdateError",
    "Task", "__version__", "activity", "activity_heartbeat", "task", "task_from", "connect", "execute_workflow", "get_execution_id", "workflow",
]
