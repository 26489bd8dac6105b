"""What a tree's events say about its executions: which are open, which closed, and how.

Pure logic, no Kafka: `TreeTracker.observe` takes a tree's events in log order.
An execution is open from the moment its parent asked for it
(START_CHILD_WORKFLOW_EXECUTION_INITIATED) or it started, until its run closes
for good. WORKFLOW_EXECUTION_CONTINUED_AS_NEW closes a run, not the execution:
its next run's WORKFLOW_EXECUTION_STARTED follows, so it stays open. An abandoned
child keeps the tree open until it closes itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from treeflow.schemas import CLOSING_STATUS, SCHEDULE_EVENTS, Event, EventType

RUNNING = "RUNNING"
#: A child its parent asked for, whose own WORKFLOW_EXECUTION_STARTED is not read yet.
PENDING = "PENDING"
#: A child that could not be started (START_CHILD_WORKFLOW_EXECUTION_FAILED).
START_FAILED = "START_FAILED"
CONTINUED_AS_NEW = CLOSING_STATUS[EventType.WORKFLOW_EXECUTION_CONTINUED_AS_NEW]
#: An execution known only as the parent of one seen (its own events were not read).
UNKNOWN = "UNKNOWN"
#: The root of a schedule's tree (README "Schedules"): the schedule itself, until it is deleted.
SCHEDULE, SCHEDULE_DELETED = "SCHEDULE", "SCHEDULE_DELETED"
#: Statuses of an execution that is still going (a continued-as-new one is about to start its next run).
OPEN_STATUSES = frozenset({RUNNING, PENDING, CONTINUED_AS_NEW, SCHEDULE})


@dataclass
class ExecutionNode:
    """One execution of the tree as its events describe it so far."""

    workflow_exec_id: str
    workflow_name: str
    parent_workflow_exec_id: str | None
    status: str = PENDING
    workflow_run_id: str | None = None
    #: Runs started (more than one after continue-as-new).
    runs: int = 0
    last_event_type: EventType | None = None
    last_sequence: int = 0
    children: list[str] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.status in OPEN_STATUSES


class TreeTracker:
    """Follows one tree's executions from its events, in log order.

    Memory grows with the tree (one small node per execution), never with the topic.
    """

    def __init__(self, root_workflow_exec_id: str) -> None:
        self.root_workflow_exec_id = root_workflow_exec_id
        #: Every execution seen, parents before their children.
        self.executions: dict[str, ExecutionNode] = {}

    @property
    def root(self) -> ExecutionNode | None:
        return self.executions.get(self.root_workflow_exec_id)

    @property
    def closed(self) -> bool:
        """True once the root has started and it and every descendant (abandoned ones too) have closed."""
        root = self.root
        return (root is not None and root.status != UNKNOWN
                and not any(node.open for node in self.executions.values()))

    def open_executions(self) -> list[str]:
        return [exec_id for exec_id, node in self.executions.items() if node.open]

    def observe(self, event: Event) -> ExecutionNode:
        """Take the tree's next event; returns the node of the execution it belongs to."""
        context = event.workflow_context
        node = self._node(context.workflow_exec_id, context.workflow_name, context.parent_workflow_exec_id)
        if node.status == UNKNOWN:
            node.status, node.workflow_name = PENDING, context.workflow_name
        node.last_event_type = event.event_type
        node.last_sequence = max(node.last_sequence, event.sequence)
        event_type = event.event_type
        payload = event.payload
        if event_type in SCHEDULE_EVENTS:
            node.status = SCHEDULE_DELETED if event_type is EventType.SCHEDULE_DELETED else SCHEDULE
        elif event_type is EventType.WORKFLOW_EXECUTION_STARTED:
            node.status = RUNNING
            node.runs += 1
            node.workflow_run_id = context.workflow_run_id
        elif event_type in CLOSING_STATUS:
            node.status = CLOSING_STATUS[event_type]
        elif event_type is EventType.START_CHILD_WORKFLOW_EXECUTION_INITIATED:
            self._node(payload.child_workflow_exec_id, payload.child_workflow_name,  # type: ignore[union-attr]
                       context.workflow_exec_id)
        elif event_type is EventType.START_CHILD_WORKFLOW_EXECUTION_FAILED:
            child = self.executions.get(payload.child_workflow_exec_id)  # type: ignore[union-attr]
            # WORKFLOW_ALREADY_RUNNING: the running one keeps its state; only a child
            # that never started is settled here.
            if child is not None and child.status == PENDING:
                child.status = START_FAILED
        return node

    def _node(self, exec_id: str, name: str, parent: str | None) -> ExecutionNode:
        node = self.executions.get(exec_id)
        if node is None:
            if parent is not None and parent not in self.executions:
                self.executions[parent] = ExecutionNode(parent, "", None, status=UNKNOWN)
            node = self.executions[exec_id] = ExecutionNode(exec_id, name, parent)
            if parent is not None:
                self.executions[parent].children.append(exec_id)
        return node
