"""treeflow on Apache Kafka's protocol semantics, and its errors when the broker side is wrong.

Tansu answers a Metadata request with an empty topic list with every topic, which hid
a bug that broke tree subscriptions on Kafka (a fresh aiokafka client learns no topic
that way). `SecureFront(kafka_metadata=True)` answers such requests as Kafka does, and
records every Metadata request that would let Kafka auto-create a topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from treeflow.consumers import EventReader, find_root, subscribe_tree
from treeflow.kafka import (
    KAFKA,
    TANSU,
    BrokerUnreachableError,
    EmbeddedBroker,
    KafkaSettings,
    PartitionMismatchError,
    TopicsMissingError,
    TopicsResetError,
    WrongProfileError,
    clients,
    end_offsets,
    ensure_topics,
    partition_counts,
    topics as topics_module,
)
from treeflow.kafka.embedded import free_port
from treeflow.kafka.settings import BOOTSTRAP_ENV
from treeflow.client import Client
from treeflow.definitions import collect
from treeflow.worker.worker import Worker
from treeflow.testing import Environment
from tests.integration import tree_app
from tests.integration.secure_front import SecureFront

pytestmark = pytest.mark.integration

own_broker = pytest.mark.skipif(bool(os.environ.get(BOOTSTRAP_ENV)),
                                reason="needs an embedded broker of its own behind the Kafka-semantics front")


@contextlib.asynccontextmanager
async def kafka_like_broker() -> AsyncIterator[tuple[SecureFront, str]]:
    front_port = free_port()
    with EmbeddedBroker(advertised_port=front_port) as broker:
        front = await SecureFront(broker.port, front_port, kafka_metadata=True).start()
        try:
            yield front, f"127.0.0.1:{front_port}"
        finally:
            await front.stop()


@own_broker
async def test_trees_and_lookups_work_with_kafkas_metadata_semantics() -> None:
    async with kafka_like_broker() as (front, bootstrap):
        async with Environment(workflows=tree_app.WORKFLOWS, activities=tree_app.ACTIVITIES,
                               bootstrap_servers=bootstrap, partitions=3, profile=TANSU) as env:
            root = f"ks-{uuid.uuid4().hex[:6]}"
            async with asyncio.timeout(60):
                assert await env.client.execute_workflow(
                    tree_app.Root, tree_app.TreeInput(value="k", straggler_seconds=0.1),
                    execution_id=root) == "root(child(leaf:k))"
                tree = [e async for e in subscribe_tree(root, until_closed=True, settings=env.settings)]
                child = next(e.workflow_exec_id for e in tree if e.workflow_exec_id != root)
                assert await find_root(env.settings, child, scan=True) == root
                assert await env.client.find_root(child) == root
                every = [item async for item in EventReader(env.settings)]  # all partitions, from the broker
                assert {e.event_id for e in tree} <= {item.event.event_id for item in every}
                # A task queue nobody created: the processor creates its topic (deliberately, with
                # treeflow's layout) for the first task, and a worker for it gets the task.
                handle = await env.client.start_workflow(tree_app.Grandchild, "q", task_queue="fresh-queue")
                workflows, activities = collect([tree_app])
                worker = Worker(env.settings, workflows, activities, ["fresh-queue"])
                await worker.start()
                try:
                    assert await handle.result() == "leaf:q"
                finally:
                    await worker.stop(grace=1)
                fresh = env.settings.topics.tasks("fresh-queue")
                assert await partition_counts(env.settings, [fresh]) == {fresh: 3}
        assert front.empty_metadata_requests > 0  # the semantics were in force
        assert front.auto_create_requests == []


async def test_end_offsets_of_no_partitions_is_empty(settings: KafkaSettings) -> None:
    assert await end_offsets(settings, []) == {}
    assert await end_offsets(dataclasses.replace(settings, profile=KAFKA), []) == {}


async def test_a_start_cancelled_at_any_moment_leaves_no_connection_open(settings: KafkaSettings) -> None:
    """A client closed while its background checks start one (`treeflow schedule pause` of
    a missing schedule closed within milliseconds) printed "Unclosed AIOKafkaConnection":
    aiokafka's bootstrap drops its connection unclosed when cancelled mid-request."""
    import gc

    loop = asyncio.get_running_loop()
    unclosed: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unclosed.append(context["message"]))
    try:
        for step in range(30):
            starting = asyncio.ensure_future(clients.start(clients.bare_client(settings, "cancelled"), settings))
            await asyncio.sleep(0.0005 * step)
            starting.cancel()
            outcome = (await asyncio.gather(starting, return_exceptions=True))[0]
            if not isinstance(outcome, BaseException):
                await outcome.close()
            gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert unclosed == []


async def test_missing_topics_are_a_clear_error_and_stay_missing(settings: KafkaSettings) -> None:
    client = Client(settings)
    with pytest.raises(TopicsMissingError, match=r"treeflow topics create") as raised:
        await client.start()
    assert raised.value.exit_code == 5
    with pytest.raises(LookupError, match="treeflow topics create"):
        [item async for item in EventReader(settings)]
    names = settings.topics
    assert await partition_counts(settings, [names.commands, names.events, names.replies]) == {}


async def test_the_partition_count_comes_from_the_broker(settings: KafkaSettings) -> None:
    await ensure_topics(settings)  # 4 partitions
    adopting = dataclasses.replace(settings, partitions=12)  # a default, not chosen by the user
    async with Client(adopting) as client:
        await client.start()
        assert client.settings.partitions == 4
    explicit = dataclasses.replace(settings, partitions=6, partitions_explicit=True)
    with pytest.raises(PartitionMismatchError, match=r"is 6 but .*\.events has 4 partitions") as raised:
        await Client(explicit).start()
    assert raised.value.exit_code == 3
    # A new task queue's topic gets the existing count, not the default.
    report = await ensure_topics(adopting, ["other"])
    assert report.created == [settings.topics.tasks("other")]
    assert (await partition_counts(settings, report.created))[report.created[0]] == 4


@own_broker
async def test_the_kafka_profile_against_tansu_names_the_fix(settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    with pytest.raises(WrongProfileError, match="TREEFLOW_BROKER_PROFILE=tansu") as raised:
        await Client(dataclasses.replace(settings, profile=KAFKA)).start()
    assert raised.value.exit_code == 3


async def test_a_broker_that_does_not_answer_is_a_one_line_error() -> None:
    closed = f"127.0.0.1:{free_port()}"
    settings = KafkaSettings(closed, profile=TANSU, connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(BrokerUnreachableError, match=closed) as raised:
        await Client(settings).start()
    assert time.monotonic() - started < 5 and raised.value.exit_code == 4
    with pytest.raises(BrokerUnreachableError, match=closed):
        await ensure_topics(settings)


@own_broker
async def test_a_processor_whose_topics_vanish_stops_and_creates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topics_module, "WATCH_INTERVAL", 0.2)
    async with kafka_like_broker() as (front, bootstrap):
        async with Environment(workflows=tree_app.WORKFLOWS, activities=tree_app.ACTIVITIES,
                               bootstrap_servers=bootstrap, partitions=2, profile=TANSU) as env:
            names = env.settings.topics
            sleeper = await env.client.start_workflow(tree_app.Straggler, tree_app.TreeInput(
                value="s", straggler_seconds=600))
            waiting = asyncio.ensure_future(sleeper.result())
            admin = await clients.start(clients.admin(env.settings), env.settings)
            try:
                await admin.delete_topics([names.events, names.commands, names.replies])
            finally:
                await admin.close()
            async with asyncio.timeout(20):
                await env.processor.halted.wait()
            assert isinstance(env.processor.failed, TopicsResetError)
            assert "treeflow topics create" in str(env.processor.failed)
            with pytest.raises(TopicsResetError):  # a caller waiting on the client learns why
                async with asyncio.timeout(20):
                    await waiting
            await asyncio.sleep(0.5)
            assert await partition_counts(env.settings, [names.events, names.commands, names.replies]) == {}
        assert front.auto_create_requests == []
