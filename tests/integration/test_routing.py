"""A record keyed by a root id lands in the partition `partition_for` computes."""

import dataclasses
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from treeflow.kafka import KafkaSettings, ensure_topics, partition_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("producer_kind", ["aiokafka default partitioner", "treeflow profile"])
async def test_keys_land_in_the_computed_partition(settings: KafkaSettings, producer_kind: str) -> None:
    settings = dataclasses.replace(settings, partitions=12)
    await ensure_topics(settings)
    topic = settings.topics.events
    options = settings.profile.producer_options() if producer_kind == "treeflow profile" else {}
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **options)
    await producer.start()
    keys = [f"root-{uuid.uuid4()}" for _ in range(120)]
    try:
        for key in keys:
            metadata = await producer.send_and_wait(topic, b"x", key=key.encode())
            assert metadata.partition == partition_for(key, 12), key
    finally:
        await producer.stop()
    assert len({partition_for(key, 12) for key in keys}) == 12  # every partition got some

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    found: dict[str, int] = {}
    try:
        partitions = [TopicPartition(topic, p) for p in range(12)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        while len(found) < len(keys):
            for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                for record in records:
                    found[record.key.decode()] = tp.partition
    finally:
        await consumer.stop()
    assert found == {key: partition_for(key, 12) for key in keys}
