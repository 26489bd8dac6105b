"""Snapshots on a real broker (DESIGN.md §5 invariants 1 and 7).

A processor recovers each partition from its latest snapshot plus the events after
it, and the state it gets equals the fold of the whole partition; the latest
snapshot is found reading backwards from the true end, also past an unfinished one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from treeflow.client import Client
from treeflow.definitions import collect
from treeflow.kafka import KafkaSettings, end_offsets
from treeflow.processor.app import Processor
from treeflow.processor.engine import PartitionEngine
from treeflow.processor.snapshots import SnapshotOptions, SnapshotStore, chunk_key, encode_chunks
from treeflow.worker.runner import TaskRunner

from . import durable_app as app
from .durable_app import ChainInput, ChainWorkflow
from .test_durability import QUEUES, client, quiesce, read_events, wait_until, workdir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

FAST = SnapshotOptions(interval=0.3, check_every=0.1)


async def started(settings: KafkaSettings, options: SnapshotOptions = FAST) -> Processor:
    workflows, activities = collect([app])
    processor = Processor(settings, runner=TaskRunner(workflows, activities), local_queues=QUEUES, snapshots=options)
    await processor.start()
    await processor.wait_assigned(60)
    await wait_until(lambda: len(processor.engines) == settings.partitions, 60, "every partition")
    return processor


@pytest.fixture
async def processor(settings: KafkaSettings, client: Client) -> AsyncIterator[Processor]:  # noqa: F811
    running = await started(settings)
    try:
        yield running
    finally:
        await asyncio.wait_for(running.stop(), 30)


async def test_recovery_is_the_latest_snapshot_plus_the_tail_and_equals_the_fold(
        settings: KafkaSettings, client: Client, processor: Processor, workdir: Path) -> None:  # noqa: F811
    wd = str(workdir)
    first = [await client.start_workflow(ChainWorkflow, ChainInput(workdir=wd, tag=f"a{i}")) for i in range(8)]
    sleepers = [await client.start_workflow(app.SleeperWorkflow, 3600.0) for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*(h.result() for h in first)), 60)
    await quiesce(processor)
    await wait_until(lambda: all(
        log.snapshotted == log.appended for log in processor._logs.values()), 20, "a snapshot of every partition",
        lambda: f"{processor.stats}, {processor._logs}")
    snapshotted = {p for p, log in processor._logs.items() if log.appended}
    # A tail after the snapshots (none taken of it): more executions, one left running.
    processor._snapshots = None
    more = [await client.start_workflow(ChainWorkflow, ChainInput(workdir=wd, tag=f"b{i}")) for i in range(4)]
    await asyncio.wait_for(asyncio.gather(*(h.result() for h in more)), 60)
    tail_sleeper = await client.start_workflow(app.SleeperWorkflow, 3600.0)
    await wait_until(lambda: any(s.timers for e in processor.engines.values() for s in e.states.values()
                                 if s.exec_id == tail_sleeper.execution_id), 20, "the last sleeper's timer")
    await quiesce(processor)
    live = {p: dict(e.states) for p, e in processor.engines.items()}
    # Stop it, then recover in a new processor.
    await asyncio.wait_for(processor.stop(), 30)
    events = await read_events(settings)

    again = await started(settings, SnapshotOptions(interval=3600))
    try:
        assert again.stats.recovered_from_snapshot == len(snapshotted)
        assert 0 < again.stats.recovered_events < len(events), "the tail only, not the whole log"
        for partition in range(settings.partitions):
            whole = PartitionEngine(partition)
            whole.replay([e for p, _, e in events if p == partition], max(e.timestamp for _, _, e in events))
            recovered = again.engines[partition]
            assert recovered.states == whole.states == live[partition], f"partition {partition}"
            assert recovered.histories == whole.histories
        assert sum(s.open for e in again.engines.values() for s in e.states.values()) == len(sleepers) + 1
        # And it goes on: a new execution completes.
        handle = await client.start_workflow(ChainWorkflow, ChainInput(workdir=wd, tag="c"))
        assert await asyncio.wait_for(handle.result(), 60) == "A(c)+C(B(c))"
    finally:
        await asyncio.wait_for(again.stop(), 30)


async def test_the_latest_snapshot_is_read_backwards_past_an_unfinished_one(
        settings: KafkaSettings, client: Client, processor: Processor) -> None:  # noqa: F811
    handles = [await client.start_workflow(app.SleeperWorkflow, 3600.0) for _ in range(6)]
    await wait_until(lambda: sum(len(e.states) for e in processor.engines.values()) == len(handles), 20,
                     "the executions")
    await quiesce(processor)
    producer = processor._producer
    assert producer is not None
    partition = max(processor.engines, key=lambda p: len(processor.engines[p].states))
    engine = processor.engines[partition]
    store = SnapshotStore(settings, producer, SnapshotOptions(chunk_bytes=300))
    sizes = []
    for _ in range(20):  # twenty complete snapshots: the topic grows (no compaction on Tansu)
        written = await store.write(partition, engine.export(), events_offset=0, durable_offset=-1,
                                    taken_at=engine.states[next(iter(engine.states))].run_started_at)
        sizes.append(written.bytes)
    assert written.chunks > 1
    # An unfinished snapshot after the last one: chunks with no manifest.
    for index, data in enumerate(encode_chunks(partition, "unfinished", engine.export(), 300)):
        await producer.send_and_wait(settings.topics.snapshots, data, key=chunk_key(partition, "unfinished", index),
                                     partition=partition)
    loaded = await SnapshotStore(settings, producer, FAST).latest(partition)
    assert loaded is not None and loaded.snapshot_id == written.snapshot_id
    assert {s.exec_id for s in loaded.image.closed} | {i.history[0].workflow_context.workflow_exec_id
                                                      for i in loaded.image.open} == set(engine.states)
    # Bounded: it read the unfinished snapshot and the newest windows (8 records, then 32:
    # the window grows 4x), not the whole topic of twenty snapshots.
    tp_end = (await end_offsets(settings, [tp := _tp(settings, partition)]))[tp]
    assert loaded.bytes_read < 12 * sizes[-1] + 4096, (loaded.bytes_read, sizes, tp_end)


def _tp(settings: KafkaSettings, partition: int):  # type: ignore[no-untyped-def]
    from aiokafka import TopicPartition

    return TopicPartition(settings.topics.snapshots, partition)


async def test_closed_executions_leave_the_processor_after_the_retention(
        settings: KafkaSettings, client: Client) -> None:  # noqa: F811
    running = await started(settings, SnapshotOptions(interval=0.3, check_every=0.1,
                                                      closed_retention=timedelta(seconds=1)))
    try:
        handle = await client.start_workflow(app.SleeperWorkflow, 0.01)
        await asyncio.wait_for(handle.result(), 30)
        await wait_until(lambda: all(not e.states for e in running.engines.values()), 20,
                         "the closed execution to be forgotten")
        assert running.stats.evicted == 1
        # Served from the log: describe and result; a signal, a cancel and a query are
        # rejected as closed, not as unknown (the log knows it closed).
        described = await client.describe(handle.execution_id, root_execution_id=handle.execution_id)
        assert described.status.value == "COMPLETED"
        assert await client.get_handle(handle.execution_id).result() == "echo:before-sleep, slept 0.01"
        from treeflow.errors import CommandRejectedError, ExecutionNotFoundError, WorkflowQueryError

        for request in (lambda: handle.signal("nothing"), handle.cancel):
            with pytest.raises(CommandRejectedError, match="already closed \\(COMPLETED\\)") as rejected:
                await request()
            assert not isinstance(rejected.value, ExecutionNotFoundError)
        with pytest.raises(WorkflowQueryError) as refused:
            await handle.query("anything")
        assert refused.value.type == "WorkflowClosed"
        # An id the log does not know is still not found.
        with pytest.raises(ExecutionNotFoundError):
            await client.get_handle("never-started", root_execution_id=handle.execution_id).signal("nothing")
    finally:
        await asyncio.wait_for(running.stop(), 30)
