"""A service's consumer of every tree: one handler call per event, through a consumer group.

Records are read by a consumer group, so instances of a service share the
partitions. Events of one tree (one root id) go to the handler one at a time, in
log order; different trees run side by side, at most `max_in_flight` handler
calls at once. An offset is committed only once the handler succeeded for it and
for every earlier record of its partition. A failing handler is retried with
exponential backoff; after the last attempt the record is parked on a dead-letter
topic with the error, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from treeflow.kafka import (
    BrokerRequestError,
    KafkaSettings,
    TopicsResetError,
    clients,
    end_offsets,
    partition_counts,
    watch_topics,
)
from treeflow.kafka.errors import OptionsError
from treeflow.observability import metrics
from treeflow.schemas import EVENTS, DecodeError, RecordPosition

from .cursor import Cursor
from .events import TreeEvent
from .filters import EventFilter, EventTypes, Values
from .ledger import OffsetLedger
from .reader import partition_count, resolve_settings, stop_shielded

log = logging.getLogger(__name__)

#: What a service gives `subscribe`: called once per event (at least once across crashes).
Handler = Callable[[TreeEvent[Any]], Awaitable[None]]


@dataclass(frozen=True)
class ServiceOptions:
    """How a service subscription reads, retries and commits."""

    #: Handler calls running at once, across trees (one tree never has two).
    max_in_flight: int = 16
    #: Records read and not yet done, across partitions, before reading pauses.
    max_buffered: int = 10_000
    #: Handler calls per event, the first included, before it is dead-lettered.
    max_attempts: int = 5
    initial_backoff: timedelta = timedelta(milliseconds=100)
    backoff_coefficient: float = 2.0
    max_backoff: timedelta = timedelta(seconds=10)
    #: Where failed and undecodable records go; default ``<prefix>.dead-letter.<group id>``.
    dead_letter_topic: str | None = None
    #: Where a group that has committed nothing yet starts: the beginning, or only new events.
    from_beginning: bool = True
    #: How often finished offsets are committed (also on stop and when partitions are revoked).
    commit_interval: timedelta = timedelta(milliseconds=200)
    #: Event ids remembered to skip a second delivery of the same event.
    dedupe_window: int = 100_000
    #: How long `stop()` (and a rebalance taking partitions away) hands the events already
    #: read to the handler before it stops them where they are.
    stop_timeout: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_buffered", "max_attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionsError(f"ServiceOptions.{name} must be a whole number of at least 1, not {value!r}")
        if isinstance(self.dedupe_window, bool) or not isinstance(self.dedupe_window, int) or self.dedupe_window < 0:
            raise OptionsError(f"ServiceOptions.dedupe_window must be a whole number >= 0, not {self.dedupe_window!r}")
        for name in ("initial_backoff", "max_backoff", "commit_interval", "stop_timeout"):
            value = getattr(self, name)
            if not isinstance(value, timedelta):
                raise OptionsError(f"ServiceOptions.{name} must be a datetime.timedelta, not {value!r} "
                                   f"(e.g. {name}=timedelta(seconds=...))")
            if value < timedelta(0) or (name == "commit_interval" and not value):
                raise OptionsError(f"ServiceOptions.{name} must be positive, not {value}")
        coefficient = self.backoff_coefficient
        if isinstance(coefficient, bool) or not isinstance(coefficient, int | float) or coefficient < 1:
            raise OptionsError(f"ServiceOptions.backoff_coefficient must be a number >= 1, not {coefficient!r}")
        if not isinstance(self.from_beginning, bool):
            raise OptionsError(f"ServiceOptions.from_beginning must be True or False, not {self.from_beginning!r}")
        if self.dead_letter_topic is not None and (not isinstance(self.dead_letter_topic, str)
                                                   or not self.dead_letter_topic):
            raise OptionsError(f"ServiceOptions.dead_letter_topic must be a topic name, not {self.dead_letter_topic!r}")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        seconds = self.initial_backoff.total_seconds() * self.backoff_coefficient ** (attempt - 1)
        return min(seconds, self.max_backoff.total_seconds())


@dataclass
class ServiceStats:
    """Counters of a service subscription."""

    #: Handler calls that succeeded.
    handled: int = 0
    #: Failed handler calls that were tried again.
    retries: int = 0
    #: Records parked on the dead-letter topic (handler gave up, or undecodable).
    dead_lettered: int = 0
    undecodable: int = 0
    #: Events no filter kept.
    filtered: int = 0
    #: Second deliveries of an event id, skipped.
    duplicates: int = 0
    #: The last committed position of each partition.
    committed: dict[int, int] = field(default_factory=dict)
    #: What stopped the subscription, when something did (it is also raised by `run()`,
    #: `wait_assigned()` and at the end of ``async with``).
    failure: str | None = None


def dead_letter_topic_name(settings: KafkaSettings, group_id: str) -> str:
    """``<prefix>.dead-letter.<group id>``, with characters Kafka refuses in names replaced by ``_``."""
    return f"{settings.topic_prefix}.dead-letter.{re.sub(r'[^A-Za-z0-9._-]', '_', group_id)}"


@dataclass
class _Item:
    tp: TopicPartition
    record: ConsumerRecord[bytes, bytes]
    event: TreeEvent[Any]


@dataclass
class _Lane:
    """The events of one tree waiting for the handler, in log order."""

    tp: TopicPartition
    items: deque[_Item] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


class ServiceSubscription:
    """A running `subscribe`: `async with` it, or `await run()` until `stop()`."""

    def __init__(self, handler: Handler, *, group_id: str, settings: KafkaSettings,
                 event_filter: EventFilter | None = None, options: ServiceOptions | None = None) -> None:
        self.handler = handler
        self.group_id = group_id
        self.settings = settings
        self.filter = event_filter or EventFilter()
        self.options = options or ServiceOptions()
        self.dead_letter_topic = self.options.dead_letter_topic or dead_letter_topic_name(settings, group_id)
        self.stats = ServiceStats()
        self._handled_metric = metrics.SERVICE_HANDLED.labels(group_id)
        self._retries_metric = metrics.SERVICE_RETRIES.labels(group_id)
        self._dead_lettered_metric = metrics.SERVICE_DEAD_LETTERED.labels(group_id)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._ledgers: dict[TopicPartition, OffsetLedger] = {}
        self._lanes: dict[str, _Lane] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._slots = asyncio.Semaphore(self.options.max_in_flight)
        self._buffered = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self._wake = asyncio.Event()  # set by stop() and by a failure: run() returns
        self._failure: BaseException | None = None
        self._assigned = asyncio.Event()
        self._revoking: set[TopicPartition] = set()
        #: Partitions paused while `from_beginning=False` looks up where they start.
        self._positioning: set[TopicPartition] = set()
        #: The first offset to hand out of each partition that started at its end.
        self._starts: dict[TopicPartition, int] = {}

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Create the dead-letter topic if needed, join the group and start handling events."""
        await self._ensure_dead_letter_topic()
        self._producer = await clients.start(clients.producer(self.settings, "service"), self.settings)
        # "earliest" only for a committed offset that fell out of the log; where a new group
        # starts is decided in `_assigned_now` (treeflow never relies on "latest", see there).
        self._consumer = await clients.start(clients.consumer(self.settings, "service", group_id=self.group_id),
                                             self.settings)
        self._consumer.subscribe([self.settings.topics.events], listener=_Rebalance(self))
        self._tasks = [asyncio.ensure_future(self._fetch()), asyncio.ensure_future(self._commit_every_interval()),
                       asyncio.ensure_future(self._watch_topics())]

    async def wait_assigned(self, timeout: float = 30.0) -> None:
        """Wait until the group gave this member its first partitions."""
        async with asyncio.timeout(timeout):
            await asyncio.wait([asyncio.ensure_future(self._assigned.wait()),
                                asyncio.ensure_future(self._wake.wait())], return_when=asyncio.FIRST_COMPLETED)
        if self._failure is not None:
            raise self._failure
        if not self._assigned.is_set():
            raise RuntimeError("the subscription was stopped before it got partitions")

    async def stop(self) -> None:
        """Stop reading, hand the events already read to the handler (up to `options.stop_timeout`),
        commit, leave the group. A restart after it hands no event twice."""
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop_lanes(list(self._lanes))
        try:
            # A commit to a vanished topic would be retried forever.
            if self._consumer is not None and not isinstance(self._failure, TopicsResetError):
                await self._commit()
        except KafkaError as error:
            log.warning("final commit of group %s failed (the records will be handled again): %r",
                        self.group_id, error)
        finally:
            if self._consumer is not None:
                await stop_shielded(self._consumer)
            if self._producer is not None:
                await self._producer.stop()

    async def run(self) -> None:
        """Start, then handle events until `stop()` is called or the task is cancelled.

        Raises what stopped the subscription when something did (e.g. the dead-letter
        topic could not be written).
        """
        await self.start()
        try:
            await self._wake.wait()
        finally:
            await self.stop()
        if self._failure is not None:
            raise self._failure

    async def __aenter__(self) -> ServiceSubscription:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
        if self._failure is not None and exc is None:
            raise self._failure

    # ---------------------------------------------------------------- reading

    async def _fetch(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        try:
            while True:
                room = self.options.max_buffered - self._buffered
                if room <= 0:
                    consumer.pause(*consumer.assignment())
                elif consumer.paused() - self._revoking - self._positioning:
                    consumer.resume(*(consumer.paused() - self._revoking - self._positioning))
                batches = await consumer.getmany(timeout_ms=100, max_records=max(room, 1))
                for tp, records in batches.items():
                    ledger = self._ledgers.setdefault(tp, OffsetLedger())
                    start = self._starts.get(tp, 0)
                    for record in records:
                        if record.offset < start:  # read before the start was known
                            continue
                        ledger.add(record.offset)
                        self._buffered += 1
                        await self._dispatch(tp, record)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # surfaced by run()
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        log.error("service subscription %s stopped: %r", self.group_id, error, exc_info=error)
        if self._failure is None:
            self._failure = error
            self.stats.failure = f"{type(error).__name__}: {error}"
        self._wake.set()

    async def _watch_topics(self) -> None:
        try:
            await watch_topics(self.settings, [self.settings.topics.events], "service")
        except TopicsResetError as error:
            self._fail(error)

    async def _dispatch(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            event = EVENTS.decode(record.value, RecordPosition(tp.topic, tp.partition, record.offset))
        except DecodeError as error:
            self.stats.undecodable += 1
            log.error("parking an undecodable event on %s: %s", self.dead_letter_topic, error)
            await self._dead_letter(tp, record, error, attempts=0)
            self._done(tp, record.offset)
            return
        if not self.filter.matches(event):
            self.stats.filtered += 1
            self._done(tp, record.offset)
            return
        if event.event_id in self._seen:
            self.stats.duplicates += 1
            self._done(tp, record.offset)
            return
        root = event.workflow_context.root_workflow_exec_id
        lane = self._lanes.get(root)
        if lane is None:
            lane = self._lanes[root] = _Lane(tp)
        lane.items.append(_Item(tp, record, TreeEvent.of(event, Cursor(tp.partition, record.offset))))
        if lane.task is None:
            lane.task = asyncio.ensure_future(self._drain(root, lane))

    def _done(self, tp: TopicPartition, offset: int) -> None:
        self._buffered -= 1
        ledger = self._ledgers.get(tp)
        if ledger is not None:
            ledger.done(offset)

    # ---------------------------------------------------------------- handling

    async def _drain(self, root: str, lane: _Lane) -> None:
        """Hand a tree's events to the handler, one at a time, in order."""
        try:
            while lane.items and not lane.stopping.is_set():
                item = lane.items[0]
                event_id = item.event.event_id
                if event_id in self._seen:  # a second delivery queued behind the first
                    self.stats.duplicates += 1
                elif not await self._handle(item, lane):
                    break  # stopping: the record stays uncommitted and is read again
                else:
                    self._seen[event_id] = None
                    if len(self._seen) > self.options.dedupe_window:
                        self._seen.popitem(last=False)
                lane.items.popleft()
                self._done(item.tp, item.record.offset)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self._fail(error)
        finally:
            self._buffered -= len(lane.items)
            lane.items.clear()
            if self._lanes.get(root) is lane:
                del self._lanes[root]

    async def _handle(self, item: _Item, lane: _Lane) -> bool:
        """Call the handler with retries, then dead-letter; False when stopped before done."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._slots:
                    await self.handler(item.event)
                self.stats.handled += 1
                self._handled_metric.inc()
                return True
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if attempt >= self.options.max_attempts:
                    log.error("handler failed %d times on event %s (%s); parking it on %s: %r", attempt,
                              item.event.event_id, item.event.event_type.value, self.dead_letter_topic, error)
                    await self._dead_letter(item.tp, item.record, error, attempts=attempt)
                    return True
                self.stats.retries += 1
                self._retries_metric.inc()
                delay = self.options.backoff(attempt)
                log.warning("handler failed on event %s (attempt %d of %d), retrying in %.2fs: %r",
                            item.event.event_id, attempt, self.options.max_attempts, delay, error)
                try:
                    await asyncio.wait_for(lane.stopping.wait(), delay)
                    return False
                except TimeoutError:
                    pass

    async def _dead_letter(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], error: BaseException,
                           attempts: int) -> None:
        assert self._producer is not None
        headers = list(record.headers or ()) + [
            ("tf.error.type", type(error).__name__.encode()),
            ("tf.error.message", str(error).encode()),
            ("tf.attempts", str(attempts).encode()),
            ("tf.source.topic", tp.topic.encode()),
            ("tf.source.partition", str(tp.partition).encode()),
            ("tf.source.offset", str(record.offset).encode()),
            ("tf.group", self.group_id.encode()),
        ]
        await self._producer.send_and_wait(self.dead_letter_topic, record.value, key=record.key, headers=headers)
        self.stats.dead_lettered += 1
        self._dead_lettered_metric.inc()

    async def _stop_lanes(self, roots: Iterable[str]) -> None:
        """Hand the lanes' queued events to the handler (nothing new is read meanwhile), so that
        everything read is done and committed; after `stop_timeout`, stop them where they are.

        Draining matters: trees run in parallel and a commit is one position per partition,
        so a tree still waiting would hold back the commit of other trees' later events,
        which would be handled again after the restart.
        """
        lanes = [self._lanes[root] for root in roots if root in self._lanes]
        tasks = [lane.task for lane in lanes if lane.task is not None]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self.options.stop_timeout.total_seconds())
        if not late:
            return
        log.warning("%d trees still had events to handle after %s; their uncommitted events will be handed "
                    "again", len(late), self.options.stop_timeout)
        for lane in lanes:
            lane.stopping.set()  # ends a backoff at once, and the lane after its running call
        _, late = await asyncio.wait(late, timeout=1.0)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    # ---------------------------------------------------------------- committing

    async def _commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        assert self._consumer is not None
        offsets = {}
        for tp in list(self._ledgers) if partitions is None else partitions:
            ledger = self._ledgers.get(tp)
            position = ledger.committable() if ledger is not None else None
            if position is not None and position > self.stats.committed.get(tp.partition, -1):
                offsets[tp] = OffsetAndMetadata(position, "")
        if offsets:
            await self._consumer.commit(offsets)
            for tp, committed in offsets.items():
                self.stats.committed[tp.partition] = committed.offset

    async def _commit_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.options.commit_interval.total_seconds())
            try:
                await self._commit()
            except KafkaError as error:
                log.warning("commit of group %s failed, will retry: %r", self.group_id, error)

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        if self._consumer is not None and revoked:
            self._revoking |= revoked
            self._consumer.pause(*revoked)  # nothing more of them is read while their lanes drain
        await self._stop_lanes([root for root, lane in self._lanes.items() if lane.tp in revoked])
        try:
            await self._commit(revoked)
        except KafkaError as error:
            log.warning("commit on revocation failed for group %s (records will be handled again): %r",
                        self.group_id, error)
        for tp in revoked:
            self._ledgers.pop(tp, None)
            self.stats.committed.pop(tp.partition, None)
        self._revoking -= revoked

    async def _assigned_now(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._ledgers[tp] = OffsetLedger()
            self._starts.pop(tp, None)
        if not self.options.from_beginning and assigned and self._consumer is not None:
            # Nothing is read from these partitions until their start is known (the fetcher
            # would meanwhile begin where auto_offset_reset says).
            self._positioning |= assigned
            self._consumer.pause(*assigned)
            try:
                await self._start_new_partitions_at_the_end(assigned)
            except BaseException as error:
                self._fail(error)  # they stay paused
                raise
            self._positioning -= assigned
            self._consumer.resume(*(assigned - self._revoking))
        self._assigned.set()

    async def _start_new_partitions_at_the_end(self, assigned: set[TopicPartition]) -> None:
        """`from_beginning=False`: a partition the group never committed starts at its true end.

        Not ``auto_offset_reset="latest"``: on Kafka that is the end too, but Tansu answers
        ListOffsets too low (DESIGN.md §8), and a reset happens lazily, at the first fetch.
        Here the end is looked up with `end_offsets` (right on every broker), sought to and
        committed at once, so a restart before the first event does not move the start.
        """
        assert self._consumer is not None
        fresh = [tp for tp in sorted(assigned) if await self._consumer.committed(tp) is None]
        if not fresh:
            return
        ends = await end_offsets(self.settings, fresh)
        for tp in fresh:
            self._consumer.seek(tp, ends[tp])
            self._starts[tp] = ends[tp]
        try:
            await self._consumer.commit({tp: OffsetAndMetadata(ends[tp], "") for tp in fresh})
            for tp in fresh:
                self.stats.committed[tp.partition] = ends[tp]
        except KafkaError as error:  # the seek holds; the first handled event commits
            log.warning("could not commit the start of group %s (%r); it starts at the end all the same",
                        self.group_id, error)

    async def _ensure_dead_letter_topic(self) -> None:
        partitions = await partition_count(self.settings)
        if self.dead_letter_topic in await partition_counts(self.settings, [self.dead_letter_topic], "service"):
            return
        admin = await clients.start(clients.admin(self.settings, "service"), self.settings)
        try:
            brokers = len((await admin.describe_cluster())["brokers"])
            replication = self.settings.replication_factor or min(3, brokers)
            response = await admin.create_topics([NewTopic(
                self.dead_letter_topic, partitions, replication,
                topic_configs={"cleanup.policy": "delete", "retention.ms": "-1"})])
            for name, code, *_ in response.topic_errors:
                if code and for_code(code) is not TopicAlreadyExistsError:
                    raise BrokerRequestError(f"cannot create the dead-letter topic {name}: "
                                             f"{for_code(code).__name__}")
        finally:
            await admin.close()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, subscription: ServiceSubscription) -> None:
        self.subscription = subscription

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.subscription._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.subscription._assigned_now(set(assigned))


def subscribe(handler: Handler, *, group_id: str, bootstrap_servers: str | None = None,
              event_types: EventTypes = None, workflow_names: Values = None, workflow_exec_ids: Values = None,
              parent_workflow_exec_ids: Values = None, root_workflow_exec_ids: Values = None,
              options: ServiceOptions | None = None, settings: KafkaSettings | None = None) -> ServiceSubscription:
    """Handle every tree's events in a service, through the consumer group `group_id`.

    Guarantees:

    - Events of one tree reach `handler` one at a time, in log order; trees are
      handled in parallel, at most `options.max_in_flight` calls at once. Instances
      with the same `group_id` share the partitions (and so the trees).
    - At least once: an offset is committed only after the handler succeeded (or the
      record was dead-lettered) for it and every earlier record of its partition.
      `stop()` and a rebalance first hand the events already read to the handler, then
      commit, so a restart or a move to another instance hands no event twice; after a
      crash, events handled but not committed yet are handed again (those of the last
      `options.commit_interval`, and those held back by an earlier event still retrying).
      Within a process, an event id is handed over once (later deliveries are skipped).
    - A handler that raises is called again after an exponential backoff, up to
      `options.max_attempts` calls; then the record is written to the dead-letter
      topic with headers ``tf.error.type``, ``tf.error.message``, ``tf.attempts``,
      ``tf.source.topic|partition|offset`` and ``tf.group``, and the stream goes on.
      An undecodable record goes there at once (counted in `stats.undecodable`).
    - Filters (`event_types`, `workflow_names`, execution, parent and root ids) skip
      events without calling the handler; skipped events are committed.
    - Memory is bounded: reading pauses while `options.max_buffered` records wait.

    Returns the subscription, not started: ``async with subscribe(...)`` or
    ``await subscribe(...).run()``.
    """
    event_filter = EventFilter.of(event_types=event_types, workflow_names=workflow_names,
                                  workflow_exec_ids=workflow_exec_ids,
                                  parent_workflow_exec_ids=parent_workflow_exec_ids,
                                  root_workflow_exec_ids=root_workflow_exec_ids)
    return ServiceSubscription(handler, group_id=group_id, settings=resolve_settings(bootstrap_servers, settings),
                               event_filter=event_filter, options=options)
