"""What every visibility backend must do, checked the same way on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from treeflow.consumers.visibility import ExecutionQuery, ExecutionUpdate, VisibilityStore
from treeflow.schemas import Event, EventType, Failure
from treeflow.schemas import models as m
from tests.samples import context

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
TOPIC = "p.events"


class Log:
    """Events of made-up executions, with the offsets they would have in one partition."""

    def __init__(self, partition: int = 0) -> None:
        self.partition = partition
        self.offset = 0
        self.sequences: dict[str, int] = {}

    def event(self, exec_id: str, root: str, payload: object, event_type: EventType, *, parent: str | None = None,
              name: str = "wf", at: timedelta = timedelta(), attempt: int | None = None,
              restart: bool = False) -> ExecutionUpdate:
        sequence = 1 if restart else self.sequences.get(exec_id, 0) + 1
        self.sequences[exec_id] = sequence
        event = Event(event_id=f"{exec_id}:{sequence}:{self.offset}", event_type=event_type, timestamp=T0 + at,
                      sequence=sequence, workflow_context=context(exec_id, root, parent, name), attempt=attempt,
                      payload=payload)
        update = ExecutionUpdate.of(event, self.partition, self.offset)
        self.offset += 1
        return update

    def started(self, exec_id: str, root: str, **kw: object) -> ExecutionUpdate:
        return self.event(exec_id, root, m.WorkflowExecutionStarted(), EventType.WORKFLOW_EXECUTION_STARTED, **kw)

    def task(self, exec_id: str, root: str, **kw: object) -> ExecutionUpdate:
        return self.event(exec_id, root, m.WorkflowTaskCompleted(task_id="t", history_length=1),
                          EventType.WORKFLOW_TASK_COMPLETED, **kw)

    def completed(self, exec_id: str, root: str, **kw: object) -> ExecutionUpdate:
        return self.event(exec_id, root, m.WorkflowExecutionCompleted(result_json='"ok"'),
                          EventType.WORKFLOW_EXECUTION_COMPLETED, **kw)


async def check_backend(store: VisibilityStore) -> None:
    log = Log()
    root_start = log.started("r1", "r1", name="parent", at=timedelta(seconds=0))
    child_start = log.started("r1.c", "r1", parent="r1", name="child", at=timedelta(seconds=1))
    child_done = log.completed("r1.c", "r1", parent="r1", name="child", at=timedelta(seconds=2))
    other = log.started("r2", "r2", name="parent", at=timedelta(seconds=10))
    failed = log.event("r2", "r2", m.WorkflowExecutionFailed(failure=Failure(type="ValueError", message="bad")),
                       EventType.WORKFLOW_EXECUTION_FAILED, name="parent", at=timedelta(seconds=11))
    await store.apply([root_start, child_start], {(TOPIC, 0): 2})
    await store.apply([child_done, other, failed], {(TOPIC, 0): 5})

    everything = await store.list(ExecutionQuery())
    assert [r.execution_id for r in everything] == ["r2", "r1.c", "r1"]  # newest start first
    child = await store.get("r1.c")
    assert child is not None
    assert (child.status, child.parent_execution_id, child.root_execution_id, child.workflow_name) == (
        "COMPLETED", "r1", "r1", "child")
    assert child.start_time == T0 + timedelta(seconds=1) and child.close_time == T0 + timedelta(seconds=2)
    assert (child.last_sequence, child.last_event_type, child.partition, child.offset) == (
        2, "WORKFLOW_EXECUTION_COMPLETED", 0, 2)
    bad = await store.get("r2")
    assert bad is not None and bad.status == "FAILED" and bad.close_reason == "ValueError: bad"
    assert bad.failure_json is not None and '"message":"bad"' in bad.failure_json
    assert await store.get("nope") is None

    # Redelivered and older events change nothing.
    await store.apply([root_start, child_start, child_done, failed], {(TOPIC, 0): 3})
    assert await store.list(ExecutionQuery()) == everything
    assert (await store.positions(TOPIC))[0] == {0: 5}  # never lowered

    # Filters, alone and together, and count.
    async def ids(**filters: object) -> list[str]:
        query = ExecutionQuery.of(**filters)  # type: ignore[arg-type]
        found = [r.execution_id for r in await store.list(query)]
        assert await store.count(query) == len(found) or "limit" in filters
        return found

    assert await ids(status="RUNNING") == ["r1"]
    assert await ids(status="completed,failed") == ["r2", "r1.c"]
    assert await ids(status=["open"]) == ["r1"]
    assert await ids(status="closed") == ["r2", "r1.c"]
    assert await ids(workflow_name="parent") == ["r2", "r1"]
    assert await ids(root_execution_id="r1") == ["r1.c", "r1"]
    assert await ids(parent_execution_id="r1") == ["r1.c"]
    assert await ids(since=T0 + timedelta(seconds=1)) == ["r2", "r1.c"]
    assert await ids(workflow_name="parent", status="RUNNING") == ["r1"]
    assert await ids(workflow_name="nobody") == []
    assert await ids(limit=1) == ["r2"]
    assert await store.count(ExecutionQuery.of(limit=1)) == 3

    # A later event of the root: its status stays, its last event moves on.
    task = log.task("r1", "r1", name="parent", at=timedelta(seconds=20))
    await store.apply([task], {(TOPIC, 0): 6})
    root = await store.get("r1")
    assert root is not None and (root.status, root.last_sequence, root.start_time) == ("RUNNING", 2, T0)

    # Continue-as-new: a new run of the same execution keeps the first start time.
    can = log.event("r1", "r1", m.WorkflowExecutionContinuedAsNew(new_workflow_run_id="run-2"),
                    EventType.WORKFLOW_EXECUTION_CONTINUED_AS_NEW, name="parent", at=timedelta(seconds=21))
    next_run = log.event("r1", "r1", m.WorkflowExecutionStarted(continued_from_run_id="run-r1"),
                         EventType.WORKFLOW_EXECUTION_STARTED, name="parent", at=timedelta(seconds=22))
    await store.apply([can], {})
    root = await store.get("r1")
    assert root is not None and root.status == "CONTINUED_AS_NEW" and root.close_reason == \
        "continued as new in run run-2"
    await store.apply([next_run], {})
    root = await store.get("r1")
    assert root is not None and (root.status, root.start_time, root.close_time, root.close_reason) == (
        "RUNNING", T0, None, None)

    # An id used again (the processor forgot the first execution): sequence 1 later in the log starts over.
    again = log.started("r2", "r2", name="parent", at=timedelta(seconds=30), restart=True)
    await store.apply([again], {})
    reused = await store.get("r2")
    assert reused is not None and (reused.status, reused.start_time, reused.close_time, reused.last_sequence) == (
        "RUNNING", T0 + timedelta(seconds=30), None, 1)
    await store.apply([other], {})  # the first execution's start, redelivered: older in the log
    assert await store.get("r2") == reused

    # Positions are per topic and partition.
    await store.apply([], {(TOPIC, 3): 9, ("q.events", 0): 1})
    positions, applied_at = await store.positions(TOPIC)
    assert positions == {0: 6, 3: 9} and applied_at is not None
