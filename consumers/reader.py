"""Read decoded events from the events topic, partition by partition, in log order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from treeflow.kafka import KafkaSettings, end_offsets
from treeflow.schemas import EVENTS, DecodeError, Event, RecordPosition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumedEvent:
    """An event and where it sits in the events topic."""

    event: Event
    partition: int
    offset: int


@dataclass
class ReaderStats:
    """What a reader fetched and what it made of it."""

    decoded: int = 0
    #: Records skipped because they could not be decoded (each is logged with its offset).
    undecodable: int = 0
    #: Records received from the broker, whatever their key.
    fetched_records: int = 0
    #: Key and value bytes of the records received from the broker.
    fetched_bytes: int = 0
    #: Records left undecoded: another key than the one asked for, or refused by `accept`.
    skipped: int = 0


class EventReader:
    """Reads the events topic without a consumer group.

    - `partitions`: which partitions to read (all of the topic's when None);
      no other partition is fetched.
    - `start_offsets`: the first offset to read of each partition (the
      beginning where none is given).
    - `follow=False` stops at `stop_offsets` (exclusive), or at the end the
      partitions had when the reader started; `follow=True` goes on with new events.
    - `key`: yield only records with this key (a tree's root id): other
      records are skipped before they are decoded, which makes reading one tree's
      partition cheap. Records with no key are decoded and yielded.
    - `accept`: another test on the raw record (its headers, say) before decoding;
      records it refuses are skipped undecoded.

    A record that cannot be decoded is logged with its topic, partition and
    offset, counted in `stats`, and skipped: it never ends the iteration.
    Memory stays bounded by the client's fetch buffers, whatever the topic's size.
    """

    def __init__(self, settings: KafkaSettings, partitions: Iterable[int] | None = None,
                 *, follow: bool = False, key: str | None = None,
                 start_offsets: Mapping[int, int] | None = None,
                 stop_offsets: Mapping[int, int] | None = None,
                 accept: Callable[[ConsumerRecord[bytes, bytes]], bool] | None = None) -> None:
        if follow and stop_offsets is not None:
            raise ValueError("a following reader has no stop offsets")
        self.settings = settings
        self.partitions = None if partitions is None else sorted(set(partitions))
        self.follow = follow
        self.key = None if key is None else key.encode()
        self.start_offsets = dict(start_offsets or {})
        self.stop_offsets = None if stop_offsets is None else dict(stop_offsets)
        self.accept = accept
        self.stats = ReaderStats()

    async def __aiter__(self) -> AsyncGenerator[ConsumedEvent, None]:
        topic = self.settings.topics.events
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.profile.fetch_max_wait_ms,
        )
        try:
            await consumer.start()  # inside: a failed start is closed too (no "Unclosed AIOKafkaConsumer")
            numbers = self.partitions
            if numbers is None:
                numbers = sorted(await topic_partitions(consumer, topic))
            assigned = [TopicPartition(topic, number) for number in numbers]
            consumer.assign(assigned)
            for tp in assigned:
                consumer.seek(tp, self.start_offsets.get(tp.partition, 0))
            ends: dict[TopicPartition, int] | None = None
            if self.stop_offsets is not None:
                ends = {tp: self.stop_offsets.get(tp.partition, 0) for tp in assigned}
            elif not self.follow:
                ends = await end_offsets(self.settings, assigned)
            remaining = {tp for tp in assigned
                         if ends is None or ends[tp] > self.start_offsets.get(tp.partition, 0)}
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=200)
                for tp, records in batches.items():
                    for record in records:
                        if ends is not None and record.offset >= ends[tp]:
                            break
                        self.stats.fetched_records += 1
                        self.stats.fetched_bytes += max(record.serialized_key_size, 0) + max(
                            record.serialized_value_size, 0)
                        if ((self.key is not None and record.key is not None and record.key != self.key)
                                or (self.accept is not None and not self.accept(record))):
                            self.stats.skipped += 1
                            continue
                        position = RecordPosition(topic, tp.partition, record.offset)
                        try:
                            event = EVENTS.decode(record.value, position)
                        except DecodeError as error:
                            self.stats.undecodable += 1
                            log.error("skipping an undecodable event: %s", error)
                            continue
                        self.stats.decoded += 1
                        yield ConsumedEvent(event, tp.partition, record.offset)
                if ends is not None:
                    remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
        finally:
            await stop_shielded(consumer)


async def stop_shielded(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer even when the caller is cancelled meanwhile.

    A reader closed by cancellation (a dropped HTTP stream) can be cancelled again
    while it stops; an interrupted `stop()` leaves a connection open for good.
    """
    stopping = asyncio.ensure_future(consumer.stop())
    try:
        await asyncio.shield(stopping)
    except asyncio.CancelledError:
        await asyncio.wait([stopping])
        raise


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The partitions of `topic`; `LookupError` when it does not exist.

    Lists every topic rather than asking for this one: a Metadata request naming a
    missing topic creates it on brokers that auto-create topics.
    """
    await consumer.topics()  # refreshes metadata: the topic may be new to this client
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise LookupError(f"topic {topic} does not exist; create it with `treeflow topics create`")
    return partitions


_PARTITION_COUNTS: dict[tuple[str, str], int] = {}


async def partition_count(settings: KafkaSettings) -> int:
    """How many partitions the events topic has, as the broker says (cached per process).

    The count is fixed when the topic is created (changing it is a migration to new
    topics, DESIGN.md §3), so asking once is enough; the configured
    `settings.partitions` is not trusted for routing.
    """
    key = (settings.bootstrap_servers, settings.topics.events)
    count = _PARTITION_COUNTS.get(key)
    if count is None:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False)
        try:
            await consumer.start()
            count = _PARTITION_COUNTS[key] = len(await topic_partitions(consumer, settings.topics.events))
        finally:
            await stop_shielded(consumer)
    return count


def resolve_settings(bootstrap_servers: str | None = None, settings: KafkaSettings | None = None) -> KafkaSettings:
    """`settings` when given (with `bootstrap_servers` replacing its address), else `TREEFLOW_*` and defaults."""
    if settings is None:
        return KafkaSettings.resolve(bootstrap_servers)
    if bootstrap_servers and bootstrap_servers != settings.bootstrap_servers:
        return replace(settings, bootstrap_servers=bootstrap_servers)
    return settings
