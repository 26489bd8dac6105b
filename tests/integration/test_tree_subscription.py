"""subscribe_tree on the real (embedded) broker, with the engine writing the events."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from treeflow.consumers import Cursor, CursorError, TreeEvent, subscribe_tree
from treeflow.consumers.lookup import find_root
from treeflow.kafka import KafkaSettings, ensure_topics, partition_for
from treeflow.schemas import EventType, ParentClosePolicy
from treeflow.testing import Environment
from tests.integration import tree_app
from tests.integration.tree_app import logged_tree
from tests.samples import context, event_of, write_events

pytestmark = pytest.mark.integration

T = EventType


async def collect(subscription: Any, timeout: float = 20.0) -> list[TreeEvent[Any]]:
    async with asyncio.timeout(timeout):
        return [event async for event in subscription]


async def start_tree(tree_env: Environment, straggler_seconds: float = 1.0) -> str:
    root = f"root-{uuid.uuid4().hex[:8]}"
    await tree_env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value="v", straggler_seconds=straggler_seconds),
                                    execution_id=root)
    return root


async def test_a_three_level_tree_arrives_whole_in_order_and_ends_when_the_abandoned_child_closes(
        tree_env: Environment) -> None:
    root = f"root-{uuid.uuid4().hex[:8]}"
    # Subscribed live before the tree exists: it sees the tree from its first event.
    subscription = subscribe_tree(root, from_beginning=False, until_closed=True, settings=tree_env.settings)
    await subscription.start()  # from here on, every appended event is delivered
    collecting = asyncio.ensure_future(collect(subscription))
    await tree_env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value="v", straggler_seconds=1.0),
                                    execution_id=root)
    events = await collecting

    truth = await logged_tree(tree_env.settings, root)
    assert [e.event_id for e in events] == [item.event.event_id for item in truth]
    partition = partition_for(root, tree_env.settings.partitions)
    assert [(e.position.partition, e.position.offset) for e in events] == [(i.partition, i.offset) for i in truth]
    assert subscription.stats.partition == partition
    cursors = [int(e.cursor) for e in events]
    assert cursors == sorted(set(cursors))

    # Three levels, each with the right context.
    names = {e.workflow_exec_id: e.workflow_context.workflow_name for e in events}
    by_name = {name: exec_id for exec_id, name in names.items()}
    assert set(by_name) == {"tree_root", "tree_child", "tree_grandchild", "tree_straggler"}
    parents = {e.workflow_exec_id: e.workflow_context.parent_workflow_exec_id for e in events}
    assert parents == {root: None, by_name["tree_child"]: root, by_name["tree_straggler"]: root,
                       by_name["tree_grandchild"]: by_name["tree_child"]}
    assert {e.root_workflow_exec_id for e in events} == {root}
    for exec_id in names:
        assert [e.sequence for e in events if e.workflow_exec_id == exec_id] == list(
            range(1, 1 + sum(e.workflow_exec_id == exec_id for e in events)))
    order = [(e.workflow_exec_id, e.event_type) for e in events]
    grandchild, child = by_name["tree_grandchild"], by_name["tree_child"]
    assert order.index((child, T.WORKFLOW_EXECUTION_STARTED)) < order.index((grandchild, T.WORKFLOW_EXECUTION_STARTED))
    assert order.index((grandchild, T.WORKFLOW_EXECUTION_COMPLETED)) < order.index(
        (child, T.CHILD_WORKFLOW_EXECUTION_COMPLETED))
    # Payloads come typed.
    completed = next(e for e in events if e.event_type is T.WORKFLOW_EXECUTION_COMPLETED and e.workflow_exec_id == root)
    assert completed.payload.result_json == '"root(child(leaf:v))"'

    # The root closed first, abandoning the straggler; the stream ended with the straggler's close.
    applied = [e for e in events if e.event_type is T.PARENT_CLOSE_POLICY_APPLIED]
    assert [(e.payload.child_workflow_exec_id, e.payload.policy) for e in applied] == [
        (by_name["tree_straggler"], ParentClosePolicy.ABANDON)]
    assert order.index((root, T.WORKFLOW_EXECUTION_COMPLETED)) < len(order) - 1
    assert order[-1] == (by_name["tree_straggler"], T.WORKFLOW_EXECUTION_COMPLETED)
    assert subscription.tree.closed and subscription.tree.open_executions() == []


async def test_a_dropped_subscription_resumes_from_its_cursor_repeating_and_skipping_nothing(
        tree_env: Environment) -> None:
    root = await start_tree(tree_env, straggler_seconds=0.8)
    first: list[TreeEvent[Any]] = []
    async with subscribe_tree(root, settings=tree_env.settings) as subscription:
        async for event in subscription:
            first.append(event)
            if len(first) == 7:
                break  # the connection "drops" mid-tree, while the tree still runs
    resumed = await collect(subscribe_tree(root, cursor=first[-1].cursor, until_closed=True, settings=tree_env.settings))
    truth = [item.event.event_id for item in await logged_tree(tree_env.settings, root)]
    assert [e.event_id for e in first + resumed] == truth
    assert not set(e.event_id for e in first) & set(e.event_id for e in resumed)

    # Any cursor of the finished tree resumes right after its event; an int or a Cursor works too.
    everything = first + resumed
    for k in (0, len(everything) // 2, len(everything) - 2):
        again = await collect(subscribe_tree(root, cursor=Cursor.parse(int(everything[k].cursor)),
                                             until_closed=True, settings=tree_env.settings))
        assert [e.event_id for e in again] == truth[k + 1:]
    # The last event's cursor: the tree is closed, nothing follows, the stream ends at once.
    assert await collect(subscribe_tree(root, cursor=everything[-1].cursor, until_closed=True,
                                        settings=tree_env.settings)) == []
    # Live, after the tree closed: nothing, and it ends.
    assert await collect(subscribe_tree(root, from_beginning=False, until_closed=True, settings=tree_env.settings)) == []


async def test_a_cursor_of_another_partition_or_past_the_end_is_refused(tree_env: Environment) -> None:
    root = await start_tree(tree_env, straggler_seconds=0.0)
    partition = partition_for(root, tree_env.settings.partitions)
    other = (partition + 1) % tree_env.settings.partitions
    with pytest.raises(CursorError, match="belongs to another tree"):
        await collect(subscribe_tree(root, cursor=Cursor(other, 0), settings=tree_env.settings))
    with pytest.raises(CursorError, match="past the end"):
        await collect(subscribe_tree(root, cursor=Cursor(partition, 10**9), settings=tree_env.settings))


async def test_filters_keep_only_the_asked_types_and_names(tree_env: Environment) -> None:
    root = await start_tree(tree_env, straggler_seconds=0.0)
    closes = await collect(subscribe_tree(
        root, event_types="WORKFLOW_EXECUTION_COMPLETED,CHILD_WORKFLOW_EXECUTION_COMPLETED",
        workflow_names=["tree_root", "tree_grandchild"], until_closed=True, settings=tree_env.settings))
    kept = {T.WORKFLOW_EXECUTION_COMPLETED, T.CHILD_WORKFLOW_EXECUTION_COMPLETED}
    expected = [item.event.event_id for item in await logged_tree(tree_env.settings, root)
                if item.event.event_type in kept
                and item.event.workflow_context.workflow_name in {"tree_root", "tree_grandchild"}]
    assert [e.event_id for e in closes] == expected
    assert Counter((e.workflow_context.workflow_name, e.event_type) for e in closes)[
        ("tree_grandchild", T.WORKFLOW_EXECUTION_COMPLETED)] == 1
    assert {e.workflow_context.workflow_name for e in closes} == {"tree_root", "tree_grandchild"}
    assert closes[-1].event_type is T.WORKFLOW_EXECUTION_COMPLETED


async def test_undecodable_and_duplicate_records_are_skipped_and_counted(settings: KafkaSettings, caplog) -> None:
    """No engine: records written by hand, a bad one and a second delivery among them."""
    await ensure_topics(settings)
    root = "hand-root"
    ctx, child = context(root, root), context(f"{root}.c", root, parent=root)
    tree = [event_of(T.WORKFLOW_EXECUTION_STARTED, ctx, 1), event_of(T.WORKFLOW_EXECUTION_STARTED, child, 1),
            event_of(T.WORKFLOW_EXECUTION_COMPLETED, child, 2), event_of(T.WORKFLOW_EXECUTION_COMPLETED, ctx, 2)]
    # Another tree in the same partition, which the subscription must not decode.
    neighbour = next(f"n-{i}" for i in range(1000)
                     if partition_for(f"n-{i}", settings.partitions) == partition_for(root, settings.partitions))
    await write_events(settings, tree[:2] + [event_of(T.WORKFLOW_EXECUTION_STARTED, context(neighbour, neighbour), 1)])
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **settings.profile.producer_options())
    await producer.start()
    bad = await producer.send_and_wait(settings.topics.events, b"\xc3\x01not an event", key=root.encode())
    await producer.stop()
    await write_events(settings, [tree[1], *tree[2:]])  # tree[1] delivered twice

    subscription = subscribe_tree(root, until_closed=True, settings=settings)
    with caplog.at_level(logging.ERROR):
        events = await collect(subscription)
    assert [e.to_event() for e in events] == tree
    assert subscription.stats.undecodable == 1
    assert subscription.stats.duplicates == 1
    assert subscription.stats.yielded == 4
    assert subscription.stats.fetched_records == 7  # the tree's 5 + the bad one + the neighbour's
    assert f"{settings.topics.events}[{bad.partition}]@{bad.offset}" in caplog.text


async def test_the_root_of_an_execution_is_found_from_its_id_or_by_a_scan(settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    root = "find-root"
    named = context(f"{root}.a1.b2", root, parent=f"{root}.a1")
    custom = context("chosen-by-the-workflow", root, parent=root)
    await write_events(settings, [event_of(T.WORKFLOW_EXECUTION_STARTED, context(root, root), 1),
                                  event_of(T.WORKFLOW_EXECUTION_STARTED, named, 1),
                                  event_of(T.WORKFLOW_EXECUTION_STARTED, custom, 1)])
    assert await find_root(settings, root) == root
    assert await find_root(settings, f"{root}.a1.b2") == root  # a dot-prefix of the id
    assert await find_root(settings, "chosen-by-the-workflow") is None  # its partition is not the root's...
    assert await find_root(settings, "chosen-by-the-workflow", scan=True) == root  # ...a scan finds it
    assert await find_root(settings, "nobody", scan=True) is None
