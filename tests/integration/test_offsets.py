import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from treeflow.kafka import KafkaSettings, end_offsets, ensure_topics

pytestmark = pytest.mark.integration


async def produce_one_batch(settings: KafkaSettings, partition: int, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        batch = producer.create_batch()
        for n in range(count):
            assert batch.append(key=b"k", value=f"v{n}".encode(), timestamp=None) is not None
        await (await producer.send_batch(batch, settings.topics.events, partition=partition))
    finally:
        await producer.stop()


async def list_offsets(settings: KafkaSettings, tp: TopicPartition) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        return (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()


async def test_end_offsets_is_the_true_end_after_a_multi_record_batch(settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    empty, full = (TopicPartition(settings.topics.events, p) for p in (0, 1))
    await produce_one_batch(settings, 1, 10)
    await produce_one_batch(settings, 1, 5)
    assert await end_offsets(settings, [empty, full]) == {empty: 0, full: 15}


async def test_the_tansu_list_offsets_gap_is_still_there(settings: KafkaSettings, broker) -> None:
    """Documents DESIGN.md §8; when this fails, Tansu fixed ListOffsets and the
    `exact_list_offsets=False` workaround of the tansu profile can go."""
    if broker.kind != "embedded":
        pytest.skip("only the embedded broker has this gap")
    await ensure_topics(settings)
    await produce_one_batch(settings, 2, 10)
    assert await list_offsets(settings, TopicPartition(settings.topics.events, 2)) == 1


SCRIPT = """
import asyncio, sys
from treeflow.kafka import KAFKA, KafkaSettings, clients, end_offsets

async def main() -> None:
    settings = KafkaSettings(sys.argv[1], profile=KAFKA)
    assert await end_offsets(settings, []) == {}
    for _ in range(3):
        consumer = clients.consumer(settings, "test")
        await consumer.start()
        assert await consumer.end_offsets([]) == {}
        await clients.stop(consumer)

asyncio.run(main())
"""


def test_a_consumer_stopped_right_after_it_started_stops_cleanly(settings: KafkaSettings) -> None:
    """aiokafka 0.14's stop() of a consumer without a group, before the loop ran its
    committed-offsets task once, raises that task's CancelledError (GroupCoordinator.close
    awaits the task it cancelled); it surfaced from `end_offsets(settings, [])`. The
    factory's stop() runs in a task of its own, which lets that task start first. A fresh
    event loop shows the race (a long-lived one hides it)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SCRIPT, settings.bootstrap_servers], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
