"""The main job until the engine runs workflows: write two sample trees of events
to the events topic and print them back, decoded and grouped by tree."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from aiokafka import AIOKafkaProducer

from treeflow.consumers import ConsumedEvent, EventReader
from treeflow.kafka import KafkaSettings, ensure_topics, partition_for
from treeflow.schemas import (
    CLOSING_STATUS,
    EVENT_TYPES,
    EVENTS,
    ActivityTaskCompleted,
    ActivityTaskScheduled,
    ActivityTaskStarted,
    AvroModel,
    ChildWorkflowExecutionCompleted,
    ChildWorkflowExecutionStarted,
    Event,
    Failure,
    ParentClosePolicy,
    ParentClosePolicyApplied,
    StartChildWorkflowExecutionInitiated,
    WorkflowContext,
    WorkflowExecutionCompleted,
    WorkflowExecutionFailed,
    WorkflowExecutionStarted,
    WorkflowExecutionTerminated,
)


@dataclass
class TreeWriter:
    """Appends events to executions of one tree with per-execution sequences."""

    root: str
    clock: datetime
    events: list[Event] = field(default_factory=list)
    contexts: dict[str, WorkflowContext] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def open(self, exec_id: str, name: str, parent: str | None = None) -> str:
        self.contexts[exec_id] = WorkflowContext(
            workflow_exec_id=exec_id, workflow_run_id=str(uuid.uuid4()), workflow_name=name,
            parent_workflow_exec_id=parent, root_workflow_exec_id=self.root, task_queue="default")
        return exec_id

    def add(self, exec_id: str, payload: AvroModel, attempt: int | None = None) -> None:
        self.sequences[exec_id] += 1
        self.clock += timedelta(milliseconds=3)
        self.events.append(Event(
            event_id=f"{exec_id}:{self.sequences[exec_id]}", event_type=EVENT_TYPES[type(payload)],
            timestamp=self.clock, sequence=self.sequences[exec_id],
            workflow_context=self.contexts[exec_id], attempt=attempt, payload=payload))


def run_activity(tree: TreeWriter, exec_id: str, activity: str, value: str) -> str:
    result = f"processed:{value}"
    tree.add(exec_id, ActivityTaskScheduled(activity_id="1", activity_name=activity, task_queue="default",
                                            input_json=json.dumps([value])))
    tree.add(exec_id, ActivityTaskStarted(activity_id="1", activity_name=activity), attempt=1)
    tree.add(exec_id, ActivityTaskCompleted(activity_id="1", activity_name=activity,
                                            result_json=json.dumps(result)), attempt=1)
    return result


def sample_trees(run: str, now: datetime) -> list[list[Event]]:
    """Two trees: the seed's parent -> child -> activity, and a failing parent whose
    TERMINATE child is terminated while its ABANDON child runs on."""
    seed = TreeWriter(root=f"parent-{run}", clock=now)
    parent = seed.open(seed.root, "parent_workflow")
    child = seed.open(f"{parent}.child-1", "child_workflow", parent)
    seed.add(parent, WorkflowExecutionStarted(input_json='{"data": "hello"}'))
    seed.add(parent, StartChildWorkflowExecutionInitiated(
        child_workflow_exec_id=child, child_workflow_name="child_workflow", task_queue="default",
        input_json='{"value": "hello"}', parent_close_policy=ParentClosePolicy.TERMINATE))
    seed.add(child, WorkflowExecutionStarted(input_json='{"value": "hello"}', parent_workflow_run_id=
                                             seed.contexts[parent].workflow_run_id,
                                             parent_close_policy=ParentClosePolicy.TERMINATE))
    seed.add(parent, ChildWorkflowExecutionStarted(child_workflow_exec_id=child, child_workflow_name="child_workflow",
                                                   child_workflow_run_id=seed.contexts[child].workflow_run_id))
    result = run_activity(seed, child, "process_item", "hello")
    seed.add(child, WorkflowExecutionCompleted(result_json=json.dumps(result)))
    seed.add(parent, ChildWorkflowExecutionCompleted(child_workflow_exec_id=child, child_workflow_name="child_workflow",
                                                     result_json=json.dumps(result)))
    seed.add(parent, WorkflowExecutionCompleted(result_json=json.dumps(f"Parent got: {result}")))

    fan = TreeWriter(root=f"batch-{run}", clock=now)
    root = fan.open(fan.root, "batch_workflow")
    fan.add(root, WorkflowExecutionStarted(input_json='{"items": 2}'))
    for index, policy in ((1, ParentClosePolicy.TERMINATE), (2, ParentClosePolicy.ABANDON)):
        kid = fan.open(f"{root}.item-{index}", "item_workflow", root)
        fan.add(root, StartChildWorkflowExecutionInitiated(
            child_workflow_exec_id=kid, child_workflow_name="item_workflow", task_queue="default",
            input_json=json.dumps({"item": index}), parent_close_policy=policy))
        fan.add(kid, WorkflowExecutionStarted(input_json=json.dumps({"item": index}), parent_close_policy=policy))
        fan.add(root, ChildWorkflowExecutionStarted(child_workflow_exec_id=kid, child_workflow_name="item_workflow",
                                                    child_workflow_run_id=fan.contexts[kid].workflow_run_id))
    # The close-policy actions are recorded just before the closing event, which is
    # always the last event of a run.
    for index, policy in ((1, ParentClosePolicy.TERMINATE), (2, ParentClosePolicy.ABANDON)):
        fan.add(root, ParentClosePolicyApplied(child_workflow_exec_id=f"{root}.item-{index}",
                                               child_workflow_name="item_workflow", policy=policy,
                                               parent_close_status="FAILED"))
    fan.add(root, WorkflowExecutionFailed(failure=Failure(type="ValueError", message="item 3 is out of stock")))
    fan.add(f"{root}.item-1", WorkflowExecutionTerminated(reason="parent closed"))
    abandoned = f"{root}.item-2"
    run_activity(fan, abandoned, "process_item", "item-2")
    fan.add(abandoned, WorkflowExecutionCompleted(result_json='"processed:item-2"'))
    return [seed.events, fan.events]


async def write_events(settings: KafkaSettings, events: list[Event]) -> None:
    """Produce events keyed by their root id, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **settings.profile.producer_options())
    await producer.start()
    try:
        for event in events:
            await producer.send(settings.topics.events, EVENTS.encode(event),
                                key=event.workflow_context.root_workflow_exec_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


def summarize(event: Event) -> str:
    """The payload's set fields on one line, user data (`*_json`) shown decoded."""
    fields = {}
    for key, value in event.payload.model_dump(mode="json").items():
        if value in (None, [], False):
            continue
        if key.endswith("_json"):
            key, value = key.removesuffix("_json"), json.loads(value)
        fields[key] = value
    text = json.dumps(fields, separators=(",", ":"))
    return text if len(text) <= 120 else text[:117] + "..."


def render_tree(root: str, consumed: list[ConsumedEvent], partitions: int) -> str:
    """A tree's executions (indented by depth, with status) and then its events in log order."""
    contexts: dict[str, WorkflowContext] = {}
    status: dict[str, str] = {}
    for item in consumed:
        ctx = item.event.workflow_context
        contexts.setdefault(ctx.workflow_exec_id, ctx)
        if item.event.event_type in CLOSING_STATUS:
            status[ctx.workflow_exec_id] = CLOSING_STATUS[item.event.event_type]
    children: dict[str | None, list[str]] = defaultdict(list)
    for exec_id, ctx in contexts.items():
        children[ctx.parent_workflow_exec_id].append(exec_id)
    depth: dict[str, int] = {}
    lines = [f"tree {root}  (partition {partition_for(root, partitions)}, {len(consumed)} events)"]

    def walk(exec_id: str, level: int) -> None:
        depth[exec_id] = level
        name = contexts[exec_id].workflow_name
        lines.append(f"  {'    ' * level}{exec_id}  [{name}]  {status.get(exec_id, 'RUNNING')}")
        for child in children[exec_id]:
            walk(child, level + 1)

    walk(root, 0)
    lines.append("  events, in log order:")
    for item in consumed:
        event = item.event
        exec_id = event.workflow_context.workflow_exec_id
        lines.append(f"    @{item.offset:<4} {'  ' * depth[exec_id]}{exec_id} #{event.sequence} "
                     f"{event.event_type.value}  {summarize(event)}")
    return "\n".join(lines)


async def run_demo(settings: KafkaSettings, echo: Callable[[str], None] = print) -> dict[str, list[ConsumedEvent]]:
    """Create the topics, write the sample trees, read them back and print them."""
    report = await ensure_topics(settings)
    echo(f"broker {settings.bootstrap_servers} ({settings.profile.name} profile); topics "
         f"{', '.join(spec.name for spec in report.specs)}: {len(report.created)} created, "
         f"{len(report.existing)} already there; {settings.partitions} partitions, "
         f"replication factor {report.specs[0].replication_factor}")
    run = uuid.uuid4().hex[:6]
    trees = sample_trees(run, datetime.now(timezone.utc))
    roots = [events[0].workflow_context.root_workflow_exec_id for events in trees]
    for events in trees:
        await write_events(settings, events)
    echo(f"wrote {sum(map(len, trees))} events of {len(trees)} trees; reading them back:\n")
    grouped: dict[str, list[ConsumedEvent]] = {root: [] for root in roots}
    reader = EventReader(settings, {partition_for(root, settings.partitions) for root in roots})
    async for item in reader:
        root = item.event.workflow_context.root_workflow_exec_id
        if root in grouped:
            grouped[root].append(item)
    for root in roots:
        echo(render_tree(root, grouped[root], settings.partitions) + "\n")
    if reader.stats.undecodable:
        echo(f"{reader.stats.undecodable} undecodable record(s) skipped (see the log)")
    return grouped
