"""The true end of partitions, on every broker."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from . import clients
from .settings import KafkaSettings


async def end_offsets(settings: KafkaSettings, partitions: list[TopicPartition],
                      timeout: float = 10.0) -> dict[TopicPartition, int]:
    """The offset the next record of each partition will get (empty for no partitions).

    On Kafka this is ListOffsets (latest), which answers the high watermark. Tansu
    answers ListOffsets with the last batch's first offset + 1 (too low when that
    batch holds several records), so there the last batch is fetched and the high
    watermark of the fetch response is used.
    """
    if not partitions:
        return {}
    consumer = clients.consumer(settings, "offsets")
    await clients.start(consumer, settings)
    try:
        reported = await consumer.end_offsets(partitions)
        if settings.profile.exact_list_offsets:
            return reported
        pending = {tp for tp, offset in reported.items() if offset > 0}
        if not pending:
            return reported
        consumer.assign(list(pending))
        for tp in pending:
            consumer.seek(tp, reported[tp] - 1)
        result = dict(reported)
        async with asyncio.timeout(timeout):
            while pending:
                await consumer.getmany(*pending, timeout_ms=100)
                for tp in list(pending):
                    highwater = consumer.highwater(tp)
                    if highwater is not None:
                        result[tp] = max(highwater, reported[tp])
                        pending.discard(tp)
        return result
    finally:
        await clients.stop(consumer)
