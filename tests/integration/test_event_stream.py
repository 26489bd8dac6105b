"""Encoded events through a real broker: several partitions, routed by root, and a bad
record that is reported and skipped."""

import logging

import pytest
from aiokafka import AIOKafkaProducer

from treeflow.consumers import EventReader
from treeflow.kafka import KafkaSettings, ensure_topics, partition_for
from treeflow.schemas import EventType
from tests.samples import context, event_of, write_events

pytestmark = pytest.mark.integration


def tree(root: str) -> list:
    """A root with a child and a grandchild, events interleaved as a tree's are."""
    root_ctx = context(root, root)
    child_ctx = context(f"{root}/c", root, parent=root)
    grand_ctx = context(f"{root}/c/g", root, parent=f"{root}/c")
    return [
        event_of(EventType.WORKFLOW_EXECUTION_STARTED, root_ctx, 1),
        event_of(EventType.START_CHILD_WORKFLOW_EXECUTION_INITIATED, root_ctx, 2),
        event_of(EventType.WORKFLOW_EXECUTION_STARTED, child_ctx, 1),
        event_of(EventType.WORKFLOW_EXECUTION_STARTED, grand_ctx, 1),
        event_of(EventType.ACTIVITY_TASK_SCHEDULED, grand_ctx, 2),
        event_of(EventType.WORKFLOW_EXECUTION_COMPLETED, grand_ctx, 3),
        event_of(EventType.WORKFLOW_EXECUTION_COMPLETED, child_ctx, 2),
        event_of(EventType.CHILD_WORKFLOW_EXECUTION_COMPLETED, root_ctx, 3),
        event_of(EventType.WORKFLOW_EXECUTION_COMPLETED, root_ctx, 4),
    ]


def roots_on_distinct_partitions(count: int, partitions: int) -> list[str]:
    roots, used, n = [], set(), 0
    while len(roots) < count:
        candidate, n = f"root-{n}", n + 1
        if partition_for(candidate, partitions) not in used:
            used.add(partition_for(candidate, partitions))
            roots.append(candidate)
    return roots


async def test_trees_come_back_in_order_and_a_bad_record_is_skipped(settings: KafkaSettings, caplog) -> None:
    await ensure_topics(settings)
    roots = roots_on_distinct_partitions(3, settings.partitions)
    trees = {root: tree(root) for root in roots}
    await write_events(settings, trees[roots[0]][:4])
    # Garbage in the middle of the first tree's partition.
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **settings.profile.producer_options())
    await producer.start()
    bad = await producer.send_and_wait(settings.topics.events, b"\x00garbage", key=roots[0].encode())
    await producer.stop()
    await write_events(settings, trees[roots[0]][4:])
    for root in roots[1:]:
        await write_events(settings, trees[root])

    reader = EventReader(settings)
    with caplog.at_level(logging.ERROR):
        consumed = [item async for item in reader]

    for root in roots:
        mine = [item for item in consumed if item.event.workflow_context.root_workflow_exec_id == root]
        assert [item.event for item in mine] == trees[root]
        assert {item.partition for item in mine} == {partition_for(root, settings.partitions)}
        assert [item.offset for item in mine] == sorted(item.offset for item in mine)
    assert reader.stats.undecodable == 1
    assert reader.stats.decoded == 27
    where = f"{settings.topics.events}[{bad.partition}]@{bad.offset}"
    assert any(where in message for message in caplog.messages), caplog.messages


async def test_reading_one_partition_yields_only_its_trees(settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    roots = roots_on_distinct_partitions(2, settings.partitions)
    for root in roots:
        await write_events(settings, tree(root))
    only = partition_for(roots[1], settings.partitions)
    consumed = [item async for item in EventReader(settings, [only])]
    assert {item.event.workflow_context.root_workflow_exec_id for item in consumed} == {roots[1]}
    assert len(consumed) == 9


async def test_a_missing_topic_is_a_clear_error(settings: KafkaSettings) -> None:
    with pytest.raises(LookupError, match="treeflow topics create"):
        [item async for item in EventReader(settings)]
