"""Read decoded events from the events topic, partition by partition, in log order."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

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
    decoded: int = 0
    #: Records skipped because they could not be decoded (each is logged with its offset).
    undecodable: int = 0


class EventReader:
    """Reads the events topic from the beginning, without a consumer group.

    With `follow=False` it stops at the end the partitions had when it started;
    with `follow=True` it goes on with new events. A record that cannot be decoded
    is logged with its topic, partition and offset, counted in `stats`, and
    skipped: it never ends the iteration.
    """

    def __init__(self, settings: KafkaSettings, partitions: Iterable[int] | None = None,
                 *, follow: bool = False) -> None:
        self.settings = settings
        self.partitions = None if partitions is None else sorted(set(partitions))
        self.follow = follow
        self.stats = ReaderStats()

    async def __aiter__(self) -> AsyncIterator[ConsumedEvent]:
        topic = self.settings.topics.events
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.profile.fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            numbers = self.partitions
            if numbers is None:
                numbers = sorted(await _partitions(consumer, topic))
            assigned = [TopicPartition(topic, number) for number in numbers]
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            ends = None if self.follow else await end_offsets(self.settings, assigned)
            remaining = {tp for tp in assigned if ends is None or ends[tp] > 0}
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=200)
                for tp, records in batches.items():
                    for record in records:
                        if ends is not None and record.offset >= ends[tp]:
                            break
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
            await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer.topics()  # refreshes metadata: the topic may be new to this client
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise LookupError(f"topic {topic} does not exist; create it with `treeflow topics create`")
    return partitions
