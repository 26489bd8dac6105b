"""The true end of partitions, on every broker."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from .settings import KafkaSettings


async def end_offsets(settings: KafkaSettings, partitions: list[TopicPartition],
                      timeout: float = 10.0) -> dict[TopicPartition, int]:
    """The offset the next record of each partition will get.

    On Kafka this is ListOffsets. Tansu answers ListOffsets with the last batch's
    first offset + 1 (too low when that batch holds several records), so there the
    last batch is fetched and the high watermark of the fetch response is used.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                                enable_auto_commit=False,
                                fetch_max_wait_ms=settings.profile.fetch_max_wait_ms)
    try:
        await consumer.start()  # inside: a failed start is closed too
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
        await consumer.stop()

