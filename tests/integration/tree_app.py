"""A three-level workflow tree with an abandoned child, for the consumer library's tests.

    tree_root ─┬─ tree_child ── tree_grandchild ── leaf_step
               └─ tree_straggler (wait=False, so ABANDON): sleeps, then leaf_step

The straggler outlives its parent: the tree closes only when it does.
"""

from __future__ import annotations

from pydantic import BaseModel

import treeflow as workflows
from treeflow import workflow
from treeflow.consumers import ConsumedEvent, EventReader
from treeflow.kafka import KafkaSettings


@workflows.activity()
async def leaf_step(value: str) -> str:
    return f"leaf:{value}"


class TreeInput(BaseModel):
    value: str
    #: How long the abandoned straggler sleeps before its activity.
    straggler_seconds: float = 1.0


@workflows.workflow.define(name="tree_grandchild")
class Grandchild:
    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        return await leaf_step(value)


@workflows.workflow.define(name="tree_child")
class Child:
    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        return "child(" + await workflows.execute_workflow(Grandchild, params=value) + ")"


@workflows.workflow.define(name="tree_straggler")
class Straggler:
    @workflows.workflow.entrypoint
    async def run(self, params: TreeInput) -> str:
        await workflow.sleep(params.straggler_seconds)
        return await leaf_step("late-" + params.value)


@workflows.workflow.define(name="tree_root")
class Root:
    @workflows.workflow.entrypoint
    async def run(self, params: TreeInput) -> str:
        await workflows.execute_workflow(Straggler, params=params, wait=False)
        return "root(" + await workflows.execute_workflow(Child, params=params.value) + ")"


WORKFLOWS = [Root, Child, Grandchild, Straggler]
ACTIVITIES = [leaf_step]


async def logged_tree(settings: KafkaSettings, root: str) -> list[ConsumedEvent]:
    """Ground truth for a tree: its events as a scan of every partition finds them, in log order."""
    return [item async for item in EventReader(settings)
            if item.event.workflow_context.root_workflow_exec_id == root]
