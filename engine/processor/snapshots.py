"""Snapshots: recovery bounded by the open work, not by history (DESIGN.md §5 invariant 7).

A processor that gets a partition rebuilds its state as *the latest snapshot of the
partition plus the events after the offset it covers*, instead of folding the whole
events partition (invariant 1 still holds: the fold of snapshot + tail is the fold of
the whole partition, `tests/unit/test_snapshots.py`).

Where snapshots live: a compacted topic `<prefix>.snapshots` with the partition count
of the events topic; partition p holds partition p's snapshots. Why there:
- it survives the processor and its machine, like the log (a local store would be lost
  with the host and need a changelog, i.e. this topic anyway);
- the events topic stays the single source of truth written only by the processor
  (§3): a snapshot is a cache of a fold of it, never consulted for anything the log
  says otherwise, and a missing or unreadable snapshot only makes recovery longer (the
  processor then folds the partition from offset 0);
- one writer per partition, the partition's owner, like the events (§3, §5);
- compaction keeps one snapshot per partition on Kafka without any delete request.

A snapshot is N chunk records (`SnapshotChunk`, each below `chunk_bytes` so no record
outgrows the topic's max.message.bytes) followed by one `SnapshotManifest` naming the
chunks' offsets and the events offset the snapshot covers. Keys: a chunk
`<partition>/<snapshot id>/<index>`, the manifest `<partition>`; after a manifest the
previous snapshot's chunk keys get tombstones, so compaction keeps exactly the latest
snapshot (a chunk is never superseded before the manifest that replaces it exists).

Reading the latest snapshot never relies on compaction or on ListOffsets: the reader
takes the partition's true end (`treeflow.kafka.end_offsets`, which works around
Tansu's low ListOffsets answer) and reads backwards in growing windows until it finds
the newest manifest whose chunks are all there. Records after that manifest are at
most one unfinished snapshot (a writer that died mid-way), so the read is bounded by
the size of one snapshot, also on Tansu, which has no compaction: there the topic
grows by one snapshot per `interval` per changing partition (the embedded broker is
for development and tests, in memory).

A snapshot is only written when the owner can prove it is the fold of exactly the
events below its offset: every event appended since recovery has been acknowledged
and the last one sits at `recovered end + appended - 1` (no other writer's record in
between, e.g. a zombie owner during a rebalance).

What a snapshot holds (the contract is `schemas/avro/snapshots/`): each open
execution's current run history (what workflow tasks carry; its state is the fold of
it) with the two fields that come from earlier runs, each closed execution still within
`closed_retention`, each schedule (its whole state: no history of a schedule is kept in
memory, and a schedule is never evicted), the `tf.durable` commands offset, and the events
offset. What is rebuilt rather than stored: the due-time heap (from the states), what was dispatched
(everything pending is dispatched again after a recovery, as before), heartbeats
(counted again from the recovery).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from treeflow.consumers import EventReader
from treeflow.kafka import KafkaSettings, clients, end_offsets
from treeflow.kafka.clients import stop as stop_shielded
from treeflow.kafka.settings import SettingsError, seconds_env
from treeflow.kafka.topics import partition_counts
from treeflow.schemas import SNAPSHOTS, DecodeError, RecordPosition
from treeflow.schemas import models as m

from ..core.schedules import ScheduleRun, ScheduleState
from ..core.state import EMPTY, ExecutionState, Status
from ..ids import new_id
from .engine import DEFAULT_CLOSED_RETENTION, DEFAULT_HISTORY_LIMIT, OpenImage, PartitionEngine, PartitionImage

log = logging.getLogger(__name__)

DURABLE_HEADER = "tf.durable"
INTERVAL_ENV = "TREEFLOW_SNAPSHOT_INTERVAL"
RETENTION_ENV = "TREEFLOW_CLOSED_RETENTION"
HISTORY_LIMIT_ENV = "TREEFLOW_HISTORY_LIMIT"


@dataclass(frozen=True)
class SnapshotOptions:
    """When the processor snapshots and how long it keeps closed executions.

    - `interval`: seconds between two snapshots of a partition that changed
      (`TREEFLOW_SNAPSHOT_INTERVAL`, default 30; 0 turns snapshots off).
    - `closed_retention`: how long a closed execution stays in memory after it closed
      (`TREEFLOW_CLOSED_RETENTION` in seconds, default 300).
    - `chunk_bytes`: the largest chunk record aimed at (one execution bigger than that
      still makes one chunk; the topic accepts 16 MiB records).
    - `check_every`: seconds between two looks for closed executions to forget and
      partitions due for a snapshot.
    - `history_limit`: the most events a run's history may hold; the processor
      terminates a run that reaches it (`TREEFLOW_HISTORY_LIMIT`, default 51,200 as in
      Temporal), which bounds what an open execution costs in memory and in a snapshot.
    """

    interval: float = 30.0
    closed_retention: timedelta = DEFAULT_CLOSED_RETENTION
    chunk_bytes: int = 512 * 1024
    check_every: float = 1.0
    history_limit: int = DEFAULT_HISTORY_LIMIT

    @classmethod
    def from_env(cls) -> SnapshotOptions:
        return cls(interval=_seconds(INTERVAL_ENV, 30.0),
                   closed_retention=timedelta(seconds=_seconds(RETENTION_ENV, DEFAULT_CLOSED_RETENTION.total_seconds())),
                   history_limit=_history_limit())


def _history_limit() -> int:
    raw = os.environ.get(HISTORY_LIMIT_ENV)
    if not raw:
        return DEFAULT_HISTORY_LIMIT
    if not raw.isdigit() or int(raw) < 10:
        raise SettingsError(f"{HISTORY_LIMIT_ENV}={raw!r} must be a whole number of events, at least 10")
    return int(raw)


def _seconds(name: str, default: float) -> float:
    value = seconds_env(name, allow_zero=True)
    return default if value is None else value


class DurableUpTo:
    """The highest `tf.durable` header among the events read back on recovery."""

    def __init__(self, offset: int = -1) -> None:
        self.offset = offset

    def see(self, record: Any) -> bool:
        for key, value in record.headers or ():
            if key == DURABLE_HEADER:
                try:
                    self.offset = max(self.offset, int(value))
                except ValueError:
                    log.error("ignoring a malformed %s header %r on an event", DURABLE_HEADER, value)
        return True


# ---------------------------------------------------------------- the records


def chunk_key(partition: int, snapshot_id: str, index: int) -> bytes:
    return f"{partition}/{snapshot_id}/{index}".encode()


def manifest_key(partition: int) -> bytes:
    return str(partition).encode()


def open_record(item: OpenImage) -> m.OpenExecution:
    return m.OpenExecution.model_construct(history=item.history, execution_started_at=item.execution_started_at,
                                           recent_commands=list(item.recent_commands))


def closed_record(state: ExecutionState) -> m.ClosedExecution:
    return m.ClosedExecution.model_construct(
        context=state.context, status=m.ExecutionStatus(state.status.value), first_sequence=state.first_sequence,
        last_sequence=state.last_sequence, last_trigger_sequence=state.last_trigger_sequence,
        execution_started_at=state.execution_started_at, run_started_at=state.run_started_at,
        closed_at=state.closed_at, start_command_id=state.start_command_id,
        closed_by_command_id=state.closed_by_command_id, input_json=state.input_json,
        execution_timeout_ms=state.execution_timeout_ms, retry_policy=state.retry_policy, attempt=state.attempt,
        parent_close_policy=state.parent_close_policy, cancel_requested=state.cancel_requested,
        recent_commands=list(state.recent_commands), result_json=state.result_json, failure=state.failure,
        reply_partition=state.reply_partition)


def open_image(record: m.OpenExecution) -> OpenImage:
    return OpenImage(list(record.history), record.execution_started_at, tuple(record.recent_commands))


def closed_state(record: m.ClosedExecution) -> ExecutionState:
    return ExecutionState(
        context=record.context, status=Status(record.status.value), last_sequence=record.last_sequence,
        execution_started_at=record.execution_started_at, run_started_at=record.run_started_at,
        start_command_id=record.start_command_id, input_json=record.input_json,
        execution_timeout_ms=record.execution_timeout_ms, retry_policy=record.retry_policy, attempt=record.attempt,
        parent_close_policy=record.parent_close_policy, first_sequence=record.first_sequence,
        activities=EMPTY, timers=EMPTY, children=EMPTY, workflow_task=None,
        last_trigger_sequence=record.last_trigger_sequence, cancel_requested=record.cancel_requested,
        recent_commands=tuple(record.recent_commands), closed_at=record.closed_at,
        closed_by_command_id=record.closed_by_command_id, result_json=record.result_json, failure=record.failure,
        reply_partition=record.reply_partition)


def schedule_record(state: ScheduleState) -> m.ScheduleImage:
    return m.ScheduleImage.model_construct(
        context=state.context, spec=state.spec, action=state.action, overlap=state.overlap,
        catchup_window_ms=state.catchup_window_ms, created_at=state.created_at, last_sequence=state.last_sequence,
        paused=state.paused, note=state.note, next_fire_at=state.next_fire_at,
        buffered_nominal=state.buffered[0] if state.buffered else None,
        buffered_trigger=state.buffered[1] if state.buffered else None,
        recent_runs=[m.ScheduleRun.model_construct(nominal_time=r.nominal_time, started_at=r.started_at,
                                                   workflow_exec_id=r.workflow_exec_id) for r in state.recent_runs],
        fired=state.fired, skipped=state.skipped, missed=state.missed, recent_commands=list(state.recent_commands))


def schedule_state(record: m.ScheduleImage) -> ScheduleState:
    buffered = (record.buffered_nominal, record.buffered_trigger or "SCHEDULED") if record.buffered_nominal else None
    return ScheduleState(
        context=record.context, spec=record.spec, action=record.action, overlap=record.overlap,
        catchup_window_ms=record.catchup_window_ms, created_at=record.created_at, last_sequence=record.last_sequence,
        paused=record.paused, note=record.note, next_fire_at=record.next_fire_at, buffered=buffered,
        recent_runs=tuple(ScheduleRun(r.nominal_time, r.started_at, r.workflow_exec_id) for r in record.recent_runs),
        fired=record.fired, skipped=record.skipped, missed=record.missed,
        recent_commands=tuple(record.recent_commands))


def encode_chunks(partition: int, snapshot_id: str, image: PartitionImage, chunk_bytes: int) -> list[bytes]:
    """The image as encoded chunk records, each at most `chunk_bytes` unless one
    execution alone is bigger. (CPU-bound: run it in a thread.)"""
    items: list[Any] = ([open_record(i) for i in image.open] + [closed_record(s) for s in image.closed]
                        + [schedule_record(s) for s in image.schedules])
    out: list[bytes] = []

    def encode(part: list[Any]) -> None:
        chunk = m.SnapshotChunk.model_construct(
            index=len(out), open_executions=[i for i in part if isinstance(i, m.OpenExecution)],
            closed_executions=[i for i in part if isinstance(i, m.ClosedExecution)],
            schedules=[i for i in part if isinstance(i, m.ScheduleImage)])
        data = SNAPSHOTS.encode(m.Snapshot.model_construct(snapshot_id=snapshot_id, partition=partition,
                                                           payload=chunk))
        if len(data) > chunk_bytes and len(part) > 1:
            half = len(part) // 2
            encode(part[:half])
            encode(part[half:])
        else:
            out.append(data)

    for start in range(0, len(items), 256):
        encode(items[start:start + 256])
    return out


@dataclass(frozen=True)
class LoadedSnapshot:
    """The latest complete snapshot of a partition."""

    snapshot_id: str
    manifest: m.SnapshotManifest
    image: PartitionImage
    #: Offset of the manifest, and bytes read from the snapshots topic to find it.
    offset: int
    bytes_read: int


@dataclass(frozen=True)
class WrittenSnapshot:
    snapshot_id: str
    events_offset: int
    chunks: int
    bytes: int
    manifest_offset: int


class SnapshotStore:
    """Writes and reads the snapshots of `<prefix>.snapshots` (see the module docstring)."""

    def __init__(self, settings: KafkaSettings, producer: AIOKafkaProducer, options: SnapshotOptions) -> None:
        self.settings = settings
        self.producer = producer
        self.options = options
        self.topic = settings.topics.snapshots
        #: Chunk keys of the latest snapshot of each partition (tombstoned after the next).
        self._chunk_keys: dict[int, list[bytes]] = {}

    @staticmethod
    async def exists(settings: KafkaSettings) -> bool:
        """Whether the snapshots topic exists (asked by name with auto-creation disallowed)."""
        return settings.topics.snapshots in await partition_counts(settings, [settings.topics.snapshots], "processor")

    async def write(self, partition: int, image: PartitionImage, *, events_offset: int, durable_offset: int,
                    taken_at: datetime) -> WrittenSnapshot:
        """Append one snapshot (chunks, then the manifest) and tombstone the previous one's chunks."""
        snapshot_id = new_id()
        chunks = await asyncio.to_thread(encode_chunks, partition, snapshot_id, image, self.options.chunk_bytes)
        offsets, keys = [], []
        for index, data in enumerate(chunks):
            keys.append(chunk_key(partition, snapshot_id, index))
            sent = await self.producer.send(self.topic, data, key=keys[-1], partition=partition)
            offsets.append(sent)
        chunk_offsets = [(await sent).offset for sent in offsets]
        manifest = m.Snapshot(snapshot_id=snapshot_id, partition=partition, payload=m.SnapshotManifest(
            events_offset=events_offset, durable_offset=durable_offset, taken_at=taken_at,
            partitions=self.settings.partitions, chunk_offsets=chunk_offsets, open_executions=len(image.open),
            closed_executions=len(image.closed)))
        data = SNAPSHOTS.encode(manifest)
        written = await (await self.producer.send(self.topic, data, key=manifest_key(partition), partition=partition))
        for key in self._chunk_keys.get(partition, ()):
            await self.producer.send(self.topic, None, key=key, partition=partition)
        self._chunk_keys[partition] = keys
        return WrittenSnapshot(snapshot_id, events_offset, len(chunks), sum(map(len, chunks)) + len(data),
                               written.offset)

    async def latest(self, partition: int) -> LoadedSnapshot | None:
        """The newest complete snapshot of `partition`, or None. Reads backwards from the
        partition's true end: bounded by one snapshot (plus an unfinished one)."""
        tp = TopicPartition(self.topic, partition)
        stop = (await end_offsets(self.settings, [tp]))[tp]
        consumer = await clients.start(clients.consumer(self.settings, "snapshots"), self.settings)
        try:
            consumer.assign([tp])
            window, read = 8, 0
            while stop > 0:
                start = max(0, stop - window)
                records = await _read_range(consumer, tp, start, stop)
                read += sum(max(r.serialized_value_size, 0) for r in records)
                for record in reversed(records):
                    snapshot = self._decode(record)
                    if snapshot is None or not isinstance(snapshot.payload, m.SnapshotManifest):
                        continue
                    image, size = await self._chunks(consumer, tp, snapshot, record.offset)
                    read += size
                    if image is not None:
                        self._chunk_keys[partition] = [chunk_key(partition, snapshot.snapshot_id, i)
                                                       for i in range(len(snapshot.payload.chunk_offsets))]
                        return LoadedSnapshot(snapshot.snapshot_id, snapshot.payload, image, record.offset, read)
                    log.warning("snapshot %s of partition %d is incomplete; looking for an older one",
                                snapshot.snapshot_id, partition)
                stop = start
                window = min(window * 4, 4096)
            return None
        finally:
            await stop_shielded(consumer)

    def _decode(self, record: ConsumerRecord[bytes, bytes]) -> m.Snapshot | None:
        if record.value is None:
            return None  # a tombstone
        try:
            return SNAPSHOTS.decode(record.value, RecordPosition(self.topic, record.partition, record.offset))
        except DecodeError as error:
            log.error("skipping a snapshot record: %s", error)
            return None

    async def _chunks(self, consumer: AIOKafkaConsumer, tp: TopicPartition, manifest: m.Snapshot,
                      manifest_offset: int) -> tuple[PartitionImage | None, int]:
        offsets = manifest.payload.chunk_offsets  # type: ignore[union-attr]
        if not offsets:
            return PartitionImage([], []), 0
        wanted = dict(zip(offsets, range(len(offsets))))
        records = await _read_range(consumer, tp, offsets[0], manifest_offset)
        found: dict[int, m.SnapshotChunk] = {}
        size = 0
        for record in records:
            if record.offset not in wanted:
                continue
            size += max(record.serialized_value_size, 0)
            snapshot = self._decode(record)
            if (snapshot is not None and snapshot.snapshot_id == manifest.snapshot_id
                    and isinstance(snapshot.payload, m.SnapshotChunk) and snapshot.payload.index == wanted[record.offset]):
                found[snapshot.payload.index] = snapshot.payload
        if len(found) != len(offsets):
            return None, size
        opened, closed, schedules = [], [], []
        for index in range(len(offsets)):
            opened.extend(open_image(record) for record in found[index].open_executions)
            closed.extend(closed_state(record) for record in found[index].closed_executions)
            schedules.extend(schedule_state(record) for record in found[index].schedules)
        return PartitionImage(opened, closed, schedules), size


async def _read_range(consumer: AIOKafkaConsumer, tp: TopicPartition, start: int,
                      stop: int) -> list[ConsumerRecord[bytes, bytes]]:
    """The records of `tp` at offsets start <= offset < stop (gaps of a compacted topic allowed)."""
    consumer.seek(tp, start)
    records: list[ConsumerRecord[bytes, bytes]] = []
    while await consumer.position(tp) < stop:
        batches = await consumer.getmany(tp, timeout_ms=200)
        for record in batches.get(tp, []):
            if record.offset >= stop:
                return records
            records.append(record)
    return records


# ---------------------------------------------------------------- recovery


@dataclass
class Recovery:
    """A partition's state, as recovered."""

    engine: PartitionEngine
    #: Every command up to this commands offset is decided (the log's tf.durable).
    durable: int
    #: The events partition's end when it was read: the next event gets this offset.
    events_end: int
    #: Events folded after the snapshot (all of the partition's without one).
    tail_events: int
    snapshot: LoadedSnapshot | None = None


async def recover_partition(settings: KafkaSettings, partition: int, now: datetime,
                            store: SnapshotStore | None, closed_retention: timedelta,
                            on_record: Callable[[Any], None] | None = None) -> Recovery:
    """The latest snapshot of `partition` plus the events after it (the whole partition
    when there is no usable snapshot); `on_record` sees each raw event record read."""
    events_tp = TopicPartition(settings.topics.events, partition)
    events_end = (await end_offsets(settings, [events_tp]))[events_tp]
    loaded = await store.latest(partition) if store is not None else None
    if loaded is not None and (loaded.manifest.events_offset > events_end
                               or loaded.manifest.partitions != settings.partitions):
        log.warning("ignoring snapshot %s of partition %d: it covers events up to offset %d of %d partitions, the "
                    "events topic ends at %d with %d (topics recreated?); folding the whole partition",
                    loaded.snapshot_id, partition, loaded.manifest.events_offset, loaded.manifest.partitions,
                    events_end, settings.partitions)
        loaded = None
    start = loaded.manifest.events_offset if loaded is not None else 0
    durable = DurableUpTo(loaded.manifest.durable_offset if loaded is not None else -1)
    def accept(record: Any) -> bool:
        if on_record is not None:
            on_record(record)
        return durable.see(record)

    reader = EventReader(settings, [partition], accept=accept, start_offsets={partition: start},
                         stop_offsets={partition: events_end})
    tail = [item.event async for item in reader]
    if loaded is not None:
        engine = PartitionEngine.restore(partition, loaded.image, tail, now, closed_retention)
    else:
        engine = PartitionEngine(partition, closed_retention)
        engine.replay(tail, now)
    return Recovery(engine, durable.offset, events_end, len(tail), loaded)
