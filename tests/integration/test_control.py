"""Reaching into running executions from outside, on the real (embedded) broker: signals,
queries, wait_condition, continue-as-new, cancellation, and the CLI on a three-level tree."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import pytest_asyncio
from click.testing import CliRunner, Result
from pydantic import BaseModel

import treeflow as workflows
from treeflow import ParentClosePolicy, workflow
from treeflow.cli import main
from treeflow.core import Status
from treeflow.kafka import ensure_topics, partition_for
from treeflow.schemas import EventType
from treeflow.testing import Environment
from treeflow.worker.worker import Worker
from tests.polling import eventually
from tests.control_workflows import (
    CALLS,
    AwaitsChild,
    CleansUp,
    Collector,
    Counter,
    IgnoresCancel,
    Item,
    SleepyChild,
    Waiter,
    long_step,
    record,
)

pytestmark = pytest.mark.integration
T = EventType
#: A task queue whose topic exists and that no worker serves.
NO_WORKER_QUEUE = "nobody-home"


class Node(BaseModel):
    depth: int
    child_id: str | None = None  # None: the default id, <parent id>.<suffix>
    grandchild_id: str | None = None


@workflow.define(name="control_node")
class TreeNode:
    def __init__(self) -> None:
        self.notes: list[str] = []
        self.stopped = False

    @workflow.signal
    def note(self, text: str) -> None:
        self.notes.append(text)

    @workflow.signal
    def stop(self) -> None:
        self.stopped = True

    @workflow.query
    def notes_so_far(self) -> list[str]:
        return self.notes

    @workflow.entrypoint
    async def run(self, node: Node) -> str:
        if node.depth > 0:
            await workflows.execute_workflow(TreeNode, Node(depth=node.depth - 1, child_id=node.grandchild_id),
                                             execution_id=node.child_id, wait=False,
                                             parent_close_policy=ParentClosePolicy.TERMINATE)
        await workflow.wait_condition(lambda: self.stopped)
        return ",".join(self.notes)


@workflow.define(name="control_orphan", task_queue=NO_WORKER_QUEUE)
class Orphan:
    @workflow.query
    def anything(self) -> str:
        return "never asked"

    @workflow.entrypoint
    async def run(self) -> None:
        return None


@pytest_asyncio.fixture(scope="module")
async def env(broker):
    async with Environment(workflows=[Collector, Waiter, Counter, CleansUp, IgnoresCancel, SleepyChild, AwaitsChild,
                                      TreeNode],
                           activities=[record, long_step], task_queues=["default"],
                           bootstrap_servers=broker.bootstrap_servers, profile=broker.profile) as environment:
        await ensure_topics(environment.settings, [NO_WORKER_QUEUE])
        yield environment


@pytest.fixture(autouse=True)
def reset_calls() -> None:
    CALLS.clear()


def types_of(events: list[Any]) -> list[str]:
    return [e.event_type.value for e in events]


async def test_signals_arrive_in_order_and_queries_read_the_current_state(env: Environment) -> None:
    handle = await env.client.start_workflow(Collector, execution_id="collector-1")
    await handle.signal("add", Item(name="apple", quantity=1))
    await handle.signal(Collector.add, {"name": "pear", "quantity": 2})  # by method, payload as plain JSON
    assert await handle.query(Collector.current_items) == ["applex1", "pearx2"]  # sees every accepted signal
    env.processor.runner._cache.clear()  # a fresh worker: the next task replays the signals from history
    await handle.signal("add", Item(name="apricot", quantity=3))
    assert await handle.query("count_of", "ap") == 2
    before = len(await handle.history())
    assert await handle.query("items") == ["applex1", "pearx2", "apricotx3"]
    await handle.signal(Collector.finish)
    assert await handle.result(timeout=15) == ["|", "applex1", "pearx2", "apricotx3"]
    assert CALLS == ["finishing"]
    history = await handle.history()
    signaled = [(e.payload.signal_name, e.payload.input_json) for e in history
                if e.event_type is T.WORKFLOW_EXECUTION_SIGNALED]
    assert signaled == [("add", '{"name":"apple","quantity":1}'), ("add", '{"name":"pear","quantity":2}'),
                        ("add", '{"name":"apricot","quantity":3}'), ("finish", None)]
    assert types_of(history[before:]).count("WORKFLOW_EXECUTION_SIGNALED") == 1  # queries appended nothing
    assert env.processor.runner.replays >= 2


async def test_a_query_says_why_it_has_no_answer(env: Environment) -> None:
    handle = await env.client.start_workflow(Collector, execution_id="collector-2")
    with pytest.raises(workflows.WorkflowQueryError) as unknown:
        await handle.query("no_such_query")
    assert unknown.value.type == "QueryNotFound"
    assert "has no query named 'no_such_query'" in str(unknown.value) and "'items'" in str(unknown.value)

    await handle.signal("finish")
    await handle.result(timeout=15)
    with pytest.raises(workflows.WorkflowQueryError) as closed:
        await handle.query("items")
    assert closed.value.type == "WorkflowClosed" and "already closed (COMPLETED)" in str(closed.value)

    with pytest.raises(workflows.WorkflowQueryError) as missing:
        await env.client.get_handle("ghost", root_execution_id="ghost").query("items")
    assert missing.value.type == "WorkflowNotFound"

    orphan = await env.client.start_workflow(Orphan, execution_id="orphan-1")
    started = time.monotonic()
    with pytest.raises(workflows.QueryTimeoutError) as timed_out:
        await orphan.query("anything", timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 10
    assert isinstance(timed_out.value, TimeoutError) and timed_out.value.type == "QueryTimeout"
    assert f"no worker of task queue {NO_WORKER_QUEUE!r} answered" in str(timed_out.value)
    assert "the execution is RUNNING" in str(timed_out.value)
    await orphan.terminate("test over")


async def test_a_worker_of_another_deployment_answers_queries_from_its_cached_instance(env: Environment) -> None:
    queue = "remote-workers"
    await ensure_topics(env.settings, [queue])
    worker = Worker(env.settings, {"collector": Collector.__treeflow_workflow__}, {"record": record}, [queue])
    await worker.start()
    try:
        handle = await env.client.start_workflow(Collector, execution_id="remote-1", task_queue=queue)
        await handle.signal(Collector.add, Item(name="plum", quantity=4))
        assert await handle.query(Collector.current_items, timeout=20) == ["plumx4"]
        await handle.signal(Collector.finish)
        assert await handle.result(timeout=15) == ["|", "plumx4"]
    finally:
        await worker.stop(grace=1)
    assert worker.stats.query_tasks == 1 and worker.stats.workflow_tasks >= 2 and worker.stats.activity_tasks == 1
    assert (worker.runner.replays, worker.runner.query_replays) == (1, 0)  # one instance, kept across tasks
    assert env.processor.stats.remote_tasks >= 3


async def test_wait_condition_with_and_without_a_timeout(env: Environment) -> None:
    timed = await env.client.start_workflow(Waiter, 0.3)
    assert await timed.result(timeout=15) == "timed out after 0.3s"
    assert {"TIMER_STARTED", "TIMER_FIRED"} <= set(types_of(await timed.history()))

    untimed = await env.client.start_workflow(Waiter, None)
    await asyncio.sleep(0.5)
    assert (await untimed.describe()).status is Status.RUNNING
    await untimed.signal(Waiter.go)
    assert await untimed.result(timeout=15) == "ready"
    assert "TIMER_STARTED" not in types_of(await untimed.history())


async def test_continue_as_new_keeps_the_id_and_starts_new_runs(env: Environment) -> None:
    handle = await env.client.start_workflow(Counter, 1, execution_id="counter-1")
    assert await handle.result(timeout=15) == "done at 3"
    assert CALLS == ["run 1", "run 2", "run 3"]
    history = await handle.history()
    runs = list(dict.fromkeys(e.workflow_context.workflow_run_id for e in history))
    assert len(runs) == 3 and runs[0] == handle.run_id
    continued = [e for e in history if e.event_type is T.WORKFLOW_EXECUTION_CONTINUED_AS_NEW]
    assert [e.payload.new_workflow_run_id for e in continued] == runs[1:]
    assert {e.workflow_context.workflow_exec_id for e in history} == {"counter-1"}
    assert history[-1].event_type is T.WORKFLOW_EXECUTION_COMPLETED
    description = await handle.describe()
    assert (description.run_id, description.status) == (runs[2], Status.COMPLETED)


async def test_cancel_reaches_the_awaited_activity_the_workflow_cleans_up_and_ends_canceled(
        env: Environment) -> None:
    handle = await env.client.start_workflow(CleansUp, "c1", execution_id="cleans-up-1")
    await eventually(handle.history, lambda h: "ACTIVITY_TASK_STARTED" in types_of(h))
    await handle.cancel("user asked")
    with pytest.raises(workflows.WorkflowFailureError) as caught:
        await handle.result(timeout=15)
    assert caught.value.status == "CANCELED"
    types = types_of(await handle.history())
    assert types[-1] == "WORKFLOW_EXECUTION_CANCELED"
    tail = types[types.index("WORKFLOW_EXECUTION_CANCEL_REQUESTED"):]
    assert tail.index("ACTIVITY_TASK_CANCEL_REQUESTED") < tail.index("ACTIVITY_TASK_CANCELED") < tail.index(
        "ACTIVITY_TASK_COMPLETED")
    assert CALLS == ["cleanup c1"]  # long_step never finished


async def test_a_workflow_that_ignores_the_cancel_keeps_running(env: Environment) -> None:
    handle = await env.client.start_workflow(IgnoresCancel, execution_id="ignores-1")
    await eventually(handle.history, lambda h: "TIMER_STARTED" in types_of(h))
    await handle.cancel()
    assert await handle.result(timeout=15) == "kept running"
    types = types_of(await handle.history())
    assert types.index("WORKFLOW_EXECUTION_CANCEL_REQUESTED") < types.index("TIMER_CANCELED")
    assert types[-1] == "WORKFLOW_EXECUTION_COMPLETED"


async def test_cancel_propagates_to_the_awaited_child_which_cleans_up_first(env: Environment) -> None:
    handle = await env.client.start_workflow(AwaitsChild, "p1", execution_id="p1")
    child = env.client.get_handle("p1.kid")  # root looked up from the id
    await eventually(child.history, lambda h: "ACTIVITY_TASK_STARTED" in types_of(h))
    assert child.root_execution_id == "p1"
    await handle.cancel()
    with pytest.raises(workflows.WorkflowFailureError) as caught:
        await handle.result(timeout=15)
    assert caught.value.status == "CANCELED"
    child_events = await child.history()
    [request] = [e for e in child_events if e.event_type is T.WORKFLOW_EXECUTION_CANCEL_REQUESTED]
    assert request.payload.reason == "parent p1 asked"
    assert types_of(child_events)[-1] == "WORKFLOW_EXECUTION_CANCELED"
    assert "ACTIVITY_TASK_CANCEL_REQUESTED" in types_of(child_events)
    parent_types = types_of(await handle.history())
    assert parent_types[-3:] == ["CHILD_WORKFLOW_EXECUTION_CANCELED", "WORKFLOW_TASK_COMPLETED",
                                 "WORKFLOW_EXECUTION_CANCELED"]
    assert CALLS == ["child cleanup p1"]


async def cli(*args: str) -> Result:
    """Run the CLI in a thread (it runs its own event loop); the environment's TREEFLOW_* apply."""
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def test_the_cli_reaches_every_execution_of_a_three_level_tree(env: Environment) -> None:
    # The child gets a default id (cli-root-2.<suffix>: its root is found from its id); the
    # grandchild an id that names no ancestor, in another partition: found by scanning them all.
    partitions = env.settings.partitions
    grandchild_id = next(name for name in (f"gk-{i}" for i in range(100))
                         if partition_for(name, partitions) != partition_for("cli-root-2", partitions))
    root = await env.client.start_workflow(TreeNode, Node(depth=2, grandchild_id=grandchild_id),
                                           execution_id="cli-root-2")
    tree = await eventually(lambda: env.client.describe_tree("cli-root-2"), lambda tree: len(tree) == 3)
    child_id = tree[1].execution_id
    assert child_id.startswith("cli-root-2.") and tree[2].execution_id == grandchild_id
    assert tree[2].parent_execution_id == child_id and tree[2].root_execution_id == "cli-root-2"

    done = await cli("describe", "--tree", "cli-root-2")
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == [
        "cli-root-2  control_node  RUNNING",
        f"  {child_id}  control_node  RUNNING",
        f"    {grandchild_id}  control_node  RUNNING"]

    done = await cli("signal", grandchild_id, "note", "--input", '"hello from the cli"')
    assert done.exit_code == 0, done.output
    done = await cli("query", grandchild_id, "notes_so_far")
    assert (done.exit_code, done.output.strip()) == (0, '["hello from the cli"]')
    done = await cli("query", child_id, "notes_so_far", "--timeout", "5")
    assert (done.exit_code, done.output.strip()) == (0, "[]")
    done = await cli("query", child_id, "nope")
    assert done.exit_code == 1 and "QueryNotFound" in done.output

    done = await cli("terminate", grandchild_id, "--reason", "enough")
    assert done.exit_code == 0, done.output
    done = await cli("cancel", child_id, "--reason", "cli says stop")
    assert done.exit_code == 0, done.output
    await eventually(lambda: env.client.describe(child_id), lambda d: d.status is Status.CANCELED)
    done = await cli("signal", "cli-root-2", "stop")
    assert done.exit_code == 0, done.output
    assert await root.result(timeout=15) == ""

    done = await cli("describe", "--tree", grandchild_id)  # any id of the tree finds the whole tree
    assert done.output.splitlines() == [
        "cli-root-2  control_node  COMPLETED",
        f"  {child_id}  control_node  CANCELED",
        f"    {grandchild_id}  control_node  TERMINATED"]
    grandchild_events = await env.client.history(grandchild_id)
    assert grandchild_events[-1].payload.reason == "enough"
    done = await cli("query", child_id, "notes_so_far")
    assert done.exit_code == 1 and "WorkflowClosed" in done.output
    done = await cli("signal", grandchild_id, "note", "--input", "not json")
    assert done.exit_code == 2 and "not JSON" in done.output
    done = await cli("describe", child_id)
    assert "status               CANCELED" in done.output and "root_execution_id    cli-root-2" in done.output
