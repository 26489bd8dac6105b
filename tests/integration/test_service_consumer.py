"""subscribe(group_id=...) on the real (embedded) broker: ordered per tree, retried, committed
after success, dead-lettered, and restartable without losing or repeating an event."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from treeflow.consumers import EventFilter, ServiceOptions, ServiceSubscription, TreeEvent, subscribe, subscribe_tree
from treeflow.kafka import KafkaSettings, ensure_topics, partition_for
from treeflow.schemas import EVENTS, EventType
from treeflow.testing import Environment
from tests.integration import tree_app
from tests.samples import context, event_of, write_events

pytestmark = pytest.mark.integration

FAST = ServiceOptions(initial_backoff=timedelta(milliseconds=20), commit_interval=timedelta(milliseconds=50))


async def wait_for(condition: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_a_service_survives_a_handler_that_fails_twice_and_a_restart(tree_env: Environment) -> None:
    roots = [f"svc-{uuid.uuid4().hex[:6]}-{n}" for n in range(3)]
    for root in roots:
        await tree_env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value=root, straggler_seconds=0.2),
                                        execution_id=root)
    trees: dict[str, list[str]] = {}
    for root in roots:
        async with asyncio.timeout(20):
            trees[root] = [e.event_id async for e in subscribe_tree(root, until_closed=True, settings=tree_env.settings)]
    expected = sum(len(ids) for ids in trees.values())
    flaky = trees[roots[1]][len(trees[roots[1]]) // 2]  # an event in the middle of a tree

    handled: list[TreeEvent[Any]] = []
    attempts: Counter[str] = Counter()
    running: set[str] = set()
    overlaps: list[str] = []

    async def handler(event: TreeEvent[Any]) -> None:
        root = event.root_workflow_exec_id
        if root in running:
            overlaps.append(root)  # two calls for one tree at once: order would be lost
        running.add(root)
        try:
            attempts[event.event_id] += 1
            await asyncio.sleep(0.003)
            if event.event_id == flaky and attempts[flaky] <= 2:
                raise RuntimeError("the downstream service is unavailable")
            handled.append(event)
        finally:
            running.discard(root)

    group = f"service-{uuid.uuid4().hex[:6]}"
    # Few records read ahead, so that the restart comes with events not read yet.
    options = replace(FAST, max_buffered=8, max_in_flight=2)
    first = subscribe(handler, group_id=group, root_workflow_exec_ids=roots, settings=tree_env.settings,
                      options=options)
    async with first:
        await wait_for(lambda: len(handled) >= expected // 2)
    stopped_at = len(handled)
    assert stopped_at < expected, "the restart must happen with events left to handle"
    assert first.stats.committed, "the first consumer committed what it handled"

    second = subscribe(handler, group_id=group, root_workflow_exec_ids=roots, settings=tree_env.settings,
                       options=options)
    async with second:
        await wait_for(lambda: len(handled) >= expected)
        await asyncio.sleep(0.3)  # anything handled twice would show up now

    ids = [e.event_id for e in handled]
    assert Counter(ids) == Counter(event_id for tree in trees.values() for event_id in tree)  # each once
    for root, tree in trees.items():
        assert [e.event_id for e in handled if e.root_workflow_exec_id == root] == tree  # in log order
    assert attempts[flaky] == 3
    assert first.stats.retries + second.stats.retries == 2
    assert first.stats.dead_lettered + second.stats.dead_lettered == 0
    assert overlaps == []
    assert ids[stopped_at:] and set(ids[:stopped_at]).isdisjoint(ids[stopped_at:])


async def test_a_handler_that_keeps_failing_parks_the_event_and_the_stream_goes_on(settings: KafkaSettings) -> None:
    """No engine: two trees written by hand, one bad record, a handler that rejects one event for good."""
    await ensure_topics(settings)
    trees = {}
    for root in ("dl-a", "dl-b"):
        ctx = context(root, root)
        trees[root] = [event_of(EventType.WORKFLOW_EXECUTION_STARTED, ctx, 1),
                       event_of(EventType.ACTIVITY_TASK_SCHEDULED, ctx, 2),
                       event_of(EventType.WORKFLOW_EXECUTION_COMPLETED, ctx, 3)]
    await write_events(settings, trees["dl-a"] + trees["dl-b"])
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **settings.profile.producer_options())
    await producer.start()
    bad = await producer.send_and_wait(settings.topics.events, b"garbage", key=b"dl-a")
    await producer.stop()
    poison = trees["dl-a"][1].event_id
    handled: defaultdict[str, list[str]] = defaultdict(list)

    async def handler(event: TreeEvent[Any]) -> None:
        if event.event_id == poison:
            raise ValueError(f"cannot handle {event.event_id}")
        handled[event.root_workflow_exec_id].append(event.event_id)

    options = ServiceOptions(max_attempts=2, initial_backoff=timedelta(milliseconds=10),
                             commit_interval=timedelta(milliseconds=50))
    subscription = subscribe(handler, group_id="dl-group", settings=settings, options=options)
    running = asyncio.ensure_future(subscription.run())
    await wait_for(lambda: sum(map(len, handled.values())) == 5 and subscription.stats.dead_lettered == 2)
    await subscription.stop()
    async with asyncio.timeout(5):
        await running  # run() returns once stopped
    assert handled["dl-a"] == [trees["dl-a"][0].event_id, trees["dl-a"][2].event_id]
    assert handled["dl-b"] == [e.event_id for e in trees["dl-b"]]
    assert (subscription.stats.retries, subscription.stats.undecodable) == (1, 1)

    topic = subscription.dead_letter_topic
    assert topic == f"{settings.topic_prefix}.dead-letter.dl-group"
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=settings.profile.fetch_wait_ms())
    await consumer.start()
    try:
        partition = partition_for("dl-a", settings.partitions)
        consumer.assign([TopicPartition(topic, partition)])
        parked = []
        async with asyncio.timeout(10):
            while len(parked) < 2:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    parked.extend(records)
    finally:
        await consumer.stop()
    by_error = {dict(record.headers)["tf.error.type"]: record for record in parked}
    assert set(by_error) == {b"ValueError", b"DecodeError"}
    failed, undecodable = dict(by_error[b"ValueError"].headers), dict(by_error[b"DecodeError"].headers)
    assert failed["tf.error.message"] == f"cannot handle {poison}".encode()
    assert (failed["tf.attempts"], undecodable["tf.attempts"]) == (b"2", b"0")
    assert undecodable["tf.source.offset"] == str(bad.offset).encode()
    assert {failed["tf.group"], undecodable["tf.group"]} == {b"dl-group"}
    assert by_error[b"DecodeError"].value == b"garbage" and by_error[b"ValueError"].key == b"dl-a"
    assert by_error[b"ValueError"].value == EVENTS.encode(trees["dl-a"][1])
    # Everything, the parked records included, is committed: a restart hands nothing again.
    assert subscription.stats.committed[partition] == bad.offset + 1


async def test_two_instances_share_the_trees_and_a_rebalance_repeats_nothing(settings: KafkaSettings) -> None:
    """No engine: trees written by hand in two waves; a second instance joins between them."""
    await ensure_topics(settings)
    roots = [f"share-{n}" for n in range(40)]
    contexts = {root: context(root, root) for root in roots}
    kinds = [EventType.WORKFLOW_EXECUTION_STARTED, EventType.TIMER_STARTED, EventType.TIMER_FIRED,
             EventType.ACTIVITY_TASK_SCHEDULED, EventType.ACTIVITY_TASK_STARTED, EventType.WORKFLOW_EXECUTION_COMPLETED]
    waves = [[event_of(kinds[step], contexts[root], step + 1) for step in steps for root in roots]
             for steps in (range(0, 3), range(3, 6))]
    handled: list[tuple[str, str, str]] = []

    def handler_of(instance: str) -> Any:
        async def handle(event: TreeEvent[Any]) -> None:
            await asyncio.sleep(0.005)
            handled.append((instance, event.root_workflow_exec_id, event.event_id))
        return handle

    options = replace(FAST, max_in_flight=2, max_buffered=20)
    await write_events(settings, waves[0])
    async with subscribe(handler_of("first"), group_id="share", settings=settings, options=options) as first:
        await wait_for(lambda: len(handled) >= 20)
        async with subscribe(handler_of("second"), group_id="share", settings=settings, options=options) as second:
            await second.wait_assigned()
            await write_events(settings, waves[1])
            await wait_for(lambda: len(handled) >= 240, timeout=40)
            await asyncio.sleep(0.3)  # anything handled twice would show up now
    ids = [event_id for _, _, event_id in handled]
    assert Counter(ids) == Counter(e.event_id for wave in waves for e in wave)
    for root in roots:
        assert [event_id for _, r, event_id in handled if r == root] == [f"{root}:{n}" for n in range(1, 7)]
    assert first.stats.handled + second.stats.handled == 240
    assert second.stats.handled > 0 and first.stats.handled > 0


async def test_a_new_group_starting_live_gets_only_new_events(settings: KafkaSettings) -> None:
    """`from_beginning=False`: the true end, also where the broker's ListOffsets is too low
    (Tansu after a multi-record batch); and the start is committed, so a restart keeps it."""
    await ensure_topics(settings)
    ctx = context("live-1", "live-1")
    old = [event_of(EventType.ACTIVITY_TASK_SCHEDULED, ctx, n) for n in range(1, 7)]
    await write_events(settings, old)  # one batch of six records
    handled: list[str] = []

    async def handler(event: TreeEvent[Any]) -> None:
        handled.append(event.event_id)

    options = replace(FAST, from_beginning=False)
    async with subscribe(handler, group_id="live-group", settings=settings, options=options) as subscription:
        await subscription.wait_assigned()
        new = [event_of(EventType.ACTIVITY_TASK_SCHEDULED, ctx, n) for n in (7, 8)]
        await write_events(settings, new)
        await wait_for(lambda: len(handled) >= 2)
        await asyncio.sleep(0.3)
    assert handled == [e.event_id for e in new]
    handled.clear()
    async with subscribe(handler, group_id="live-group", settings=settings, options=options) as again:
        await again.wait_assigned()
        await asyncio.sleep(0.5)
    assert handled == []


def test_service_options_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match=r"initial_backoff must be a datetime.timedelta, not 0.05"):
        ServiceOptions(initial_backoff=0.05)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_attempts"):
        ServiceOptions(max_attempts=0)
    with pytest.raises(ValueError, match="backoff_coefficient"):
        ServiceOptions(backoff_coefficient=0.5)


async def test_a_failed_subscription_raises_out_of_async_with(settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    ctx = context("boom-1", "boom-1")
    await write_events(settings, [event_of(EventType.WORKFLOW_EXECUTION_STARTED, ctx, 1)])

    class Exploding(EventFilter):
        def matches(self, event: Any) -> bool:
            raise RuntimeError("the filter broke")

    async def handler(event: TreeEvent[Any]) -> None:
        pass

    subscription = ServiceSubscription(handler, group_id="boom-group", settings=settings,
                                       event_filter=Exploding(), options=FAST)
    with pytest.raises(RuntimeError, match="the filter broke"):
        async with subscription:
            await wait_for(lambda: subscription.stats.failure is not None)
    assert subscription.stats.failure == "RuntimeError: the filter broke"
