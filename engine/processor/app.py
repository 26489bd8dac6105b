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

Recovering a partition (`_recover`) goes in this order: note the end of its commands
partition (the backlog that was waiting), load its snapshot and fold the events after
it, decide that backlog, and only then re-dispatch what is pending and let the clock
decide time-based things for it (`_resume`). A report that waited through an outage is
therefore decided before its task is sent again or timed out (DESIGN §5 invariants 5 and 6).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from treeflow.kafka import (
    KafkaSettings,
    TopicsResetError,
    adopt_partitions,
    clients,
    end_offsets,
    ensure_topics,
    partition_for,
    watch_topics,
)
from treeflow.schemas import COMMANDS, EVENTS, REPLIES, TASKS, Command, DecodeError, Event, RecordPosition
from treeflow.schemas import confluent
from treeflow.schemas.models import Tick

from ..deadlines import processor_group
from ..ids import new_id
from ..observability import heap, metrics, tracing
from ..worker.runner import TaskRunner
from .clock import SYSTEM_CLOCK, Clock
from .engine import Dispatch, Effects, PartitionEngine
from .faust_app import ProcessorApp
from .snapshots import DURABLE_HEADER, SnapshotOptions, SnapshotStore, recover_partition

log = logging.getLogger(__name__)

#: How often the clock loop looks for due timers, timeouts and backoffs.
CLOCK_INTERVAL = 0.01
BATCH_SIZE = 1000
#: How often a partition whose backlog is not decided yet checks the group's committed
#: offset again (a safety net: the backlog normally ends with its last record).
BACKLOG_RECHECK = 2.0
#: How long commands wait for their partition's recovery before each warning that says so.
RECOVERY_WAIT_WARNING = 10.0


@dataclass
class ProcessorStats:
    commands: int = 0
    events: int = 0
    undecodable: int = 0
    misrouted: int = 0
    local_tasks: int = 0
    remote_tasks: int = 0
    recovered_events: int = 0
    #: Passes that decided commands taken from the commands topic (`treeflow_command_batch_size`).
    command_batches: int = 0
    #: Commands read again after a lost offset commit, skipped (already decided).
    redelivered: int = 0
    #: Commands taken before a rebalance (another consumer generation) or for a partition
    #: this processor no longer owns: left unacknowledged, for the owner to read again.
    reassigned: int = 0
    #: Commands that were waiting in a partition's backlog when it was recovered.
    backlog: int = 0
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


class Processor:
    """Runs the processor for `settings`; `runner` hosts `local_queues` in this process.

    `clock` is where it reads the time (`treeflow.processor.clock`; the system's clock
    by default): every decision time, so every timer, timeout, backoff and retention.
    """

    def __init__(self, settings: KafkaSettings, *, runner: TaskRunner | None = None,
                 local_queues: Iterable[str] = (), app_id: str | None = None,
                 snapshots: SnapshotOptions | None = None, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SYSTEM_CLOCK
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
        #: Per recovering partition: the commands offset its backlog ends at (exclusive).
        self._backlog: dict[int, int] = {}
        #: Per partition: the highest commands offset read (decided or skipped).
        self._read: dict[int, int] = {}
        self._lock = asyncio.Lock()
        #: Commands taken from the topic and not yet decided (message, value), oldest first.
        self._taken: list[tuple[Any, bytes]] = []
        self._arrived = asyncio.Event()
        #: Cleared while `_taken` is full: the agent waits for room.
        self._room = asyncio.Event()
        self._room.set()
        self._local: asyncio.Queue[Command] = asyncio.Queue()
        #: Batches of commands being decided now (for `idle`).
        self._busy = 0
        #: Activity attempts running in-process (for `idle`).
        self._local_runs: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._producer: AIOKafkaProducer | None = None
        #: Sends what leaves once its events are acknowledged (replies, tasks). A producer
        #: of its own: aiokafka keeps one produce request in flight per broker, so on the
        #: events' producer a reply would wait behind the next decision's append.
        self._sender: AIOKafkaProducer | None = None
        self._last_publish: asyncio.Task[None] | None = None
        self._last_queued: asyncio.Future[None] | None = None
        self.failed: BaseException | None = None
        # faust wants a data directory (the tables live in memory): a temporary one, removed
        # on stop, so that no `<id>-data/` folder is left in the working directory.
        self._datadir = tempfile.TemporaryDirectory(prefix="treeflow-processor-")
        #: Set when the processor stopped by itself (`failed` says why).
        self.halted = asyncio.Event()
        self._app_stop: asyncio.Future[None] | None = None
        #: Task queues whose topic is known to exist.
        self._queues: set[str] = set()
        #: Per commands partition: the next offset to take (for `treeflow_consumer_lag`).
        self._next_offsets: dict[int, int] = {}
        #: Whether the group has given this processor its partitions (possibly none) at least once.
        self.assignment_seen = False
        #: Run spans and each execution's trace context, when tracing is on (see `start`).
        self._traces: tracing.RunSpans | None = None
        #: The trace context of commands waiting to be decided, by command id.
        self._command_traces: dict[str, bytes] = {}
        #: How events are written: single-object encoding, or Confluent's format with a registry.
        self._encode_event: Callable[[Event], bytes] = EVENTS.encode
        self._app = self._make_app(app_id or processor_group(settings))
        self.started = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    def _make_app(self, app_id: str) -> ProcessorApp:
        profile = self.settings.profile
        app = ProcessorApp(
            app_id,
            broker=[f"kafka://{server}" for server in self.settings.bootstrap_servers.split(",")],
            store="memory://",
            datadir=self._datadir.name,
            web_enabled=False,
            topic_allow_declare=False,
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=profile.session_timeout_ms / 1000,
            broker_heartbeat_interval=profile.heartbeat_interval_ms / 1000,
            broker_max_poll_records=BATCH_SIZE,
            broker_commit_interval=1.0,
            stream_buffer_maxsize=4 * BATCH_SIZE,
            **clients.faust_options(self.settings, "processor"),
        )
        app.treeflow_profile = profile
        topic = app.topic(self.settings.topics.commands, key_serializer="raw", value_serializer="raw")

        async def consume(stream: Any) -> None:
            # The agent only takes commands; `_decide_taken` decides whatever has arrived
            # each time it is free, so a batch forms while the previous one is decided,
            # with no timer to wait for (faust's `take_events` polls every `within`).
            async for event in stream.events():
                # A command's offset may be committed only once its events are in the
                # log: hold one reference to each message (the stream drops its own
                # after this body) and release it when the events are acknowledged.
                event.message.incref()
                self._taken.append((event.message, event.value))
                if len(self._taken) >= BATCH_SIZE:
                    self._arrived.set()
                    self._room.clear()
                    await self._room.wait()
                elif not app.treeflow_handing_over:
                    # faust hands a fetch's records over one at a time: the rest of this
                    # one's are decided with it (`_on_handed_over`).
                    self._arrived.set()

        app.agent(topic, name="treeflow-commands")(consume)
        app.treeflow_handed_over = self._on_handed_over
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_partitions_revoked.connect(self._on_revoked)
        return app

    async def start(self) -> None:
        self.settings = await adopt_partitions(self.settings, "processor")
        self._traces = tracing.RunSpans() if tracing.enabled() else None
        schema_registry = confluent.from_environment()
        if schema_registry is not None:
            schema_id = await asyncio.to_thread(EVENTS.register, schema_registry, self.settings.topics.events)
            self._encode_event = functools.partial(EVENTS.encode_confluent, schema_id=schema_id)
        self._producer = await clients.start(clients.producer(self.settings, "processor",
                                                              max_request_size=16 * 1024 * 1024), self.settings)
        self._sender = await clients.start(clients.producer(self.settings, "processor-sender",
                                                            max_request_size=16 * 1024 * 1024), self.settings)
        if self.snapshot_options.interval > 0 and await SnapshotStore.exists(self.settings):
            self._snapshots = SnapshotStore(self.settings, self._producer, self.snapshot_options)
        elif self.snapshot_options.interval > 0:
            log.warning("topic %s is missing (create it with `treeflow topics create`): partitions are recovered "
                        "from the whole events log and no snapshots are taken", self.settings.topics.snapshots)
        for coroutine in (self._clock(), self._local_loop(), self._decide_taken(), self._watch_topics(),
                          self._housekeeping()):
            self._spawn(coroutine)
        if (probe_every := heap.interval_from_env()) > 0:
            self._spawn(heap.run(probe_every))
        for gauge, source in self._metric_sources():
            gauge.add(source)
        await self._app.start()

    async def stop(self) -> None:
        if self._last_publish is not None:
            await asyncio.gather(self._last_publish, return_exceptions=True)
        await self._stop_app()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for producer in (self._sender, self._producer):
            if producer is not None:
                await producer.stop()
        for gauge, source in self._metric_sources():
            gauge.remove(source)
        self._datadir.cleanup()

    async def _watch_topics(self) -> None:
        """Stop the processor when its topics vanish (deleted, a restarted embedded broker)."""
        topics = self.settings.topics
        try:
            await watch_topics(self.settings, [topics.commands, topics.events, topics.replies], "processor")
        except TopicsResetError as exc:
            log.critical("%s", exc)
            self._app.treeflow_halted = True  # commits to vanished topics would retry forever
            self._halt(exc)

    def _halt(self, failure: BaseException) -> None:
        """Stop by itself: its state may no longer be the fold of the log (`liveness` says why)."""
        self.failed = failure
        self.halted.set()
        self._stop_app()

    def _stop_app(self) -> asyncio.Future[None]:
        """Stop the faust app once; every caller waits for the same stop (a second
        `App.stop()` returns at once, and cancelling the first would leave faust's
        consumer thread running)."""
        if self._app_stop is None:
            self._app_stop = asyncio.ensure_future(self._app.stop())
        return self._app_stop

    async def wait_assigned(self, timeout: float = 60) -> None:
        """Wait until this processor owns partitions and has recovered them."""
        await asyncio.wait_for(self.started.wait(), timeout)

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------ what is left to do (time-skipping tests)

    def next_wakeup(self) -> datetime | None:
        """The earliest time at which the clock has something to decide here (a timer, a
        timeout, a backoff), or None (wakeups that would wake nothing are dropped first)."""
        wakes = []
        for engine in list(self.engines.values()):
            engine.prune_wakeups()
            if (wake := engine.next_wakeup()) is not None:
                wakes.append(wake)
        return min(wakes, default=None)

    def idle(self) -> bool:
        """True when nothing moves here but the clock: the partitions are recovered, no
        command is being decided or waits in the in-process queue, no event, reply or
        task is on its way out, no activity runs in-process, and every task handed to a
        worker (here or elsewhere) has its report decided. Commands still in the commands
        topic are not seen here: compare `positions()` with the topic's end."""
        return (self.assignment_seen and self._busy == 0 and not self._taken and not self._lock.locked()
                and self._local.empty()
                and not self._local_runs and (self._last_publish is None or self._last_publish.done())
                and not self._backlog and all(ready.is_set() for ready in self._ready.values())
                and not any(engine.outstanding() for engine in list(self.engines.values())))

    def positions(self) -> dict[int, int]:
        """Per commands partition owned: the offset of the next command to read."""
        return dict(self._next_offsets)

    # ------------------------------------------------------------ health and metrics

    def liveness(self) -> str | None:
        """None while the processor works; why not once it stopped by itself (a failed append
        or decision)."""
        if self.failed is not None:
            return f"the processor stopped ({self.failed!r}); restart it"
        return None

    def readiness(self) -> str | None:
        """None once the group gave this processor its partitions and every one is recovered."""
        if not self.assignment_seen:
            return "waiting for the consumer group to assign partitions"
        recovering = sorted(p for p, ready in self._ready.items() if not ready.is_set())
        if recovering:
            return f"recovering partitions {recovering}"
        return None

    def _metric_sources(self) -> list[tuple[metrics.SourcedGauge, metrics.Source]]:
        return [(metrics.CONSUMER_LAG, self._lag), (metrics.OPEN_EXECUTIONS, self._open_executions),
                (metrics.PARTITIONS, self._partition_states)]

    def _lag(self) -> dict[tuple[str, ...], float]:
        topic = self.settings.topics.commands
        try:
            consumer = self._app.consumer
        except Exception:  # noqa: BLE001 - not started yet
            return {}
        lag: dict[tuple[str, ...], float] = {}
        for partition, next_offset in list(self._next_offsets.items()):
            try:
                highwater = consumer.highwater(TopicPartition(topic, partition))
            except Exception:  # noqa: BLE001 - the consumer is between assignments
                continue
            if highwater is not None:
                lag[("processor", topic, str(partition))] = max(highwater - next_offset, 0)
        return lag

    def _open_executions(self) -> dict[tuple[str, ...], float]:
        counts: dict[tuple[str, ...], float] = {}
        for engine in list(self.engines.values()):
            for state in list(engine.states.values()):
                if state.open:
                    key = (state.context.task_queue,)
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def _partition_states(self) -> dict[tuple[str, ...], float]:
        ready = [event.is_set() for event in list(self._ready.values())]
        return {("recovered",): sum(ready), ("recovering",): len(ready) - sum(ready)}

    def _remember_traces(self, messages: list[Any]) -> None:
        """Keep the trace context of the commands that carry one, until they are decided."""
        for message in messages:
            traceparent = tracing.traceparent_of(message.headers)
            if traceparent is not None:
                try:
                    command_id = COMMANDS.decode(message.value).command_id
                except DecodeError:
                    continue
                self._command_traces[command_id] = traceparent

    def _recover_trace(self, record: Any) -> None:
        """Pick up an execution's trace context from an event read back on recovery."""
        assert self._traces is not None
        headers = dict(record.headers or ())
        traceparent, exec_id = headers.get(tracing.HEADER), headers.get("tf.exec")
        if traceparent is not None and exec_id is not None:
            self._traces.recovered(exec_id.decode(), traceparent)

    def _trace_headers(self, exec_id: str) -> list[tuple[str, bytes]]:
        header = self._traces.header(exec_id) if self._traces is not None else None
        return [(tracing.HEADER, header)] if header else []

    # ------------------------------------------------------------ partitions

    async def _on_assigned(self, sender: Any, assigned: set[Any], **_: Any) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == self.settings.topics.commands}
        async with self._lock:
            for partition in set(self.engines) - mine:
                self._forget(partition)
            new = sorted(mine - set(self.engines))
            for partition in new:
                self._replace_readiness(partition, asyncio.Event())
            if new and self._last_publish is not None:
                # A partition given back reads its events: those of decisions made before
                # the rebalance must be in it (or have failed, which halts the processor).
                await asyncio.gather(self._last_publish, return_exceptions=True)
            if new:
                # What is waiting in each commands partition now is its backlog.
                commands = [TopicPartition(self.settings.topics.commands, p) for p in new]
                ends = await end_offsets(self.settings, commands)
                committed = await self._committed(commands)
                for tp in commands:
                    await self._recover(tp, ends[tp], committed[tp])
        self.assignment_seen = True
        if mine:
            self.started.set()

    async def _recover(self, commands: TopicPartition, end: int, committed: int) -> None:
        """Fold the partition's events, then decide its backlog before anything else.

        The backlog is what was waiting in the commands partition when it was assigned:
        from the group's `committed` offset (or past the commands the log records as
        decided) to `end`, the partition's true end then. Until it is decided, the
        engine dispatches nothing and the clock skips it; `_resume` ends that.
        """
        partition = commands.partition
        began = time.perf_counter()
        recovery = await recover_partition(self.settings, partition, self.clock.now(), self._snapshots,
                                           self.snapshot_options.closed_retention,
                                           on_record=self._recover_trace if self._traces is not None else None)
        seconds = time.perf_counter() - began
        engine = recovery.engine
        engine.history_limit = self.snapshot_options.history_limit
        self._durable[partition] = recovery.durable
        self._logs[partition] = _PartitionLog(recovery.events_end,
                                              snapshotted=0 if recovery.tail_events == 0 else None)
        self.stats.recovered_events += recovery.tail_events
        self.stats.recovered_from_snapshot += recovery.snapshot is not None
        self.stats.recovery_seconds += seconds
        metrics.RECOVERED_EVENTS.inc(recovery.tail_events)
        metrics.RECOVERY_SECONDS.labels(str(partition)).set(seconds)
        self.engines[partition] = engine
        start = max(recovery.durable + 1, committed)
        self._next_offsets[partition] = start
        log.info("partition %d recovered from %s and %d events after it: %d executions; %d command(s) waiting",
                 partition, f"snapshot at events offset {recovery.snapshot.manifest.events_offset}"
                 if recovery.snapshot else "no snapshot", recovery.tail_events, len(engine.states),
                 max(0, end - start))
        self._read[partition] = start - 1
        self._backlog[partition] = end
        self.stats.backlog += max(0, end - start)
        self._ready[partition].set()
        if start >= end:
            await self._resume(partition)
        else:
            self._spawn(self._watch_backlog(partition, commands))

    async def _committed(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The processor group's committed offset of each partition (0 when none)."""
        admin = await clients.start(clients.admin(self.settings, "processor-offsets"), self.settings)
        try:
            offsets = await admin.list_consumer_group_offsets(self._app.conf.id, partitions=partitions)
        finally:
            await clients.stop(admin)
        found = {tp: meta.offset for tp, meta in offsets.items() if meta is not None and meta.offset >= 0}
        return {tp: found.get(tp, 0) for tp in partitions}

    async def _watch_backlog(self, partition: int, tp: TopicPartition) -> None:
        """Safety net: the backlog also ends when the group's committed offset passes it
        (commands a previous owner decided without an event, then committed)."""
        while partition in self._backlog:
            await asyncio.sleep(BACKLOG_RECHECK)
            end = self._backlog.get(partition)
            if end is None:
                return
            try:
                committed = (await self._committed([tp]))[tp]
            except Exception as exc:  # the next round asks again
                log.warning("could not read the committed offset of %s: %r", tp, exc)
                continue
            if committed >= end:
                self._read[partition] = max(self._read.get(partition, -1), committed - 1)
                async with self._lock:
                    await self._resume_caught_up([partition])

    async def _resume_caught_up(self, partitions: Iterable[int]) -> None:
        """Resume the recovering partitions among `partitions` whose backlog is decided."""
        for partition in partitions:
            end = self._backlog.get(partition)
            if end is not None and self._read.get(partition, -1) >= end - 1:
                await self._resume(partition)

    async def _resume(self, partition: int) -> None:
        """The backlog is decided: re-dispatch what is pending, let the clock tick it."""
        self._backlog.pop(partition, None)
        engine = self.engines.get(partition)
        if engine is not None and engine.recovering:
            await self._dispatch(engine.resume(self.clock.now()))

    async def _on_revoked(self, sender: Any, revoked: set[Any], **_: Any) -> None:
        async with self._lock:
            for tp in revoked:
                if tp.topic == self.settings.topics.commands:
                    self._forget(tp.partition)

    async def _recovered(self, partitions: set[int]) -> None:
        """Wait until these partitions' state has been read back from the log, or they are
        no longer this processor's. A rebalance that takes a partition away (and maybe gives
        it back) sets the readiness it replaces, so a wait never outlives its partition."""
        for partition in partitions:
            waited = 0.0
            while (ready := self._ready.get(partition)) is not None and not ready.is_set():
                waiting = asyncio.ensure_future(ready.wait())
                done, _ = await asyncio.wait([waiting], timeout=RECOVERY_WAIT_WARNING)
                if not done:
                    waiting.cancel()
                    waited += RECOVERY_WAIT_WARNING
                    log.warning("commands of partition %d have waited %.0f s for its recovery "
                                "(reading its events back)", partition, waited)

    def _release(self, messages: list[Any], consumer: Any, owners: dict[int, PartitionEngine]) -> None:
        """These commands' events are in the log: let faust commit their offsets, and record
        them as decided (`tf.durable`). Not those whose partition changed owner since they
        were taken up (`owners`): the partition's owner reads them again from the committed
        offset, and a decided one appends nothing the second time."""
        kept = {partition for partition, engine in owners.items() if self.engines.get(partition) is engine}
        for message in messages:
            if message.partition not in kept:
                continue
            message.ack(consumer)
            if message.partition in self._durable:
                self._durable[message.partition] = max(self._durable[message.partition], message.offset)

    def _replace_readiness(self, partition: int, ready: asyncio.Event | None) -> None:
        """Install `ready` (None: none) as the partition's readiness, waking whoever waits on
        the one it replaces (`_recovered` then looks again)."""
        previous = self._ready.pop(partition, None)
        if ready is not None:
            self._ready[partition] = ready
        if previous is not None:
            previous.set()

    def _forget(self, partition: int) -> None:
        engine = self.engines.get(partition)
        if engine is not None and self._traces is not None:
            self._traces.forget(list(engine.states))
        self.engines.pop(partition, None)
        self._replace_readiness(partition, None)
        self._durable.pop(partition, None)
        self._next_offsets.pop(partition, None)
        self._backlog.pop(partition, None)
        self._read.pop(partition, None)
        self._logs.pop(partition, None)

    # ------------------------------------------------------------ commands

    def _on_handed_over(self) -> None:
        if self._taken:
            self._arrived.set()

    async def _decide_taken(self) -> None:
        """Decide the commands the agent has taken, up to `BATCH_SIZE` at a time. A failure
        here stops the processor (its offsets stay uncommitted: a restart decides again)."""
        while True:
            await self._arrived.wait()
            batch, self._taken = self._taken[:BATCH_SIZE], self._taken[BATCH_SIZE:]
            if not self._taken:
                self._arrived.clear()
            self._room.set()
            partitions = {message.partition for message, _ in batch}
            await self._recovered(partitions)
            batch = self._owned(batch)
            if not batch:
                continue
            messages = [message for message, _ in batch]
            self.stats.command_batches += 1
            metrics.COMMAND_BATCH_SIZE.observe(len(batch))
            if self._traces is not None:
                self._remember_traces(messages)
            self._busy += 1
            owners = {partition: self.engines[partition] for partition in partitions if partition in self.engines}
            try:
                await self._handle([(m.partition, m.offset, value) for m, value in batch],
                                   functools.partial(self._release, messages, self._app.consumer, owners))
            except Exception as exc:
                log.critical("deciding commands failed (%r): stopping the processor; restart it to recover",
                             exc, exc_info=True)
                self._halt(exc)
                return
            finally:
                self._busy -= 1

    def _owned(self, batch: list[tuple[Any, bytes]]) -> list[tuple[Any, bytes]]:
        """The commands of `batch` this processor may decide: taken in the current consumer
        generation, for a partition it owns. The others are left unacknowledged, untouched:
        after a rebalance the consumer reads each partition again from its committed offset,
        so the owner gets them. Decided here, a command taken before the rebalance would
        mark later offsets decided (`tf.durable`) ahead of earlier ones read again."""
        generation = self._app.consumer_generation_id
        owned = [(message, value) for message, value in batch
                 if message.generation_id == generation and message.partition in self.engines]
        if len(owned) < len(batch):
            self.stats.reassigned += len(batch) - len(owned)
            metrics.COMMANDS_SKIPPED.labels("reassigned").inc(len(batch) - len(owned))
        return owned

    async def _handle(self, records: list[tuple[int, int, bytes]], on_durable: Callable[[], None]) -> None:
        """Decide commands read from the topic, of partitions recovered and owned (`_owned`)."""
        topic = self.settings.topics.commands
        commands = []
        next_offsets = self._next_offsets
        for partition, offset, value in records:
            next_offsets[partition] = offset + 1
            self._read[partition] = max(self._read.get(partition, -1), offset)
            if offset <= self._durable.get(partition, -1):
                # Decided before, and its offset commit was lost: a rejection leaves no
                # event to dedupe it by, so the log's record of durable offsets does.
                self.stats.redelivered += 1
                metrics.COMMANDS_SKIPPED.labels("redelivered").inc()
                continue
            try:
                command = COMMANDS.decode(value, RecordPosition(topic, partition, offset))
            except DecodeError as error:
                self.stats.undecodable += 1
                metrics.COMMANDS_SKIPPED.labels("undecodable").inc()
                log.error("skipping an undecodable command: %s", error)
                continue
            commands.append((partition, command))
        await self._decide(commands, on_durable)
        if self._backlog:
            async with self._lock:
                await self._resume_caught_up({p for p, _, _ in records})

    async def _local_loop(self) -> None:
        """Reports of the in-process runner: decided like commands, without the round trip."""
        while True:
            commands = [await self._local.get()]
            self._busy += 1
            try:
                while not self._local.empty() and len(commands) < BATCH_SIZE:
                    commands.append(self._local.get_nowait())
                partitions = self.settings.partitions
                await self._decide([(partition_for(c.root_workflow_exec_id, partitions), c) for c in commands])
            finally:
                self._busy -= 1

    async def _decide(self, commands: list[tuple[int, Command]],
                      on_durable: Callable[[], None] | None = None) -> None:
        """Decide `commands`; `on_durable` runs once the events they caused are in the log."""
        if not commands:
            if on_durable is not None:
                on_durable()
            return
        await self._recovered({p for p, _ in commands})
        async with self._lock:
            now = self.clock.now()
            results: list[tuple[int, Effects]] = []
            clock = time.perf_counter
            observe = metrics.DECISION_SECONDS.observe
            counter = metrics.command_counter
            for partition, command in commands:
                engine = self.engines.get(partition)
                if engine is None:
                    log.warning("dropping a command for partition %d, which this processor no longer owns", partition)
                    continue
                if command.root_workflow_exec_id and partition_for(
                        command.root_workflow_exec_id, self.settings.partitions) != partition:
                    self.stats.misrouted += 1
                    metrics.COMMANDS_SKIPPED.labels("misrouted").inc()
                    log.error("skipping command %s: keyed for another partition than %d (root %s)",
                              command.command_id, partition, command.root_workflow_exec_id)
                    continue
                began = clock()
                effects = engine.handle(command, now)
                observe(clock() - began)
                results.append((partition, effects))
                if self._traces is not None:
                    self._traces.observe(effects.events, self._command_traces.pop(command.command_id, None))
                counter(type(command.payload)).inc()
                self.stats.commands += 1
            await self._publish(results, on_durable)

    async def _clock(self) -> None:
        while True:
            await asyncio.sleep(CLOCK_INTERVAL)
            now = self.clock.now()
            due = [engine for engine in self.engines.values()
                   if (wake := engine.next_wakeup()) is not None and wake <= now]
            if not due:
                continue
            async with self._lock:
                results = []
                for engine in due:
                    if engine.partition in self.engines:
                        began = time.perf_counter()
                        effects = engine.tick(self.clock.now(), f"tick-{new_id()}")
                        metrics.DECISION_SECONDS.observe(time.perf_counter() - began)
                        results.append((engine.partition, effects))
                        if self._traces is not None:
                            self._traces.observe(effects.events, None)
                        metrics.command_counter(Tick).inc()
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
        began = time.perf_counter()
        topics = self.settings.topics
        appended = []
        by_partition: dict[int, list[Event]] = {}
        for partition, effects in results:
            by_partition.setdefault(partition, []).extend(effects.events)
        for partition, events in by_partition.items():
            appended.extend(await self._append(partition, events))
            self.stats.events += len(events)
            metrics.count_events(events)
        outgoing: list[tuple[str, bytes, bytes, int | None, list[tuple[str, bytes]]]] = []
        for partition, effects in results:
            for reply in effects.replies:
                headers = [("tf.command", reply.command_id.encode())]
                if reply.closing_event is not None:
                    headers.append(("tf.closed", reply.workflow_exec_id.encode()))
                outgoing.append((topics.replies, REPLIES.encode(reply), reply.root_workflow_exec_id.encode(),
                                 self._reply_partition(effects, reply, partition), headers))
            for dispatch in effects.dispatches:
                metrics.dispatch_counter((dispatch.item.task_queue, dispatch.item.kind)).inc()
                if dispatch.item.task_queue in self.local_queues:
                    self.stats.local_tasks += 1
                    self._run_locally(dispatch)
                else:
                    self.stats.remote_tasks += 1
                    await self._ensure_queue(dispatch.item.task_queue)
                    outgoing.append((topics.tasks(dispatch.item.task_queue), TASKS.encode(dispatch.task),
                                     dispatch.context.root_workflow_exec_id.encode(), None,
                                     self._trace_headers(dispatch.context.workflow_exec_id)))
        if self._traces is not None:
            self._traces.release()
        if appended or outgoing:
            previous = self._last_queued
            self._last_queued = asyncio.get_running_loop().create_future()
            self._last_publish = self._spawn(self._deliver(previous, self._last_queued, appended, outgoing,
                                                           on_durable, began))
        elif on_durable is not None:
            on_durable()

    async def _ensure_queue(self, queue: str) -> None:
        """Create the tasks topic of a queue the first time work goes there (treeflow never
        lets a broker auto-create one; a task queue needs no set-up, as in Temporal)."""
        if queue not in self._queues:
            await ensure_topics(self.settings, [queue])
            self._queues.add(queue)

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
            headers = [("tf.type", event.event_type.value.encode()), ("tf.exec", context.workflow_exec_id.encode()),
                       (DURABLE_HEADER, durable)]
            if self._traces is not None:
                headers.extend(self._trace_headers(context.workflow_exec_id))
            futures.append(await self._producer.send(
                self.settings.topics.events, self._encode_event(event), key=context.root_workflow_exec_id.encode(),
                partition=partition, headers=headers))
        written = self._logs.get(partition)
        if written is not None and futures:
            written.appended += len(futures)
            written.last = futures[-1]
        return futures

    async def _deliver(self, previous: asyncio.Future[None] | None, queued: asyncio.Future[None], appended: list[Any],
                       outgoing: list[tuple[str, bytes, bytes, int | None, list[tuple[str, bytes]]]],
                       on_durable: Callable[[], None] | None, began: float) -> None:
        """Once `appended` are acknowledged, queue `outgoing` after the previous decision's
        (`previous` resolves when those are queued; the producer keeps that order)."""
        assert self._sender is not None
        try:
            await asyncio.gather(*appended)
            if appended:
                metrics.APPEND_SECONDS.observe(time.perf_counter() - began)
            if on_durable is not None:
                on_durable()
            if previous is not None:
                await previous
            sent = [await self._sender.send(topic, value, key=key, partition=partition, headers=headers)
                    for topic, value, key, partition, headers in outgoing]
            queued.set_result(None)
            await asyncio.gather(*sent)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.critical("appending to the log failed (%r): stopping the processor; restart it to recover", exc)
            self._halt(exc)
            raise

    # ------------------------------------------------------------ snapshots and retention

    async def _housekeeping(self) -> None:
        """Forget closed executions after the retention; snapshot partitions that changed."""
        options = self.snapshot_options
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(options.check_every)
            now = self.clock.now()
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

        # No claim: a hosted attempt's reports are decided by this process, which hands
        # out its task once per lifetime; the runner still drops a copy it is running.
        traceparent = self._traces.header(dispatch.context.workflow_exec_id) if self._traces else None
        run = self._spawn(runner.run_activity(dispatch.context, dispatch.task.payload, self._send_local,
                                              traceparent=traceparent))
        self._local_runs.add(run)
        run.add_done_callback(self._local_runs.discard)

    async def _send_local(self, command: Command) -> None:
        await self._local.put(command)
