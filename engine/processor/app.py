"""The stream processor: a faust app around `PartitionEngine`.

It consumes `<prefix>.commands` in batches, decides each command, appends the
events to `<prefix>.events` (its single writer), answers clients on
`<prefix>.replies`, and dispatches tasks to `<prefix>.tasks.<queue>` or, for the
queues it hosts itself, to an in-process `TaskRunner`. It also owns time: a clock
loop ticks the partitions whose timers, timeouts or backoffs are due.

State is the fold of the events topic: when it is given a partition, the processor
loads the partition's latest snapshot and folds the events after it before deciding
anything there, and it snapshots each partition periodically (`snapshots.py`; a
faust Table changelog would be a second copy of the state written without
transactions, which Tansu lacks, so it could disagree with the log).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiokafka import AIOKafkaProducer

from treeflow.kafka import KafkaSettings, partition_for
from treeflow.schemas import COMMANDS, EVENTS, REPLIES, TASKS, Command, DecodeError, Event, RecordPosition

from ..ids import new_id
from ..worker.runner import TaskRunner
from .engine import Dispatch, Effects, PartitionEngine
from .faust_app import ProcessorApp
from .snapshots import DURABLE_HEADER, SnapshotOptions, SnapshotStore, recover_partition

log = logging.getLogger(__name__)

#: How often the clock loop looks for due timers, timeouts and backoffs.
CLOCK_INTERVAL = 0.01
BATCH_SIZE = 1000


@dataclass
class ProcessorStats:
    commands: int = 0
    events: int = 0
    undecodable: int = 0
    misrouted: int = 0
    local_tasks: int = 0
    remote_tasks: int = 0
    recovered_events: int = 0
    #: Commands read again after a lost offset commit, skipped (already decided).
    redelivered: int = 0
    #: Partitions recovered from a snapshot (the rest from the whole events partition).
    recovered_from_snapshot: int = 0
    snapshots_written: int = 0
    snapshot_bytes: int = 0
    #: Snapshots not written because another writer's events were in the partition.
    snapshots_skipped: int = 0
    #: Closed executions forgotten after the retention.
    evicted: int = 0
    #: Seconds spent reading and folding partitions given to this processor (snapshot + tail).
    recovery_seconds: float = 0.0


@dataclass
class _PartitionLog:
    """What this processor appended to one events partition since it recovered it."""

    #: The partition's end when it was recovered.
    base: int
    appended: int = 0
    last: asyncio.Future[Any] | None = None
    #: `appended` when the last snapshot was taken (None: none since the recovery).
    snapshotted: int | None = None
    snapshotted_at: float = 0.0
    changed: bool = False


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Processor:
    """Runs the processor for `settings`; `runner` hosts `local_queues` in this process."""

    def __init__(self, settings: KafkaSettings, *, runner: TaskRunner | None = None,
                 local_queues: Iterable[str] = (), app_id: str | None = None,
                 snapshots: SnapshotOptions | None = None) -> None:
        self.settings = settings
        self.snapshot_options = snapshots or SnapshotOptions.from_env()
        self._snapshots: SnapshotStore | None = None
        self._logs: dict[int, _PartitionLog] = {}
        self.runner = runner
        self.local_queues = frozenset(local_queues) if runner else frozenset()
        self.stats = ProcessorStats()
        self.engines: dict[int, PartitionEngine] = {}
        self._ready: dict[int, asyncio.Event] = {}
        #: Per commands partition: every command up to this offset has its events in the log.
        self._durable: dict[int, int] = {}
        self._lock = asyncio.Lock()
        self._local: asyncio.Queue[Command] = asyncio.Queue()
        self._background: set[asyncio.Task[Any]] = set()
        self._producer: AIOKafkaProducer | None = None
        self._last_publish: asyncio.Task[None] | None = None
        self._last_queued: asyncio.Future[None] | None = None
        self.failed: BaseException | None = None
        self._app = self._make_app(app_id or f"{settings.topic_prefix}-processor")
        self.started = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    def _make_app(self, app_id: str) -> ProcessorApp:
        profile = self.settings.profile
        app = ProcessorApp(
            app_id,
            broker=[f"kafka://{server}" for server in self.settings.bootstrap_servers.split(",")],
            store="memory://",
            web_enabled=False,
            topic_allow_declare=False,
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=profile.session_timeout_ms / 1000,
            broker_heartbeat_interval=profile.heartbeat_interval_ms / 1000,
            broker_max_poll_records=BATCH_SIZE,
            broker_commit_interval=1.0,
            stream_buffer_maxsize=4 * BATCH_SIZE,
        )
        app.treeflow_fetch_max_wait_ms = profile.fetch_max_wait_ms
        topic = app.topic(self.settings.topics.commands, key_serializer="raw", value_serializer="raw")

        async def consume(stream: Any) -> None:
            async for batch in stream.take_events(BATCH_SIZE, within=0.001):
                # A command's offset may be committed only once its events are in the
                # log: hold one reference to each message (take_events drops its own
                # after this body) and release it when the events are acknowledged.
                messages = [event.message for event in batch]
                for message in messages:
                    message.incref()
                await self._handle([(m.partition, m.offset, e.value) for m, e in zip(messages, batch)],
                                   functools.partial(self._release, messages, app.consumer))

        app.agent(topic, name="treeflow-commands")(consume)
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_partitions_revoked.connect(self._on_revoked)
        return app

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap_servers,
                                          max_request_size=16 * 1024 * 1024,
                                          **self.settings.profile.producer_options())
        await self._producer.start()
        if self.snapshot_options.interval > 0 and await SnapshotStore.exists(self.settings):
            self._snapshots = SnapshotStore(self.settings, self._producer, self.snapshot_options)
        elif self.snapshot_options.interval > 0:
            log.warning("topic %s is missing (create it with `treeflow topics create`): partitions are recovered "
                        "from the whole events log and no snapshots are taken", self.settings.topics.snapshots)
        for coroutine in (self._clock(), self._local_loop(), self._housekeeping()):
            self._spawn(coroutine)
        await self._app.start()

    async def stop(self) -> None:
        if self._last_publish is not None:
            await asyncio.gather(self._last_publish, return_exceptions=True)
        await self._app.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._producer is not None:
            await self._producer.stop()

    async def wait_assigned(self, timeout: float = 60) -> None:
        """Wait until this processor owns partitions and has recovered them."""
        await asyncio.wait_for(self.started.wait(), timeout)

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------ partitions

    async def _on_assigned(self, sender: Any, assigned: set[Any], **_: Any) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == self.settings.topics.commands}
        async with self._lock:
            for partition in set(self.engines) - mine:
                self._forget(partition)
            new = sorted(mine - set(self.engines))
            for partition in new:
                self._ready[partition] = asyncio.Event()
            for partition in new:
                began = asyncio.get_running_loop().time()
                recovery = await recover_partition(self.settings, partition, utc_now(), self._snapshots,
                                                   self.snapshot_options.closed_retention)
                self.stats.recovery_seconds += asyncio.get_running_loop().time() - began
                engine = recovery.engine
                self._durable[partition] = recovery.durable
                self._logs[partition] = _PartitionLog(recovery.events_end,
                                                      snapshotted=0 if recovery.tail_events == 0 else None)
                self.stats.recovered_events += recovery.tail_events
                self.stats.recovered_from_snapshot += recovery.snapshot is not None
                self.engines[partition] = engine
                self._ready[partition].set()
                log.info("partition %d recovered from %s and %d events after it: %d executions", partition,
                         f"snapshot at events offset {recovery.snapshot.manifest.events_offset}"
                         if recovery.snapshot else "no snapshot", recovery.tail_events, len(engine.states))
                await self._dispatch(engine.redispatch_all(utc_now()))
        if mine:
            self.started.set()

    async def _on_revoked(self, sender: Any, revoked: set[Any], **_: Any) -> None:
        async with self._lock:
            for tp in revoked:
                if tp.topic == self.settings.topics.commands:
                    self._forget(tp.partition)

    async def _recovered(self, partitions: set[int]) -> None:
        """Wait until these partitions' state has been read back from the log."""
        for partition in partitions:
            ready = self._ready.get(partition)
            if ready is not None:
                await ready.wait()

    def _release(self, messages: list[Any], consumer: Any) -> None:
        """These commands' events are in the log: let faust commit their offsets."""
        for message in messages:
            message.ack(consumer)
            if message.partition in self._durable:
                self._durable[message.partition] = max(self._durable[message.partition], message.offset)

    def _forget(self, partition: int) -> None:
        self.engines.pop(partition, None)
        self._ready.pop(partition, None)
        self._durable.pop(partition, None)
        self._logs.pop(partition, None)

    # ------------------------------------------------------------ commands

    async def _handle(self, records: list[tuple[int, int, bytes]], on_durable: Callable[[], None]) -> None:
        topic = self.settings.topics.commands
        await self._recovered({p for p, _, _ in records})
        commands = []
        for partition, offset, value in records:
            if offset <= self._durable.get(partition, -1):
                # Decided before, and its offset commit was lost: a rejection leaves no
                # event to dedupe it by, so the log's record of durable offsets does.
                self.stats.redelivered += 1
                continue
            try:
                command = COMMANDS.decode(value, RecordPosition(topic, partition, offset))
            except DecodeError as error:
                self.stats.undecodable += 1
                log.error("skipping an undecodable command: %s", error)
                continue
            commands.append((partition, command))
        await self._decide(commands, on_durable)

    async def _local_loop(self) -> None:
        """Reports of the in-process runner: decided like commands, without the round trip."""
        while True:
            commands = [await self._local.get()]
            while not self._local.empty() and len(commands) < BATCH_SIZE:
                commands.append(self._local.get_nowait())
            partitions = self.settings.partitions
            await self._decide([(partition_for(c.root_workflow_exec_id, partitions), c) for c in commands])

    async def _decide(self, commands: list[tuple[int, Command]],
                      on_durable: Callable[[], None] | None = None) -> None:
        """Decide `commands`; `on_durable` runs once the events they caused are in the log."""
        if not commands:
            if on_durable is not None:
                on_durable()
            return
        await self._recovered({p for p, _ in commands})
        async with self._lock:
            now = utc_now()
            results: list[tuple[int, Effects]] = []
            for partition, command in commands:
                engine = self.engines.get(partition)
                if engine is None:
                    log.warning("dropping a command for partition %d, which this processor no longer owns", partition)
                    continue
                if command.root_workflow_exec_id and partition_for(
                        command.root_workflow_exec_id, self.settings.partitions) != partition:
                    self.stats.misrouted += 1
                    log.error("skipping command %s: keyed for another partition than %d (root %s)",
                              command.command_id, partition, command.root_workflow_exec_id)
                    continue
                results.append((partition, engine.handle(command, now)))
                self.stats.commands += 1
            await self._publish(results, on_durable)

    async def _clock(self) -> None:
        while True:
            await asyncio.sleep(CLOCK_INTERVAL)
            now = utc_now()
            due = [engine for engine in self.engines.values()
                   if (wake := engine.next_wakeup()) is not None and wake <= now]
            if not due:
                continue
            async with self._lock:
                results = [(engine.partition, engine.tick(utc_now(), f"tick-{new_id()}"))
                           for engine in due if engine.partition in self.engines]
                await self._publish(results)

    # ------------------------------------------------------------ output

    async def _publish(self, results: list[tuple[int, Effects]], on_durable: Callable[[], None] | None = None) -> None:
        """Append the events; then, once the broker has them, send replies and remote tasks.

        Tasks for queues hosted in this process run at once: their reports are decided
        after these events in any case, and if the process dies before the events are
        durable, the work dies with it and is dispatched again after recovery. Nothing
        leaves the process (a reply, a task for another worker) before the events it
        depends on are acknowledged. A failed append stops the processor: its state
        would no longer be the fold of the log.
        """
        assert self._producer is not None
        topics = self.settings.topics
        appended = []
        by_partition: dict[int, list[Event]] = {}
        for partition, effects in results:
            by_partition.setdefault(partition, []).extend(effects.events)
        for partition, events in by_partition.items():
            appended.extend(await self._append(partition, events))
            self.stats.events += len(events)
        outgoing: list[tuple[str, bytes, bytes, int | None, list[tuple[str, bytes]]]] = []
        for partition, effects in results:
            for reply in effects.replies:
                headers = [("tf.command", reply.command_id.encode())]
                if reply.closing_event is not None:
                    headers.append(("tf.closed", reply.workflow_exec_id.encode()))
                outgoing.append((topics.replies, REPLIES.encode(reply), reply.root_workflow_exec_id.encode(),
                                 self._reply_partition(effects, reply, partition), headers))
            for dispatch in effects.dispatches:
                if dispatch.item.task_queue in self.local_queues:
                    self.stats.local_tasks += 1
                    self._run_locally(dispatch)
                else:
                    self.stats.remote_tasks += 1
                    outgoing.append((topics.tasks(dispatch.item.task_queue), TASKS.encode(dispatch.task),
                                     dispatch.context.root_workflow_exec_id.encode(), None, []))
        if appended or outgoing:
            previous = self._last_queued
            self._last_queued = asyncio.get_running_loop().create_future()
            self._last_publish = self._spawn(self._deliver(previous, self._last_queued, appended, outgoing,
                                                           on_durable))
        elif on_durable is not None:
            on_durable()

    def _reply_partition(self, effects: Effects, reply: Any, partition: int) -> int:
        """Where the client reads (it names its replies partition), else the root's partition."""
        route = effects.routes.get(reply.command_id)
        if route is None or not 0 <= route < self.settings.partitions:
            return partition if partition >= 0 else partition_for(reply.root_workflow_exec_id, self.settings.partitions)
        return route

    async def _append(self, partition: int, events: list[Event]) -> list[Any]:
        """Queue events for one partition; the producer coalesces them into batches.

        Each carries `tf.durable`: the commands offset of its partition up to which every
        command's events are in the log, so that a processor recovering the partition
        does not decide those again.
        """
        assert self._producer is not None
        futures = []
        durable = str(self._durable.get(partition, -1)).encode()
        for event in events:
            context = event.workflow_context
            futures.append(await self._producer.send(
                self.settings.topics.events, EVENTS.encode(event), key=context.root_workflow_exec_id.encode(),
                partition=partition,
                headers=[("tf.type", event.event_type.value.encode()), ("tf.exec", context.workflow_exec_id.encode()),
                         (DURABLE_HEADER, durable)]))
        written = self._logs.get(partition)
        if written is not None and futures:
            written.appended += len(futures)
            written.last = futures[-1]
        return futures

    async def _deliver(self, previous: asyncio.Future[None] | None, queued: asyncio.Future[None], appended: list[Any],
                       outgoing: list[tuple[str, bytes, bytes, int | None, list[tuple[str, bytes]]]],
                       on_durable: Callable[[], None] | None) -> None:
        """Once `appended` are acknowledged, queue `outgoing` after the previous decision's
        (`previous` resolves when those are queued; the producer keeps that order)."""
        assert self._producer is not None
        try:
            await asyncio.gather(*appended)
            if on_durable is not None:
                on_durable()
            if previous is not None:
                await previous
            sent = [await self._producer.send(topic, value, key=key, partition=partition, headers=headers)
                    for topic, value, key, partition, headers in outgoing]
            queued.set_result(None)
            await asyncio.gather(*sent)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.critical("appending to the log failed (%r): stopping the processor; restart it to recover", exc)
            self.failed = exc
            self._spawn(self._app.stop())
            raise

    # ------------------------------------------------------------ snapshots and retention

    async def _housekeeping(self) -> None:
        """Forget closed executions after the retention; snapshot partitions that changed."""
        options = self.snapshot_options
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(options.check_every)
            now = utc_now()
            due = []
            async with self._lock:
                for partition, engine in self.engines.items():
                    written = self._logs.get(partition)
                    evicted = engine.evict_closed(now)
                    self.stats.evicted += evicted
                    if written is None:
                        continue
                    written.changed |= evicted > 0 or written.appended != written.snapshotted
                    if (self._snapshots is not None and written.changed
                            and loop.time() - written.snapshotted_at >= options.interval):
                        # Captured under the lock: no command is half decided.
                        due.append((partition, engine.export(), written, written.appended, written.last,
                                    self._durable.get(partition, -1)))
            for partition, image, written, appended, last, durable in due:
                await self._snapshot(partition, image, written, appended, last, durable, now)

    async def _snapshot(self, partition: int, image: Any, written: _PartitionLog, appended: int,
                        last: asyncio.Future[Any] | None, durable: int, now: datetime) -> None:
        assert self._snapshots is not None
        offset = written.base + appended
        try:
            if last is not None and (await last).offset != offset - 1:
                # Another writer's records sit among ours: the state is not the fold of the
                # events below `offset` (a zombie owner during a rebalance; recovery folds them).
                self.stats.snapshots_skipped += 1
                log.warning("not snapshotting partition %d: events from another writer are in it", partition)
                written.snapshotted_at = asyncio.get_running_loop().time()
                return
            result = await self._snapshots.write(partition, image, events_offset=offset, durable_offset=durable,
                                                 taken_at=now)
        except Exception as exc:  # a snapshot is an optimisation: the log is intact
            log.error("snapshot of partition %d failed (%r); will retry", partition, exc)
            return
        written.snapshotted, written.changed = appended, False
        written.snapshotted_at = asyncio.get_running_loop().time()
        self.stats.snapshots_written += 1
        self.stats.snapshot_bytes += result.bytes
        log.info("snapshot of partition %d at events offset %d: %d open, %d closed executions, %d bytes in %d "
                 "chunk(s)", partition, offset, len(image.open), len(image.closed), result.bytes, result.chunks)

    async def _dispatch(self, dispatches: list[Dispatch]) -> None:
        """Dispatch work outside a decision (after a recovery)."""
        await self._publish([(-1, Effects(dispatches=dispatches))])

    def _run_locally(self, dispatch: Dispatch) -> None:
        runner = self.runner
        assert runner is not None
        if dispatch.history is not None:
            self._local.put_nowait(runner.run_workflow_task(dispatch.context, dispatch.task.task_id,
                                                            dispatch.history))
            return
        if dispatch.item.kind == "query":
            self._local.put_nowait(runner.run_query_task(dispatch.context, dispatch.task.payload))
            return

        async def run_activity() -> None:
            result = await runner.run_activity_task(dispatch.context, dispatch.task.payload, self._send_local)
            await self._local.put(result)

        self._spawn(run_activity())

    async def _send_local(self, command: Command) -> None:
        await self._local.put(command)
