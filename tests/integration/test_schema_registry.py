"""Events in Confluent's schema-registry wire format: written by the processor, read by
confluent-kafka's own AvroDeserializer and by treeflow's readers (both formats)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from treeflow.consumers import subscribe_tree
from treeflow.kafka import end_offsets
from treeflow.schemas import EVENTS, CLOSING_STATUS, DecodeError, Event
from treeflow.schemas.codec import RecordCodec
from treeflow.schemas.confluent import REGISTRY_URL_ENV, SchemaRegistry, schema_id_of
from treeflow.testing import Environment
from tests.integration import tree_app
from tests.schema_registry_server import SchemaRegistryServer

pytestmark = pytest.mark.integration

confluent_avro = pytest.importorskip("confluent_kafka.schema_registry.avro",
                                     reason="needs confluent-kafka[avro] (the dev extra)")
from confluent_kafka.schema_registry import SchemaRegistryClient  # noqa: E402
from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: E402


async def raw_events(settings) -> list[bytes]:
    topic = settings.topics.events
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
                                fetch_max_wait_ms=settings.profile.fetch_wait_ms())
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.partitions)]
        ends = await end_offsets(settings, partitions)
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, 0)
        values: list[bytes] = []
        async with asyncio.timeout(30):
            while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    values.extend(record.value for record in records)
        return values
    finally:
        await consumer.stop()


async def test_registry_format_events_decode_with_confluent_and_treeflow(broker, monkeypatch) -> None:
    with SchemaRegistryServer() as registry:
        monkeypatch.setenv(REGISTRY_URL_ENV, registry.url)
        try:
            async with Environment(workflows=tree_app.WORKFLOWS, activities=tree_app.ACTIVITIES,
                                   bootstrap_servers=broker.bootstrap_servers, profile=broker.profile) as env:
                root = f"registry-{uuid.uuid4().hex[:8]}"
                await env.client.execute_workflow(tree_app.Root, tree_app.TreeInput(value="r", straggler_seconds=0),
                                                  execution_id=root)
                async with asyncio.timeout(30):
                    streamed = [e async for e in subscribe_tree(root, settings=env.settings, until_closed=True)]
                values = await raw_events(env.settings)
                topic = env.settings.topics.events
        finally:
            EVENTS.use_registry(None)

        # Registered under <topic>-value; every event is framed 00 + that schema id.
        assert list(registry.subjects) == [f"{topic}-value"]
        (schema_id,) = registry.subjects[f"{topic}-value"]
        assert values and all(value[:5] == b"\x00" + schema_id.to_bytes(4, "big") for value in values)

        # confluent-kafka's own deserializer, talking to the registry over HTTP.
        deserializer = confluent_avro.AvroDeserializer(SchemaRegistryClient({"url": registry.url}))
        context = SerializationContext(topic, MessageField.VALUE)
        theirs = [deserializer(value, context) for value in values]
        ours = [EVENTS.decode(value) for value in values]
        for record, event in zip(theirs, ours):
            assert record["event_id"] == event.event_id
            assert record["event_type"] == event.event_type.value
            assert record["sequence"] == event.sequence
            assert record["timestamp"] == event.timestamp
            assert record["attempt"] == event.attempt
            assert record["workflow_context"] == event.workflow_context.model_dump()
            assert set(record["payload"]) == set(type(event.payload).model_fields)
        completed = [r for r in theirs if r["event_type"] == "ACTIVITY_TASK_COMPLETED"]
        assert {r["payload"]["activity_name"] for r in completed} == {"leaf_step"}
        assert {r["payload"]["result_json"] for r in completed} == {'"leaf:r"', '"leaf:late-r"'}
        # treeflow's consumer library read the same records (the tree, whole, in order).
        assert {e.event_id for e in streamed} == {e.event_id for e in ours
                                                  if e.workflow_context.root_workflow_exec_id == root}
        assert sum(e.event_type in CLOSING_STATUS for e in streamed) == 4

        # A reader that never saw the registry asks it for the schema by id, once.
        fresh: RecordCodec[Event] = RecordCodec("event", Event)
        before = registry.requests.count(("GET", f"/schemas/ids/{schema_id}"))
        assert [fresh.decode(value).event_id for value in values] == [e.event_id for e in ours]
        assert registry.requests.count(("GET", f"/schemas/ids/{schema_id}")) == before + 1
        # Single-object records still decode beside them.
        assert fresh.decode(EVENTS.encode(ours[0])) == ours[0]
        # A schema id the registry does not know, or no registry at all: a DecodeError saying so.
        with pytest.raises(DecodeError, match="404"):
            fresh.decode(b"\x00\x00\x00\x00\x63" + values[0][5:])
        monkeypatch.delenv(REGISTRY_URL_ENV)
        with pytest.raises(DecodeError, match=REGISTRY_URL_ENV):
            RecordCodec("event", Event).decode(values[0])
        # Registering is idempotent: the same id again.
        assert SchemaRegistry(registry.url).register(f"{topic}-value", EVENTS.schema) == schema_id
