"""Benchmark of the consumer library: one tree out of a big topic, and live latency.

    python -m treeflow.consumers.bench                       # 12 partitions, 200,000 events, 2,000 trees
    python -m treeflow.consumers.bench --events 20000 --trees 200

Writes encoded events straight to a fresh events topic (no engine: trees of a root
and a child, events interleaved across trees as a busy processor writes them),
then measures:

1. reading one tree from the beginning with `subscribe_tree(until_closed=True)`:
   which partitions it fetched, the bytes fetched against the topic's size, and
   its time against two full-topic scans for the same tree (every partition read
   with the same key filter, and every record decoded, as a naive reader does);
2. live latency: a `subscribe_tree(from_beginning=False)` subscriber, events
   appended one at a time; the time from the append's acknowledgement (and from
   the send) to the subscriber yielding the event.

Uses the Kafka named by TREEFLOW_BOOTSTRAP_SERVERS, else starts the embedded broker.
Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any


from treeflow.kafka import TANSU, EmbeddedBroker, KafkaSettings, clients, current_profile, ensure_topics, partition_for
from treeflow.kafka.settings import BOOTSTRAP_ENV
from treeflow.schemas import EVENTS, Event, EventType, ParentClosePolicy, WorkflowContext
from treeflow.schemas import models as m

from .reader import EventReader
from .subscription import subscribe_tree

T = EventType
INPUT = '{"order_id": "%s", "items": [{"sku": "A-100", "qty": 2}, {"sku": "B-7", "qty": 1}], "note": "bench"}'


def tree_events(root: str, count: int, now: datetime) -> list[Event]:
    """`count` events (at least 7) of a tree: a root, one child running activities, both completing."""
    child = f"{root}.child"
    contexts = {
        root: WorkflowContext(workflow_exec_id=root, workflow_run_id=f"{root}-run", workflow_name="order",
                              parent_workflow_exec_id=None, root_workflow_exec_id=root, task_queue="default"),
        child: WorkflowContext(workflow_exec_id=child, workflow_run_id=f"{child}-run", workflow_name="payment",
                               parent_workflow_exec_id=root, root_workflow_exec_id=root, task_queue="default"),
    }
    sequences = {root: 0, child: 0}
    events: list[Event] = []

    def emit(exec_id: str, event_type: EventType, payload: Any) -> None:
        sequences[exec_id] += 1
        events.append(Event(event_id=f"{exec_id}:{sequences[exec_id]}", event_type=event_type, timestamp=now,
                            sequence=sequences[exec_id], workflow_context=contexts[exec_id], payload=payload))

    ids = {"child_workflow_exec_id": child, "child_workflow_name": "payment"}
    emit(root, T.WORKFLOW_EXECUTION_STARTED, m.WorkflowExecutionStarted(input_json=INPUT % root))
    emit(root, T.START_CHILD_WORKFLOW_EXECUTION_INITIATED, m.StartChildWorkflowExecutionInitiated(
        child_workflow_exec_id=child, child_workflow_name="payment", task_queue="default", input_json=INPUT % child,
        parent_close_policy=ParentClosePolicy.TERMINATE))
    emit(child, T.WORKFLOW_EXECUTION_STARTED, m.WorkflowExecutionStarted(input_json=INPUT % child))
    emit(root, T.CHILD_WORKFLOW_EXECUTION_STARTED, m.ChildWorkflowExecutionStarted(
        **ids, child_workflow_run_id=f"{child}-run"))
    step = 0
    while len(events) < count - 3:
        activity = {"activity_id": str(step // 4), "activity_name": "charge"}
        kind = step % 4
        if kind == 0:
            emit(child, T.ACTIVITY_TASK_SCHEDULED, m.ActivityTaskScheduled(
                activity_id=str(step // 4), activity_name="charge", task_queue="default", input_json=INPUT % step))
        elif kind == 1:
            emit(child, T.ACTIVITY_TASK_STARTED, m.ActivityTaskStarted(**activity))
        elif kind == 2:
            emit(child, T.ACTIVITY_TASK_COMPLETED, m.ActivityTaskCompleted(**activity, result_json='"charged"'))
        else:
            emit(child, T.WORKFLOW_TASK_COMPLETED, m.WorkflowTaskCompleted(task_id=f"t{step}",
                                                                           history_length=sequences[child]))
        step += 1
    emit(child, T.WORKFLOW_EXECUTION_COMPLETED, m.WorkflowExecutionCompleted(result_json='"paid"'))
    emit(root, T.CHILD_WORKFLOW_EXECUTION_COMPLETED, m.ChildWorkflowExecutionCompleted(**ids, result_json='"paid"'))
    emit(root, T.WORKFLOW_EXECUTION_COMPLETED, m.WorkflowExecutionCompleted(result_json='"done"'))
    return events


def headers(event: Event) -> list[tuple[str, bytes]]:
    """The headers the processor puts on an event."""
    return [("tf.type", event.event_type.value.encode()), ("tf.exec", event.workflow_context.workflow_exec_id.encode())]


async def produce(settings: KafkaSettings, trees: int, events: int, say: Callable[[str], None]) -> tuple[list[str],
                                                                                                          dict[int, int]]:
    """Write `events` events of `trees` trees, interleaved; returns the roots and the bytes per partition."""
    now = datetime.now(timezone.utc)
    per_tree = max(7, events // trees)
    roots = [f"bench-{n:05d}-{uuid.uuid4().hex[:6]}" for n in range(trees)]
    started = time.perf_counter()
    encoded = [[(EVENTS.encode(event), headers(event)) for event in tree_events(root, per_tree, now)]
               for root in roots]
    say(f"encoded {trees * per_tree:,} events in {time.perf_counter() - started:.1f}s")
    producer = await clients.start(clients.producer(settings, "bench", linger_ms=5, max_batch_size=256 * 1024),
                                   settings)
    sizes: dict[int, int] = {}
    started = time.perf_counter()
    try:
        pending = []
        for step in range(per_tree):  # a busy processor's log: every tree advances a little at a time
            for root, tree in zip(roots, encoded):
                value, record_headers = tree[step]
                key = root.encode()
                partition = partition_for(key, settings.partitions)
                sizes[partition] = sizes.get(partition, 0) + len(key) + len(value)
                pending.append(await producer.send(settings.topics.events, value, key=key, headers=record_headers))
            if len(pending) > 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    say(f"produced {trees * per_tree:,} events ({sum(sizes.values()) / 1e6:.1f} MB of keys and values) "
        f"in {time.perf_counter() - started:.1f}s")
    return roots, sizes


async def read_tree(settings: KafkaSettings, root: str) -> tuple[float, int, int, int | None]:
    started = time.perf_counter()
    subscription = subscribe_tree(root, until_closed=True, settings=settings)
    count = 0
    async for _ in subscription:
        count += 1
    return time.perf_counter() - started, count, subscription.stats.fetched_bytes, subscription.stats.partition


async def scan_topic(settings: KafkaSettings, root: str, key_filter: bool) -> tuple[float, int, int]:
    started = time.perf_counter()
    reader = EventReader(settings, key=root if key_filter else None)
    count = 0
    async for item in reader:
        if item.event.workflow_context.root_workflow_exec_id == root:
            count += 1
    return time.perf_counter() - started, count, reader.stats.fetched_bytes


async def live_latency(settings: KafkaSettings, root: str, samples: int) -> tuple[list[float], list[float]]:
    """Append `samples` events of a new execution in `root`'s tree one by one; latencies in ms."""
    context = WorkflowContext(workflow_exec_id=f"{root}.live", workflow_run_id="live-run", workflow_name="live",
                              parent_workflow_exec_id=root, root_workflow_exec_id=root, task_queue="default")
    now = datetime.now(timezone.utc)
    events = [Event(event_id=f"live-{n}", event_type=T.WORKFLOW_EXECUTION_SIGNALED, timestamp=now, sequence=n + 1,
                    workflow_context=context,
                    payload=m.WorkflowExecutionSignaled(signal_name="tick", input_json=str(n)))
              for n in range(samples)]
    sent: dict[str, float] = {}
    acked: dict[str, float] = {}
    received: dict[str, float] = {}
    subscription = subscribe_tree(root, from_beginning=False, event_types=[T.WORKFLOW_EXECUTION_SIGNALED],
                                  settings=settings)
    await subscription.start()

    async def follow() -> None:
        async for event in subscription:
            received[event.event_id] = time.perf_counter()
            if len(received) == samples:
                return

    following = asyncio.ensure_future(follow())
    producer = await clients.start(clients.producer(settings, "bench"), settings)
    try:
        await asyncio.sleep(0.5)  # the subscriber's first fetch is out
        for event in events:
            value = EVENTS.encode(event)
            sent[event.event_id] = time.perf_counter()
            await producer.send_and_wait(settings.topics.events, value, key=root.encode(), headers=headers(event))
            acked[event.event_id] = time.perf_counter()
            await asyncio.sleep(0.02)
        async with asyncio.timeout(30):
            await following
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await subscription.aclose()
        await producer.stop()
    from_ack = [(received[i] - acked[i]) * 1000 for i in received]
    from_send = [(received[i] - sent[i]) * 1000 for i in received]
    return from_ack, from_send


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(args: argparse.Namespace, bootstrap: str, say: Callable[[str], None]) -> None:
    profile = TANSU if args.embedded else current_profile()
    settings = KafkaSettings(bootstrap, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}", partitions=args.partitions,
                             profile=profile)
    await ensure_topics(settings)
    say(f"broker {bootstrap} (profile {profile.name}, fetch_max_wait_ms={profile.fetch_wait_ms()}); "
        f"topic {settings.topics.events} with {args.partitions} partitions")
    roots, sizes = await produce(settings, args.trees, args.events, say)
    topic_bytes = sum(sizes.values())
    root = roots[len(roots) // 2]
    partition = partition_for(root, args.partitions)

    say("")
    say(f"1. one tree from the beginning ({root}, partition {partition})")
    tree_runs = [await read_tree(settings, root) for _ in range(args.repeat)]
    tree_time = statistics.median(run[0] for run in tree_runs)
    _, tree_count, tree_bytes, tree_partition = tree_runs[0]
    scans = [await scan_topic(settings, root, key_filter=True) for _ in range(args.repeat)]
    scan_time = statistics.median(scan[0] for scan in scans)
    naive = await scan_topic(settings, root, key_filter=False)
    assert all(run[1] == tree_count for run in tree_runs) and scans[0][1] == naive[1] == tree_count, \
        "the readers disagree on the tree"
    say(f"   events of the tree:            {tree_count}")
    say(f"   partitions fetched:            [{tree_partition}] of {args.partitions}")
    say(f"   bytes fetched:                 {tree_bytes:,} of the topic's {topic_bytes:,} "
        f"(= {tree_bytes / topic_bytes:.3f} of it; its partition holds {sizes[partition]:,})")
    say(f"   subscribe_tree, until closed:  {tree_time * 1000:8.1f} ms   (median of {args.repeat})")
    say(f"   full-topic scan, key filter:   {scan_time * 1000:8.1f} ms   (median of {args.repeat}; "
        f"{scans[0][2]:,} bytes fetched)")
    say(f"   full-topic scan, decode all:   {naive[0] * 1000:8.1f} ms")
    say(f"   ratio tree / key-filter scan:  {tree_time / scan_time:.3f}   (target <= {1 / 8:.3f})")
    say(f"   ratio tree / decode-all scan:  {tree_time / naive[0]:.3f}")

    say("")
    say(f"2. live subscriber, {args.samples} events appended one at a time")
    from_ack, from_send = await live_latency(settings, root, args.samples)
    say(f"   after the append's ack:  p50 {percentile(from_ack, 0.5):6.2f} ms   p90 {percentile(from_ack, 0.9):6.2f} ms"
        f"   p99 {percentile(from_ack, 0.99):6.2f} ms   (target p50 <= 10 ms)")
    say(f"   after the send started:  p50 {percentile(from_send, 0.5):6.2f} ms   p90 {percentile(from_send, 0.9):6.2f} ms"
        f"   p99 {percentile(from_send, 0.99):6.2f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m treeflow.consumers.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events to write (default 200,000)")
    parser.add_argument("--trees", type=int, default=2_000, help="trees they belong to (default 2,000)")
    parser.add_argument("--partitions", type=int, default=12, help="partitions of the events topic (default 12)")
    parser.add_argument("--samples", type=int, default=200, help="live events to time (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each read, the median is shown (default 3)")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    bootstrap = os.environ.get(BOOTSTRAP_ENV)
    args.embedded = not bootstrap
    if bootstrap:
        asyncio.run(run(args, bootstrap, say))
        return
    with EmbeddedBroker() as broker:
        asyncio.run(run(args, broker.bootstrap_servers, say))


if __name__ == "__main__":
    main()
