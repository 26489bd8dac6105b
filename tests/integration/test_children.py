"""Child workflows in full, on the real (embedded) broker: fire-and-forget handles, parent
close policies at every kind of close and recursively, abandoned children, termination,
children on a task queue no worker serves yet, and the edge cases of issue 4 §2 (a start
in flight when the parent closes, a child completing as the parent times out, sweeps
racing a new grandchild, a terminated child awaited by its parent, three levels of mixed
policies, a fan-out of 1,000 children). The workflows are in tests/child_tree.py; the
orders that timing leaves to chance here are pinned in tests/unit/test_children.py.

Every test asserts on the log: it reads the tree's events back from the events topic and
checks the log-wide invariants (`check_log`: sequences 1..n, unique ids, one start and
one close per execution, every event in its root's partition) besides its own points.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from click.testing import CliRunner, Result

import treeflow as workflows
from treeflow import ParentClosePolicy
from treeflow.cli import main
from treeflow.core import Status
from treeflow.kafka import ensure_topics, partition_for
from treeflow.schemas import Event, EventType
from treeflow.schemas import models as m
from treeflow.testing import Environment
from treeflow.worker.worker import Worker
from tests.polling import eventually
from tests.child_tree import (
    ACTIVITIES,
    CALLS,
    WORKFLOWS,
    Attempts,
    AwaitsOne,
    Defaults,
    FanOut,
    FanOutInput,
    Node,
    RetriesChild,
    TreeNode,
    edge,
    note,
)

from .test_durability import check_log, read_events

pytestmark = pytest.mark.integration
T = EventType
P = ParentClosePolicy
#: A queue whose topic exists and that no worker serves until a test starts one.
REMOTE_QUEUE = "children-remote"
#: The queue of the `HoldingWorker`.
HELD_QUEUE = "children-held"
CHILD_EVENTS_AFTER_START = {T.CHILD_WORKFLOW_EXECUTION_COMPLETED, T.CHILD_WORKFLOW_EXECUTION_FAILED,
                            T.CHILD_WORKFLOW_EXECUTION_CANCELED, T.CHILD_WORKFLOW_EXECUTION_TERMINATED,
                            T.CHILD_WORKFLOW_EXECUTION_TIMED_OUT}


class HoldingWorker(Worker):
    """A worker that keeps an armed execution's workflow-task report that starts a child in
    flight (not sent) until the test releases it: the parent's decision to start the child
    is made, and has not reached the processor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed: dict[str, tuple[asyncio.Event, asyncio.Event, asyncio.Event]] = {}

    def arm(self, exec_id: str) -> tuple[asyncio.Event, asyncio.Event, asyncio.Event]:
        """(holding, release, sent): set when the report is held, by the test to let it go,
        and once it is on its way to the broker."""
        self.armed[exec_id] = (asyncio.Event(), asyncio.Event(), asyncio.Event())
        return self.armed[exec_id]

    async def _send(self, command: Any, after: Any = None) -> Any:
        payload = command.payload
        gates = self.armed.get(command.workflow_exec_id)
        if gates is None or not isinstance(payload, m.CompleteWorkflowTask) or not any(
                isinstance(d, m.StartChildWorkflowExecution) for d in payload.decisions):
            return await super()._send(command, after=after)
        holding, release, sent = self.armed.pop(command.workflow_exec_id)
        holding.set()
        await release.wait()
        await super()._send(command, after=after)
        await self._producer.flush()  # type: ignore[union-attr]
        sent.set()


@pytest_asyncio.fixture(scope="module")
async def env(broker):
    async with Environment(workflows=WORKFLOWS, activities=ACTIVITIES, task_queues=["default"],
                           bootstrap_servers=broker.bootstrap_servers, profile=broker.profile) as environment:
        await ensure_topics(environment.settings, [REMOTE_QUEUE, HELD_QUEUE])
        yield environment


@pytest_asyncio.fixture(scope="module")
async def held(env: Environment):
    worker = HoldingWorker(env.settings, {TreeNode.__treeflow_workflow__.name: TreeNode.__treeflow_workflow__},
                           {note.name: note}, [HELD_QUEUE])
    await worker.start()
    yield worker
    await worker.stop(grace=1)


@pytest.fixture(autouse=True)
def reset_calls() -> None:
    CALLS.clear()


# ---------------------------------------------------------------- helpers


async def tree_log(env: Environment, root: str, closed: bool = True, one_run: bool = True) -> list[Event]:
    """The tree's events in log order, read back from the root's partition, after checking
    the log-wide invariants on them (every execution closed once when `closed`; with
    executions of several runs, just sequences 1..n per execution)."""
    assert env.settings is not None
    partition = partition_for(root, env.settings.partitions)
    found = [item for item in await read_events(env.settings, [partition])
             if item[2].workflow_context.root_workflow_exec_id == root]
    if one_run:
        check_log(found, env.settings, closed=closed)
    else:
        for exec_id in {e.workflow_context.workflow_exec_id for _, _, e in found}:
            sequences = [e.sequence for _, _, e in found if e.workflow_context.workflow_exec_id == exec_id]
            assert sequences == list(range(1, len(sequences) + 1)), (exec_id, sequences)
    return [event for _, _, event in found]


def of(events: list[Event], exec_id: str) -> list[Event]:
    return [e for e in events if e.workflow_context.workflow_exec_id == exec_id]


def types_of(events: list[Event]) -> list[str]:
    return [e.event_type.value for e in events]


def position(events: list[Event], exec_id: str, event_type: EventType, child: str | None = None) -> int:
    """Index in `events` of the first `event_type` event of `exec_id` (about `child`, if given)."""
    for index, event in enumerate(events):
        if (event.workflow_context.workflow_exec_id == exec_id and event.event_type is event_type
                and (child is None or getattr(event.payload, "child_workflow_exec_id", None) == child)):
            return index
    raise AssertionError(f"no {event_type.value} of {exec_id}{f' about {child}' if child else ''} in "
                         f"{[(e.workflow_context.workflow_exec_id, e.event_type.value) for e in events]}")


async def status_of(env: Environment, exec_id: str, root: str) -> Status:
    return (await env.client.describe(exec_id, root_execution_id=root)).status


async def closed(env: Environment, exec_id: str, root: str) -> Status:
    """Wait until `exec_id` has closed; its status."""
    description = await eventually(lambda: env.client.describe(exec_id, root_execution_id=root),
                                   lambda d: d.status is not Status.RUNNING)
    return description.status


async def children_started(env: Environment, exec_id: str, root: str, count: int) -> None:
    await eventually(lambda: env.client.history(exec_id, root_execution_id=root),
                     lambda h: types_of(h).count("CHILD_WORKFLOW_EXECUTION_STARTED") >= count)


async def finish(env: Environment, exec_id: str, root: str) -> Any:
    """Signal a waiting node to finish; its result."""
    handle = env.client.get_handle(exec_id, root_execution_id=root)
    await handle.signal("finish")
    return await handle.result(timeout=20)


async def cli(*args: str) -> Result:
    """Run the CLI in a thread (it runs its own event loop); the environment's TREEFLOW_* apply."""
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


# ---------------------------------------------------------------- fan-out


async def test_a_parent_fans_out_1000_children_with_gather_and_all_complete(env: Environment) -> None:
    count = 1000
    began = time.perf_counter()
    result = await env.client.execute_workflow(FanOut, FanOutInput(count=count, prefix="fan"), execution_id="fan")
    elapsed = time.perf_counter() - began
    print(f"\nfan-out of {count} children: {elapsed:.2f} s ({count / elapsed:.0f} children/s)")
    assert result == sum(2 * i for i in range(count))
    events = await tree_log(env, "fan")
    parent = of(events, "fan")
    kids = [f"fan.{i}" for i in range(count)]
    for event_type in (T.START_CHILD_WORKFLOW_EXECUTION_INITIATED, T.CHILD_WORKFLOW_EXECUTION_STARTED,
                       T.CHILD_WORKFLOW_EXECUTION_COMPLETED):
        named = [e.payload.child_workflow_exec_id for e in parent if e.event_type is event_type]
        assert sorted(named) == sorted(kids), event_type
    # gather issued every start in the parent's first workflow task
    second_task = [i for i, e in enumerate(parent) if e.event_type is T.WORKFLOW_TASK_COMPLETED][1]
    assert all(i < second_task for i, e in enumerate(parent) if e.event_type is T.START_CHILD_WORKFLOW_EXECUTION_INITIATED)
    assert T.PARENT_CLOSE_POLICY_APPLIED not in {e.event_type for e in parent}
    assert parent[-1].event_type is T.WORKFLOW_EXECUTION_COMPLETED
    # each child: started after its start was initiated, completed before the parent heard of it
    at = {(e.workflow_context.workflow_exec_id, e.event_type, getattr(e.payload, "child_workflow_exec_id", None)): i
          for i, e in enumerate(events)}
    for kid in kids:
        assert types_of(of(events, kid)) == ["WORKFLOW_EXECUTION_STARTED", "WORKFLOW_TASK_COMPLETED",
                                             "WORKFLOW_EXECUTION_COMPLETED"], kid
        assert (at[("fan", T.START_CHILD_WORKFLOW_EXECUTION_INITIATED, kid)] < at[(kid, T.WORKFLOW_EXECUTION_STARTED, None)]
                < at[("fan", T.CHILD_WORKFLOW_EXECUTION_STARTED, kid)])
        assert at[(kid, T.WORKFLOW_EXECUTION_COMPLETED, None)] < at[("fan", T.CHILD_WORKFLOW_EXECUTION_COMPLETED, kid)]
    assert {e.workflow_context.parent_workflow_exec_id for e in events if e.workflow_context.workflow_exec_id != "fan"} \
        == {"fan"}


# ---------------------------------------------------------------- fire and forget, await, defaults


async def test_fire_and_forget_returns_once_the_child_started_and_the_parent_goes_on(env: Environment) -> None:
    handle = await env.client.start_workflow(TreeNode, Node(then="complete", kids=[edge("ff.k")]), execution_id="ff")
    assert await handle.result(timeout=20) == "ff done"
    assert await status_of(env, "ff.k", "ff") is Status.RUNNING  # abandoned (the default with wait=False)
    events = await tree_log(env, "ff", closed=False)
    # the handle came back once the child's started event was in the log; then the parent went on
    assert (position(events, "ff", T.START_CHILD_WORKFLOW_EXECUTION_INITIATED)
            < position(events, "ff.k", T.WORKFLOW_EXECUTION_STARTED)
            < position(events, "ff", T.CHILD_WORKFLOW_EXECUTION_STARTED)
            < position(events, "ff", T.ACTIVITY_TASK_SCHEDULED)
            < position(events, "ff", T.WORKFLOW_EXECUTION_COMPLETED))
    [initiated] = [e.payload for e in of(events, "ff") if e.event_type is T.START_CHILD_WORKFLOW_EXECUTION_INITIATED]
    assert initiated.parent_close_policy is P.ABANDON
    assert types_of(of(events, "ff"))[-2:] == ["PARENT_CLOSE_POLICY_APPLIED", "WORKFLOW_EXECUTION_COMPLETED"]
    assert await finish(env, "ff.k", "ff") == "ff.k done"
    events = await tree_log(env, "ff")
    assert position(events, "ff", T.WORKFLOW_EXECUTION_COMPLETED) < position(events, "ff.k", T.WORKFLOW_EXECUTION_COMPLETED)
    assert not any(e.event_type in CHILD_EVENTS_AFTER_START for e in of(events, "ff"))  # the parent had closed


async def test_an_abandoned_child_runs_to_its_end_keeps_its_root_and_stays_in_the_roots_partition(
        env: Environment) -> None:
    partitions = env.settings.partitions  # type: ignore[union-attr]
    kid = next(name for name in (f"drifter-{i}" for i in range(100))
               if partition_for(name, partitions) != partition_for("ab", partitions))
    handle = await env.client.start_workflow(TreeNode, Node(then="now", kids=[edge(kid, then="sleep", sleep=0.5)]),
                                             execution_id="ab")
    assert await handle.result(timeout=20) == "ab done"
    child = env.client.get_handle(kid)  # found from its id alone (it names no ancestor)
    assert await child.result(timeout=20) == f"{kid} done"
    assert child.root_execution_id == "ab"
    events = await tree_log(env, "ab")  # check_log: every event of the tree in the root's partition
    assert position(events, "ab", T.WORKFLOW_EXECUTION_COMPLETED) < position(events, kid, T.TIMER_FIRED)
    kid_events = of(events, kid)
    assert types_of(kid_events)[-1] == "WORKFLOW_EXECUTION_COMPLETED"
    assert {(e.workflow_context.parent_workflow_exec_id, e.workflow_context.root_workflow_exec_id)
            for e in kid_events} == {("ab", "ab")}
    own_partition = await read_events(env.settings, [partition_for(kid, partitions)])  # type: ignore[arg-type]
    assert not [e for _, _, e in own_partition if e.workflow_context.workflow_exec_id == kid]
    assert [(d.execution_id, d.status) for d in await env.client.describe_tree("ab")] == [
        ("ab", Status.COMPLETED), (kid, Status.COMPLETED)]


async def test_await_handle_gives_the_childs_result_or_raises_its_failure(env: Environment) -> None:
    handle = await env.client.start_workflow(TreeNode, Node(then="await", kids=[
        edge("aw.ok", then="complete"), edge("aw.bad", then="fail"), edge("aw.slow", execution_timeout=0.5)]),
        execution_id="aw")
    assert await handle.result(timeout=20) == ("aw.ok done,FAILED: NodeFailure: aw.bad failed on purpose,"
                                               "TIMED_OUT: None")
    events = await tree_log(env, "aw")
    [completed] = [e.payload for e in of(events, "aw") if e.event_type is T.CHILD_WORKFLOW_EXECUTION_COMPLETED]
    assert (completed.child_workflow_exec_id, completed.result_json) == ("aw.ok", '"aw.ok done"')
    [failed] = [e.payload for e in of(events, "aw") if e.event_type is T.CHILD_WORKFLOW_EXECUTION_FAILED]
    assert (failed.child_workflow_exec_id, failed.failure.type, failed.failure.message) == (
        "aw.bad", "NodeFailure", "aw.bad failed on purpose")
    assert types_of(of(events, "aw.bad"))[-1] == "WORKFLOW_EXECUTION_FAILED"
    assert types_of(of(events, "aw.slow"))[-1] == "WORKFLOW_EXECUTION_TIMED_OUT"
    assert position(events, "aw.slow", T.WORKFLOW_EXECUTION_TIMED_OUT) < position(
        events, "aw", T.CHILD_WORKFLOW_EXECUTION_TIMED_OUT)
    assert position(events, "aw.bad", T.WORKFLOW_EXECUTION_FAILED) < position(events, "aw",
                                                                              T.CHILD_WORKFLOW_EXECUTION_FAILED)


async def test_a_handle_names_its_child_and_cancels_it(env: Environment) -> None:
    handle = await env.client.start_workflow(TreeNode, Node(then="cancel_kids", kids=[edge("hc.k")]),
                                             execution_id="hc")
    assert await handle.result(timeout=20) == "CANCELED: None"  # `await handle` raised ChildWorkflowError
    events = await tree_log(env, "hc")
    parent = of(events, "hc")
    assert [e.payload.child_workflow_exec_id for e in parent
            if e.event_type is T.CHILD_WORKFLOW_EXECUTION_CANCEL_REQUESTED] == ["hc.k"]
    [request] = [e.payload for e in of(events, "hc.k") if e.event_type is T.WORKFLOW_EXECUTION_CANCEL_REQUESTED]
    assert request.reason == "parent hc asked"
    assert CALLS == ["cleanup hc.k"]
    assert position(events, "hc.k", T.WORKFLOW_EXECUTION_CANCELED) < position(
        events, "hc", T.CHILD_WORKFLOW_EXECUTION_CANCELED)


async def test_the_default_policy_is_abandon_with_wait_false_and_terminate_with_wait_true(env: Environment) -> None:
    handle = await env.client.start_workflow(Defaults, ["df.ff", "df.w"], execution_id="df")
    await children_started(env, "df", "df", 2)
    await handle.terminate("defaults seen")
    events = await tree_log(env, "df", closed=False)
    parent = of(events, "df")
    assert [(e.payload.child_workflow_exec_id, e.payload.parent_close_policy) for e in parent
            if e.event_type is T.START_CHILD_WORKFLOW_EXECUTION_INITIATED] == [("df.ff", P.ABANDON),
                                                                             ("df.w", P.TERMINATE)]
    assert [e.payload.parent_close_policy for e in events if e.event_type is T.WORKFLOW_EXECUTION_STARTED
            and e.workflow_context.parent_workflow_exec_id == "df"] == [P.ABANDON, P.TERMINATE]
    assert [(e.payload.child_workflow_exec_id, e.payload.policy, e.payload.parent_close_status) for e in parent
            if e.event_type is T.PARENT_CLOSE_POLICY_APPLIED] == [("df.ff", P.ABANDON, "TERMINATED"),
                                                                  ("df.w", P.TERMINATE, "TERMINATED")]
    assert types_of(of(events, "df.w"))[-1] == "WORKFLOW_EXECUTION_TERMINATED"
    assert of(events, "df.w")[-1].payload.reason == "parent df closed (TERMINATED)"
    assert await finish(env, "df.ff", "df") == "df.ff done"  # the abandoned one runs to its end
    await tree_log(env, "df")


# ---------------------------------------------------------------- close policies


async def assert_policies_applied(env: Environment, parent: str, root: str, status: str) -> None:
    """`parent` closed with `status` while its children <parent>.t (TERMINATE), .c
    (REQUEST_CANCEL) and .a (ABANDON) were waiting: one PARENT_CLOSE_POLICY_APPLIED each
    right before the parent's closing event; .t terminated (reason: parent closed), .c
    asked to cancel (it cleans up and ends CANCELED), .a still running until told to finish."""
    t, c, a = f"{parent}.t", f"{parent}.c", f"{parent}.a"
    assert await closed(env, t, root) is Status.TERMINATED
    assert await closed(env, c, root) is Status.CANCELED
    assert await status_of(env, a, root) is Status.RUNNING
    events = await tree_log(env, root, closed=False)
    history = of(events, parent)
    assert [(e.payload.child_workflow_exec_id, e.payload.policy, e.payload.parent_close_status)
            for e in history[-4:-1]] == [(t, P.TERMINATE, status), (c, P.REQUEST_CANCEL, status), (a, P.ABANDON, status)]
    assert history[-1].event_type.value == f"WORKFLOW_EXECUTION_{status}"
    assert not any(e.event_type in CHILD_EVENTS_AFTER_START for e in history)  # it closed first
    reason = f"parent {parent} closed ({status})"
    assert of(events, t)[-1].event_type is T.WORKFLOW_EXECUTION_TERMINATED and of(events, t)[-1].payload.reason == reason
    [request] = [e.payload for e in of(events, c) if e.event_type is T.WORKFLOW_EXECUTION_CANCEL_REQUESTED]
    assert request.reason == reason
    assert f"cleanup {c}" in CALLS
    assert position(events, parent, T.PARENT_CLOSE_POLICY_APPLIED) < position(events, t, T.WORKFLOW_EXECUTION_TERMINATED)
    assert position(events, parent, T.PARENT_CLOSE_POLICY_APPLIED) < position(
        events, c, T.WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    assert await finish(env, a, root) == f"{a} done"


def three_kids(parent: str) -> list[Any]:
    return [edge(f"{parent}.t", policy=P.TERMINATE), edge(f"{parent}.c", policy=P.REQUEST_CANCEL),
            edge(f"{parent}.a", policy=P.ABANDON)]


@pytest.mark.parametrize("close", ["completed", "failed", "canceled", "terminated", "timed_out"])
async def test_the_policy_is_applied_at_every_kind_of_parent_close(env: Environment, close: str) -> None:
    root = f"close-{close}"
    then = {"completed": "complete", "failed": "fail"}.get(close, "wait")
    timeout = {"execution_timeout": timedelta(seconds=1.5)} if close == "timed_out" else {}
    handle = await env.client.start_workflow(TreeNode, Node(then=then, kids=three_kids(root)), execution_id=root,
                                             **timeout)
    await children_started(env, root, root, 3)
    if close == "canceled":
        await handle.cancel("canceled by the test")
    elif close == "terminated":
        await handle.terminate("terminated by the test")
    if close == "completed":
        assert await handle.result(timeout=20) == f"{root} done"
    else:
        with pytest.raises(workflows.WorkflowFailureError) as caught:
            await handle.result(timeout=20)
        assert caught.value.status == close.upper()
    await assert_policies_applied(env, root, root, close.upper())
    await tree_log(env, root)


async def test_grandchildren_get_their_own_parents_policy_recursively(env: Environment) -> None:
    handle = await env.client.start_workflow(TreeNode, Node(then="wait", kids=[
        edge("rec.k", policy=P.TERMINATE, kids=three_kids("rec.k"))]), execution_id="rec")
    await children_started(env, "rec.k", "rec", 3)
    await handle.terminate("sweep")
    assert await closed(env, "rec.k", "rec") is Status.TERMINATED
    await assert_policies_applied(env, "rec.k", "rec", "TERMINATED")
    events = await tree_log(env, "rec")
    [applied] = [e.payload for e in of(events, "rec") if e.event_type is T.PARENT_CLOSE_POLICY_APPLIED]
    assert (applied.child_workflow_exec_id, applied.policy) == ("rec.k", P.TERMINATE)
    assert of(events, "rec.k")[-1].payload.reason == "parent rec closed (TERMINATED)"


async def test_continue_as_new_applies_the_policy_to_the_runs_open_children(env: Environment) -> None:
    """The first run starts a TERMINATE and an ABANDON child, then continues as new: its
    close applies their policies; the tree's stream holds both runs and both children."""
    handle = await env.client.start_workflow(TreeNode, Node(then="continue", kids=[
        edge("can.t", policy=P.TERMINATE), edge("can.a", policy=P.ABANDON)]), execution_id="can")
    assert await closed(env, "can.t", "can") is Status.TERMINATED
    assert await finish(env, "can.a", "can") == "can.a done"  # the abandoned one outlives the run
    assert await finish(env, "can", "can") == "can done"  # the new run waited for its own signal
    events = await tree_log(env, "can", one_run=False)  # two runs: two starts of "can"
    runs = list(dict.fromkeys(e.workflow_context.workflow_run_id for e in of(events, "can")))
    assert len(runs) == 2
    first = [e for e in of(events, "can") if e.workflow_context.workflow_run_id == runs[0]]
    assert types_of(first)[-3:] == ["PARENT_CLOSE_POLICY_APPLIED", "PARENT_CLOSE_POLICY_APPLIED",
                                    "WORKFLOW_EXECUTION_CONTINUED_AS_NEW"]
    assert [(e.payload.child_workflow_exec_id, e.payload.policy, e.payload.parent_close_status) for e in first[-3:-1]] \
        == [("can.t", P.TERMINATE, "CONTINUED_AS_NEW"), ("can.a", P.ABANDON, "CONTINUED_AS_NEW")]
    assert of(events, "can.t")[-1].payload.reason == "parent can closed (CONTINUED_AS_NEW)"
    second = [e for e in of(events, "can") if e.workflow_context.workflow_run_id == runs[1]]
    assert not any(e.event_type in CHILD_EVENTS_AFTER_START for e in second)  # the new run has no children
    assert second[-1].event_type is T.WORKFLOW_EXECUTION_COMPLETED
    assert {e.workflow_context.workflow_exec_id for e in events} == {"can", "can.t", "can.a"}


async def test_termination_ends_an_execution_at_once_with_its_reason(env: Environment) -> None:
    handle = await env.client.start_workflow(TreeNode, Node(then="sleep", sleep=60), execution_id="term")
    await eventually(handle.history, lambda h: "TIMER_STARTED" in types_of(h))
    await handle.terminate("no longer needed")
    history = await handle.history()  # the reply came once the event was in the log
    assert types_of(history)[-2:] == ["TIMER_STARTED", "WORKFLOW_EXECUTION_TERMINATED"]
    assert (history[-1].payload.reason, history[-1].payload.identity) == ("no longer needed", env.client.identity)
    with pytest.raises(workflows.WorkflowFailureError) as caught:
        await handle.result(timeout=20)
    assert caught.value.status == "TERMINATED" and caught.value.cause.message == "no longer needed"
    await asyncio.sleep(0.3)
    assert types_of(await handle.history()) == types_of(history)  # nothing after it; no code ran
    assert CALLS == []  # no cleanup: termination is not a cancel
    with pytest.raises(workflows.CommandRejectedError, match="already closed"):
        await handle.terminate("twice")


async def test_terminating_a_child_its_parent_waits_on_raises_child_terminated_in_the_parent(
        env: Environment) -> None:
    handle = await env.client.start_workflow(AwaitsOne, edge("wt.k"), execution_id="wt")
    child = env.client.get_handle("wt.k")
    await eventually(child.history, lambda h: "WORKFLOW_TASK_COMPLETED" in types_of(h))
    await child.terminate("operator says stop")
    assert await handle.result(timeout=20) == "TERMINATED: ApplicationError: Terminated: operator says stop"
    events = await tree_log(env, "wt")
    [notice] = [e.payload for e in of(events, "wt") if e.event_type is T.CHILD_WORKFLOW_EXECUTION_TERMINATED]
    assert (notice.child_workflow_exec_id, notice.reason) == ("wt.k", "operator says stop")
    assert position(events, "wt.k", T.WORKFLOW_EXECUTION_TERMINATED) < position(
        events, "wt", T.CHILD_WORKFLOW_EXECUTION_TERMINATED)


async def test_three_levels_terminate_under_abandon_under_request_cancel_and_describe_tree(
        env: Environment) -> None:
    """mix -REQUEST_CANCEL-> mix.a -ABANDON-> mix.a.b -TERMINATE-> mix.a.b.c, all waiting."""
    await env.client.start_workflow(TreeNode, Node(then="wait", kids=[
        edge("mix.a", policy=P.REQUEST_CANCEL, kids=[
            edge("mix.a.b", policy=P.ABANDON, kids=[edge("mix.a.b.c", policy=P.TERMINATE)])])]), execution_id="mix")
    await eventually(lambda: env.client.describe_tree("mix"), lambda tree: len(tree) == 4)

    async def tree_lines() -> list[str]:
        done = await cli("describe", "--tree", "mix")
        assert done.exit_code == 0, done.output
        return done.output.splitlines()

    def expect(*statuses: str) -> list[str]:
        ids = ["mix", "mix.a", "mix.a.b", "mix.a.b.c"]
        return [f"{'  ' * depth}{ids[depth]}  child_tree_node  {status}" for depth, status in enumerate(statuses)]

    assert await tree_lines() == expect("RUNNING", "RUNNING", "RUNNING", "RUNNING")
    assert await finish(env, "mix", "mix") == "mix done"
    # REQUEST_CANCEL: mix.a cleans up and ends CANCELED; ABANDON: mix.a.b runs on, and mix.a.b.c under it
    assert await closed(env, "mix.a", "mix") is Status.CANCELED
    assert "cleanup mix.a" in CALLS
    await asyncio.sleep(0.3)
    assert await tree_lines() == expect("COMPLETED", "CANCELED", "RUNNING", "RUNNING")
    assert await finish(env, "mix.a.b", "mix") == "mix.a.b done"
    assert await closed(env, "mix.a.b.c", "mix") is Status.TERMINATED  # TERMINATE: ends with its parent
    assert await tree_lines() == expect("COMPLETED", "CANCELED", "COMPLETED", "TERMINATED")
    events = await tree_log(env, "mix")
    applied = [(e.workflow_context.workflow_exec_id, e.payload.child_workflow_exec_id, e.payload.policy)
               for e in events if e.event_type is T.PARENT_CLOSE_POLICY_APPLIED]
    assert applied == [("mix", "mix.a", P.REQUEST_CANCEL), ("mix.a", "mix.a.b", P.ABANDON),
                       ("mix.a.b", "mix.a.b.c", P.TERMINATE)]
    assert of(events, "mix.a.b.c")[-1].payload.reason == "parent mix.a.b closed (COMPLETED)"
    assert "cleanup mix.a.b.c" not in CALLS and "cleanup mix.a.b" not in CALLS


# ---------------------------------------------------------------- task queues, retries


async def test_a_child_on_a_queue_with_no_worker_stays_pending_visibly_until_one_starts(env: Environment) -> None:
    handle = await env.client.start_workflow(TreeNode, Node(then="await", kids=[
        edge("rq.k", then="complete", task_queue=REMOTE_QUEUE)]), execution_id="rq")
    await children_started(env, "rq", "rq", 1)
    await asyncio.sleep(1.0)
    child = await env.client.describe("rq.k", root_execution_id="rq")
    assert (child.status, child.task_queue, child.history_length) == (Status.RUNNING, REMOTE_QUEUE, 1)
    assert (await env.client.describe("rq", root_execution_id="rq")).open_children == ["rq.k"]
    done = await cli("describe", "rq.k")
    assert done.exit_code == 0, done.output
    assert "status               RUNNING" in done.output and f"task_queue           {REMOTE_QUEUE}" in done.output
    assert types_of(await env.client.history("rq.k", root_execution_id="rq")) == ["WORKFLOW_EXECUTION_STARTED"]

    worker = Worker(env.settings, {TreeNode.__treeflow_workflow__.name: TreeNode.__treeflow_workflow__},  # type: ignore[arg-type]
                    {note.name: note}, [REMOTE_QUEUE])
    await worker.start()
    try:
        assert await handle.result(timeout=30) == "rq.k done"
    finally:
        await worker.stop(grace=1)
    assert worker.stats.workflow_tasks >= 2 and worker.stats.activity_tasks == 1
    events = await tree_log(env, "rq")
    assert {e.workflow_context.task_queue for e in of(events, "rq.k")} == {REMOTE_QUEUE}
    [scheduled] = [e.payload for e in of(events, "rq.k") if e.event_type is T.ACTIVITY_TASK_SCHEDULED]
    assert scheduled.task_queue == REMOTE_QUEUE


async def test_a_failed_child_is_retried_per_its_retry_policy_as_the_same_execution(env: Environment) -> None:
    handle = await env.client.start_workflow(RetriesChild, Attempts(key="retry", failures=1), execution_id="retry")
    try:
        result = await handle.result(timeout=20)
    finally:
        events = await tree_log(env, "retry", closed=False)
    child_runs = list(dict.fromkeys(e.workflow_context.workflow_run_id for e in of(events, "retry.child")))
    assert len(child_runs) == 2  # a second attempt of the same execution id
    assert result == "retry ok after 2"


# ---------------------------------------------------------------- edge cases: starts in flight, same instant, sweeps


async def processed_up_to_now(env: Environment, root: str) -> None:
    """Return once the processor has handled every command sent so far to `root`'s
    partition: a signal to the (closed) root is answered in partition order."""
    with pytest.raises(workflows.CommandRejectedError):
        await env.client.get_handle(root, root_execution_id=root).signal("finish")


@pytest.mark.parametrize("policy", [p for p in P if p is not P.UNSPECIFIED])
async def test_a_start_decided_with_the_parents_close_creates_the_child_then_applies_the_policy(
        env: Environment, policy: P) -> None:
    root = f"same-task-{policy.value.lower()}"
    kid = f"{root}.k"
    handle = await env.client.start_workflow(TreeNode, Node(then="same_task", kids=[edge(kid, policy=policy)]),
                                             execution_id=root)
    assert await handle.result(timeout=20) == f"{root} done"
    events = await tree_log(env, root, closed=policy is not P.ABANDON)
    flow = [(e.workflow_context.workflow_exec_id, e.event_type.value) for e in events
            if e.event_type is not T.WORKFLOW_TASK_COMPLETED]
    assert flow[:6] == [(root, "WORKFLOW_EXECUTION_STARTED"), (root, "START_CHILD_WORKFLOW_EXECUTION_INITIATED"),
                        (kid, "WORKFLOW_EXECUTION_STARTED"), (root, "CHILD_WORKFLOW_EXECUTION_STARTED"),
                        (root, "PARENT_CLOSE_POLICY_APPLIED"), (root, "WORKFLOW_EXECUTION_COMPLETED")]
    if policy is P.TERMINATE:  # terminated in the same command that created it: its code never ran
        assert types_of(of(events, kid)) == ["WORKFLOW_EXECUTION_STARTED", "WORKFLOW_EXECUTION_TERMINATED"]
        assert of(events, kid)[-1].payload.reason == f"parent {root} closed (COMPLETED)"
    elif policy is P.REQUEST_CANCEL:  # the request reaches its first await; it cleans up
        assert await closed(env, kid, root) is Status.CANCELED
        assert types_of(of(events, kid))[1] == "WORKFLOW_EXECUTION_CANCEL_REQUESTED"
        assert CALLS == [f"cleanup {kid}"]
    else:
        assert await finish(env, kid, root) == f"{kid} done"
    await tree_log(env, root)


@pytest.mark.parametrize("close", ["terminated", "timed_out"])
async def test_a_start_still_in_flight_when_the_parent_closes_never_creates_the_child(
        env: Environment, held: HoldingWorker, close: str) -> None:
    """The parent's workflow task has decided to start a TERMINATE child; its report is
    held by the worker while the parent is terminated (or times out). When it arrives it
    is stale: the child is never created, so nothing is left running."""
    root = f"in-flight-{close}"
    holding, release, sent = held.arm(root)
    timeout = {"execution_timeout": timedelta(seconds=1)} if close == "timed_out" else {}
    handle = await env.client.start_workflow(
        TreeNode, Node(then="wait", kids=[edge(f"{root}.k", policy=P.TERMINATE, task_queue="default")]),
        execution_id=root, task_queue=HELD_QUEUE, **timeout)
    await asyncio.wait_for(holding.wait(), 20)
    if close == "terminated":
        await handle.terminate("closed while the start was in flight")
    with pytest.raises(workflows.WorkflowFailureError) as caught:
        await handle.result(timeout=20)
    assert caught.value.status == close.upper()
    release.set()
    await asyncio.wait_for(sent.wait(), 20)
    await processed_up_to_now(env, root)
    events = await tree_log(env, root)
    assert {e.workflow_context.workflow_exec_id for e in events} == {root}
    assert types_of(events) == ["WORKFLOW_EXECUTION_STARTED", f"WORKFLOW_EXECUTION_{close.upper()}"]
    with pytest.raises(workflows.CommandRejectedError, match="not found"):
        await env.client.describe(f"{root}.k", root_execution_id=root)


async def test_a_child_completing_in_the_instant_the_parent_times_out(env: Environment) -> None:
    """Parents with a 1 s execution timeout await a TERMINATE child that completes around
    that deadline (its timer straddles it). Whichever the processor sees first, the tree
    is consistent: the child completed and its parent heard of it before closing (no
    policy for it), or the parent timed out first and terminated it (policy applied, no
    notice after); each closed once; a parent that completed returned its child's result."""
    naps = [0.9, 0.96, 0.98, 0.99, 1.0, 1.01, 1.02, 1.05]
    handles = [await env.client.start_workflow(
        TreeNode, Node(then="await", kids=[edge(f"si-{i}.k", then="nap", sleep=nap, policy=P.TERMINATE)]),
        execution_id=f"si-{i}", execution_timeout=timedelta(seconds=1))
        for i, nap in enumerate(naps)]
    outcomes = []
    for i, handle in enumerate(handles):
        root, kid = f"si-{i}", f"si-{i}.k"
        try:
            assert await handle.result(timeout=20) == f"{kid} done"
            parent_status = "COMPLETED"
        except workflows.WorkflowFailureError as error:
            parent_status = error.status
        assert parent_status in ("COMPLETED", "TIMED_OUT")
        events = await tree_log(env, root)
        parent, child = of(events, root), of(events, kid)
        child_status = child[-1].event_type.value.removeprefix("WORKFLOW_EXECUTION_")
        notices = [e.event_type for e in parent if e.event_type in CHILD_EVENTS_AFTER_START]
        applied = [e.payload for e in parent if e.event_type is T.PARENT_CLOSE_POLICY_APPLIED]
        if child_status == "COMPLETED":
            assert notices == [T.CHILD_WORKFLOW_EXECUTION_COMPLETED] and applied == []
            assert position(events, kid, T.WORKFLOW_EXECUTION_COMPLETED) < position(
                events, root, T.CHILD_WORKFLOW_EXECUTION_COMPLETED)
        else:
            assert (child_status, parent_status) == ("TERMINATED", "TIMED_OUT")
            assert notices == [] and [(a.child_workflow_exec_id, a.parent_close_status) for a in applied] == [
                (kid, "TIMED_OUT")]
            assert child[-1].payload.reason == f"parent {root} closed (TIMED_OUT)"
            assert parent[-2].event_type is T.PARENT_CLOSE_POLICY_APPLIED
        outcomes.append((naps[i], child_status, parent_status))
    print(f"\nchild nap, child status, parent status: {outcomes}")


async def test_a_terminate_sweep_while_a_child_starts_a_grandchild_leaves_nothing_running(
        env: Environment, held: HoldingWorker) -> None:
    """sw-t.k (on the holding worker's queue) has decided to start sw-t.k.g when its root is
    terminated: the sweep terminates sw-t.k, and the start, arriving after, is stale."""
    holding, release, sent = held.arm("sw-t.k")
    handle = await env.client.start_workflow(TreeNode, Node(then="wait", kids=[
        edge("sw-t.k", policy=P.TERMINATE, task_queue=HELD_QUEUE,
             kids=[edge("sw-t.k.g", policy=P.TERMINATE, task_queue="default")])]), execution_id="sw-t")
    await asyncio.wait_for(holding.wait(), 20)
    await handle.terminate("sweep")
    assert await closed(env, "sw-t.k", "sw-t") is Status.TERMINATED
    release.set()
    await asyncio.wait_for(sent.wait(), 20)
    await processed_up_to_now(env, "sw-t")
    events = await tree_log(env, "sw-t")
    assert {e.workflow_context.workflow_exec_id for e in events} == {"sw-t", "sw-t.k"}
    assert "START_CHILD_WORKFLOW_EXECUTION_INITIATED" not in types_of(of(events, "sw-t.k"))
    assert of(events, "sw-t.k")[-1].payload.reason == "parent sw-t closed (TERMINATED)"


async def test_a_cancel_sweep_while_a_child_starts_a_grandchild_reaches_the_new_grandchild(
        env: Environment, held: HoldingWorker) -> None:
    """sw-c.k (REQUEST_CANCEL) has decided to start sw-c.k.g when its root is canceled: the
    root cleans up and closes, sw-c.k gets its cancel request, then the start lands (sw-c.k
    is still running) and creates sw-c.k.g after the request. sw-c.k was awaiting that
    start, so the cancel goes on to sw-c.k.g: all three end CANCELED after cleaning up."""
    holding, release, sent = held.arm("sw-c.k")
    handle = await env.client.start_workflow(TreeNode, Node(then="wait", kids=[
        edge("sw-c.k", policy=P.REQUEST_CANCEL, task_queue=HELD_QUEUE,
             kids=[edge("sw-c.k.g", policy=P.ABANDON, task_queue="default")])]), execution_id="sw-c")
    await asyncio.wait_for(holding.wait(), 20)
    await handle.cancel("sweep")
    with pytest.raises(workflows.WorkflowFailureError) as caught:
        await handle.result(timeout=20)
    assert caught.value.status == "CANCELED"
    await eventually(lambda: env.client.history("sw-c.k", root_execution_id="sw-c"),
                     lambda h: "WORKFLOW_EXECUTION_CANCEL_REQUESTED" in types_of(h))
    release.set()
    assert await closed(env, "sw-c.k", "sw-c") is Status.CANCELED
    assert await closed(env, "sw-c.k.g", "sw-c") is Status.CANCELED
    events = await tree_log(env, "sw-c")
    assert position(events, "sw-c.k", T.WORKFLOW_EXECUTION_CANCEL_REQUESTED) < position(
        events, "sw-c.k.g", T.WORKFLOW_EXECUTION_STARTED)
    [request] = [e.payload for e in of(events, "sw-c.k.g") if e.event_type is T.WORKFLOW_EXECUTION_CANCEL_REQUESTED]
    assert request.reason == "parent sw-c.k asked"
    assert sorted(CALLS) == ["cleanup sw-c", "cleanup sw-c.k", "cleanup sw-c.k.g"]
