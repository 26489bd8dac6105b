"""Workflows for the child-workflow tests: trees of any shape, each node told what to start
and how to end. Shared by tests/unit/test_children.py (in memory) and
tests/integration/test_children.py (on the broker). `CALLS` records the `note`
activities that ran (in this process).

A `TreeNode` starts its children (`Edge`: execution id, policy, wait, queue, timeout)
in order, each as fire-and-forget unless the edge says `wait`, then ends as its `then`
says:

- `complete`: returns "<id> done" after a `note` activity;
- `now`: returns at once, no activity;
- `fail`: raises `ApplicationError` (type NodeFailure);
- `wait` (default): waits for the `finish` signal, then as `complete`;
- `await`: awaits each fire-and-forget child's handle in turn and returns the results
  joined by commas, "<STATUS>: <cause>" for a child that raised `ChildWorkflowError`;
- `sleep`: sleeps `sleep` seconds (a durable timer), then as `complete`;
- `nap`: sleeps `sleep` seconds, then returns at once (no activity);
- `same_task`: starts its children in a task of its own and returns in the same
  workflow task, so the starts and the completion reach the processor together;
- `continue`: continues as new (after starting its children); the next run starts no
  children and waits for `finish`;
- `cancel_kids`: cancels each fire-and-forget child through its handle, then as `await`.

A cancel request reaches it as `asyncio.CancelledError`: it runs `note("cleanup <id>")`
and ends CANCELED.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel, Field

import treeflow as workflows
from treeflow import ParentClosePolicy, workflow

CALLS: list[str] = []


@workflows.activity()
async def note(text: str) -> str:
    CALLS.append(text)
    return text


class Edge(BaseModel):
    id: str
    node: Node = Field(default_factory=lambda: Node())
    policy: ParentClosePolicy | None = None  # None: the default for `wait`
    wait: bool = False
    task_queue: str | None = None
    execution_timeout: float | None = None  # seconds


class Node(BaseModel):
    then: str = "wait"
    kids: list[Edge] = []
    sleep: float = 0.0


Edge.model_rebuild()


def edge(id: str, then: str = "wait", kids: list[Edge] | None = None, **options: object) -> Edge:
    """An edge to a child `id` that ends as `then`; `sleep=` goes to the node, the rest to the edge."""
    sleep = float(options.pop("sleep", 0.0))  # type: ignore[arg-type]
    return Edge(id=id, node=Node(then=then, kids=kids or [], sleep=sleep), **options)  # type: ignore[arg-type]


async def start(kid: Edge) -> object:
    timeout = timedelta(seconds=kid.execution_timeout) if kid.execution_timeout is not None else None
    return await workflows.execute_workflow(TreeNode, kid.node, execution_id=kid.id, wait=kid.wait,
                                            parent_close_policy=kid.policy, task_queue=kid.task_queue,
                                            execution_timeout=timeout)


@workflow.define(name="child_tree_node")
class TreeNode:
    def __init__(self) -> None:
        self.finished = False

    @workflow.signal
    def finish(self) -> None:
        self.finished = True

    @workflow.entrypoint
    async def run(self, node: Node) -> str:
        me = workflow.info().workflow_exec_id
        try:
            if node.then == "same_task":
                for kid in node.kids:
                    asyncio.ensure_future(start(kid))
                await asyncio.sleep(0)  # a bare yield: the starts are issued, no timer
                return f"{me} done"
            handles = [await start(kid) for kid in node.kids]
            if node.then == "nap":
                await asyncio.sleep(node.sleep)
            if node.then in ("now", "nap"):
                return f"{me} done"
            if node.then == "continue":
                workflow.continue_as_new(Node(then="wait"))
            if node.then == "cancel_kids":
                for handle in handles:
                    handle.cancel()  # type: ignore[attr-defined]
                node = node.model_copy(update={"then": "await"})
            if node.then == "fail":
                raise workflows.ApplicationError(f"{me} failed on purpose", type="NodeFailure", non_retryable=True)
            if node.then == "wait":
                await workflow.wait_condition(lambda: self.finished)
            elif node.then == "sleep":
                await asyncio.sleep(node.sleep)
            elif node.then == "await":
                results = []
                for handle in handles:
                    try:
                        results.append(str(await handle))  # type: ignore[misc]
                    except workflows.ChildWorkflowError as error:
                        results.append(f"{error.status}: {error.cause}")
                return ",".join(results)
        except asyncio.CancelledError:
            await note(f"cleanup {me}")
            raise
        return await note(f"{me} done")


@workflow.define(name="child_tree_awaits")
class AwaitsOne:
    """Starts one child with `wait=True` and returns its result, or how it failed."""

    @workflow.entrypoint
    async def run(self, kid: Edge) -> str:
        try:
            return await start(kid.model_copy(update={"wait": True}))  # type: ignore[return-value]
        except workflows.ChildWorkflowError as error:
            return f"{error.status}: {type(error.cause).__name__}: {error.cause}"


@workflow.define(name="child_tree_defaults")
class Defaults:
    """A fire-and-forget child and an awaited one, neither naming a policy."""

    @workflow.entrypoint
    async def run(self, ids: list[str]) -> str:
        await workflows.execute_workflow(TreeNode, Node(), execution_id=ids[0], wait=False)
        return await workflows.execute_workflow(TreeNode, Node(), execution_id=ids[1])


class FanOutInput(BaseModel):
    count: int
    prefix: str


@workflow.define(name="child_tree_leaf")
class Leaf:
    @workflow.entrypoint
    async def run(self, value: int) -> int:
        return value * 2


@workflow.define(name="child_tree_fan_out")
class FanOut:
    """Starts `count` children with `asyncio.gather` and waits for all."""

    @workflow.entrypoint
    async def run(self, params: FanOutInput) -> int:
        results = await asyncio.gather(*(
            workflows.execute_workflow(Leaf, i, execution_id=f"{params.prefix}.{i}") for i in range(params.count)))
        assert list(results) == [2 * i for i in range(params.count)]
        return sum(results)


class Attempts(BaseModel):
    key: str
    failures: int


ATTEMPTS: dict[str, int] = {}


@workflows.activity()
async def count_attempt(key: str) -> int:
    ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    return ATTEMPTS[key]


@workflow.define(name="child_tree_flaky")
class FlakyChild:
    """Fails its first `failures` runs (counted by an activity, in this process), then completes."""

    @workflow.entrypoint
    async def run(self, params: Attempts) -> str:
        attempt = await count_attempt(params.key)
        if attempt <= params.failures:
            raise workflows.ApplicationError(f"{params.key} attempt {attempt}: not yet", type="NotYet")
        return f"{params.key} ok after {attempt}"


@workflow.define(name="child_tree_retries")
class RetriesChild:
    @workflow.entrypoint
    async def run(self, params: Attempts) -> str:
        policy = workflows.RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=3)
        return await workflows.execute_workflow(FlakyChild, params, execution_id=f"{params.key}.child",
                                                retry_policy=policy)


WORKFLOWS = [TreeNode, AwaitsOne, Defaults, Leaf, FanOut, FlakyChild, RetriesChild]
ACTIVITIES = [note, count_attempt]
