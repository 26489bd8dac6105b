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


async def test_a_consumer_reaches_the_end_of_a_partition_too_long_for_a_short_fetch(
        settings: KafkaSettings, broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tansu profile's growing fetch wait (treeflow.kafka.fetch_wait): Tansu lists a
    partition's batches from the first within the fetch's wait, so a 1 ms fetch at the end of
    4,000 batches answers nothing, every time; the consumers treeflow starts get there."""
    import asyncio

    from treeflow.kafka import clients
    from treeflow.kafka.fetch_wait import GrowingWaitFetcher
    from treeflow.kafka.profile import FETCH_WAIT_ENV

    if not settings.profile.fetch_max_wait_ceiling_ms:
        pytest.skip("only the tansu profile grows its fetch wait (Kafka finds an offset through its index)")
    monkeypatch.setenv(FETCH_WAIT_ENV, "1")
    await ensure_topics(settings)
    tp = TopicPartition(settings.topics.events, 3)
    batches = 4000

    async def one_record_per_batch(count: int) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=0)
        await producer.start()
        try:
            for n in range(count):
                await producer.send_and_wait(tp.topic, f"v{n}".encode(), partition=tp.partition)
        finally:
            await producer.stop()

    await asyncio.gather(*(one_record_per_batch(batches // 8) for _ in range(8)))

    async def tail(consumer: AIOKafkaConsumer, seconds: float) -> int:
        consumer.assign([tp])
        consumer.seek(tp, batches - 3)
        got = await consumer.getmany(tp, timeout_ms=int(seconds * 1000))
        return len(got.get(tp, []))

    fixed = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, fetch_max_wait_ms=1,
                             enable_auto_commit=False)
    await fixed.start()
    try:
        if await tail(fixed, 2.0):
            pytest.skip(f"this broker lists {batches} batches within 1 ms: nothing to show here")
    finally:
        await fixed.stop()
    growing = await clients.start(clients.consumer(settings, "test"), settings)
    try:
        assert type(growing._fetcher) is GrowingWaitFetcher
        assert await tail(growing, 10.0) == 3
        assert growing._fetcher._fetch_max_wait_ms > 1  # it grew to reach that far
    finally:
        await clients.stop(growing)
