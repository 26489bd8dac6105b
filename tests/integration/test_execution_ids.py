"""Execution ids name one tree (README "Execution ids"): lookups never land on another tree.

Two trees in different partitions whose children have the same explicit id: looking
the id up without its root is an error naming both roots (not either tree at random);
an id whose home tree (its root is the id or a dot-prefix of it) holds it resolves
there even when another tree holds an execution of the same id.
"""

from __future__ import annotations

import asyncio

import pytest

import treeflow as workflows
from treeflow.errors import CommandRejectedError
from treeflow.kafka import partition_for
from treeflow.testing import Environment

pytestmark = pytest.mark.integration


@workflows.workflow.define(name="ids_leaf")
class Leaf:
    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        return value


@workflows.workflow.define(name="ids_parent")
class Parent:
    @workflows.workflow.entrypoint
    async def run(self, child_id: str) -> str:
        return await workflows.execute_workflow(Leaf, params=child_id, execution_id=child_id)


def ids_in_distinct_partitions(prefix: str, count: int, partitions: int) -> list[str]:
    found: dict[int, str] = {}
    n = 0
    while len(found) < count:
        candidate = f"{prefix}{n}"
        found.setdefault(partition_for(candidate, partitions), candidate)
        n += 1
    return list(found.values())


async def test_the_same_child_id_in_two_trees_is_never_resolved_to_one_of_them(broker) -> None:
    async with Environment(workflows=[Leaf, Parent], bootstrap_servers=broker.bootstrap_servers,
                           profile=broker.profile) as env:
        client, partitions = env.client, env.settings.partitions
        first, second = ids_in_distinct_partitions("tree-", 2, partitions)
        for root in (first, second):
            handle = await client.start_workflow(Parent, "dup-child", execution_id=root)
            assert await asyncio.wait_for(handle.result(), 60) == "dup-child"
        fresh = workflows.Client(env.settings)  # a client that knows no roots yet
        await fresh.start()
        try:
            with pytest.raises(CommandRejectedError, match="used in 2 trees"):
                await fresh.find_root("dup-child")
            # With the root given, each tree's own execution.
            for root in (first, second):
                described = await fresh.describe("dup-child", root_execution_id=root)
                assert described.root_execution_id == root and described.parent_execution_id == root

            # An id whose home tree holds it resolves there, whatever other trees hold.
            home, elsewhere = ids_in_distinct_partitions("home-", 2, partitions)
            child_id = f"{home}.x"
            if partition_for(elsewhere, partitions) == partition_for(home, partitions):
                pytest.skip("needs two partitions")
            for root in (elsewhere, home):  # the foreign one first in the log
                handle = await client.start_workflow(Parent, child_id, execution_id=root)
                assert await asyncio.wait_for(handle.result(), 60) == child_id
            assert await fresh.find_root(child_id) == home
        finally:
            await fresh.close()
