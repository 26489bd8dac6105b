"""Child workflows and parent close policies in memory (tests/inmemory.py), where the order of
commands and the clock are the test's to choose: the edge cases of issue 4 §2 whose
timing a real broker leaves to chance are pinned here in each order. The same scenarios
run on the broker in tests/integration/test_children.py."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from treeflow import ParentClosePolicy
from treeflow.core import Status
from treeflow.payloads import to_json
from treeflow.processor.engine import PartitionEngine
from treeflow.schemas import Command, Event, EventType
from treeflow.schemas import models as m
from tests.child_tree import ACTIVITIES, CALLS, WORKFLOWS, Attempts, Node, RetriesChild, edge
from tests.inmemory import EPOCH, InMemory

T = EventType
P = ParentClosePolicy
CLOSING = {T.WORKFLOW_EXECUTION_COMPLETED, T.WORKFLOW_EXECUTION_FAILED, T.WORKFLOW_EXECUTION_CANCELED,
           T.WORKFLOW_EXECUTION_TERMINATED, T.WORKFLOW_EXECUTION_TIMED_OUT}


@pytest.fixture(autouse=True)
def reset_calls() -> None:
    CALLS.clear()


def memory() -> InMemory:
    return InMemory(WORKFLOWS, ACTIVITIES)


def start_command(mem: InMemory, exec_id: str, node: Node, timeout_ms: int | None = None) -> Command:
    return mem.command(exec_id, m.StartWorkflowExecution(workflow_name="child_tree_node", task_queue="default",
                                                         input_json=to_json(node), execution_timeout_ms=timeout_ms))


async def start(mem: InMemory, exec_id: str, node: Node, timeout_ms: int | None = None) -> None:
    mem.queue.append(start_command(mem, exec_id, node, timeout_ms))
    await mem.drain()


async def step(mem: InMemory) -> list[Event]:
    """Process the next queued command only (its tasks run, their reports are queued)."""
    command = mem.queue.popleft()
    effects = mem.engine.handle(command, mem.now)
    mem._record(effects)
    await mem._run(effects.dispatches)
    return effects.events


def take_report(mem: InMemory, exec_id: str, decision: type) -> Command:
    """Remove from the queue the workflow-task report of `exec_id` carrying a `decision`:
    it stays in flight until the test sends it."""
    for command in list(mem.queue):
        payload = command.payload
        if (command.workflow_exec_id == exec_id and isinstance(payload, m.CompleteWorkflowTask)
                and any(isinstance(d, decision) for d in payload.decisions)):
            mem.queue.remove(command)
            return command
    raise AssertionError(f"no report of {exec_id} with {decision.__name__} in {list(mem.queue)}")


async def send(mem: InMemory, exec_id: str, payload: Any, root: str) -> None:
    mem.queue.append(mem.command(exec_id, payload, root=root))
    await mem.drain()


def flow(mem: InMemory, *exec_ids: str) -> list[str]:
    """'<id>:<TYPE>' of the events of `exec_ids` in log order, workflow-task bookkeeping left out."""
    return [f"{e.workflow_context.workflow_exec_id}:{e.event_type.value}" for e in mem.events
            if e.workflow_context.workflow_exec_id in exec_ids and e.event_type is not T.WORKFLOW_TASK_COMPLETED]


def payload_of(mem: InMemory, exec_id: str, event_type: EventType) -> list[Any]:
    return [e.payload for e in mem.history(exec_id) if e.event_type is event_type]


def closed_once(mem: InMemory) -> None:
    """Every execution: sequences 1..n, at most one closing event and nothing after it."""
    by_exec: dict[str, list[Event]] = {}
    for event in mem.events:
        by_exec.setdefault(event.workflow_context.workflow_exec_id, []).append(event)
    for exec_id, history in by_exec.items():
        assert [e.sequence for e in history] == list(range(1, len(history) + 1)), exec_id
        closes = [i for i, e in enumerate(history) if e.event_type in CLOSING]
        assert len(closes) <= 1 and (not closes or closes[0] == len(history) - 1), (exec_id, flow(mem, exec_id))


# ---------------------------------------------------------------- semantics


async def test_fire_and_forget_returns_once_started_and_the_abandoned_child_runs_on() -> None:
    mem = memory()
    await start(mem, "p", Node(then="complete", kids=[edge("p.k")]))
    assert flow(mem, "p", "p.k") == [
        "p:WORKFLOW_EXECUTION_STARTED", "p:START_CHILD_WORKFLOW_EXECUTION_INITIATED", "p.k:WORKFLOW_EXECUTION_STARTED",
        "p:CHILD_WORKFLOW_EXECUTION_STARTED",
        # the parent went on (its note activity) while the child waits for its signal
        "p:ACTIVITY_TASK_SCHEDULED", "p:ACTIVITY_TASK_STARTED", "p:ACTIVITY_TASK_COMPLETED",
        "p:PARENT_CLOSE_POLICY_APPLIED", "p:WORKFLOW_EXECUTION_COMPLETED"]
    [initiated] = payload_of(mem, "p", T.START_CHILD_WORKFLOW_EXECUTION_INITIATED)
    assert initiated.parent_close_policy is P.ABANDON  # the default with wait=False
    assert mem.state("p.k").open
    await send(mem, "p.k", m.SignalWorkflowExecution(signal_name="finish"), root="p")
    assert mem.state("p.k").status is Status.COMPLETED and mem.state("p.k").result_json == '"p.k done"'
    assert {e.workflow_context.root_workflow_exec_id for e in mem.history("p.k")} == {"p"}
    assert "p:CHILD_WORKFLOW_EXECUTION_COMPLETED" not in flow(mem, "p")  # the parent closed first
    closed_once(mem)


async def test_a_handle_cancels_its_child_and_awaiting_it_raises_child_canceled() -> None:
    mem = memory()
    await start(mem, "q", Node(then="cancel_kids", kids=[edge("q.k")]))
    assert json.loads(mem.state("q").result_json) == "CANCELED: None"
    order = flow(mem, "q", "q.k")
    assert (order.index("q:CHILD_WORKFLOW_EXECUTION_CANCEL_REQUESTED") < order.index(
        "q.k:WORKFLOW_EXECUTION_CANCEL_REQUESTED") < order.index("q.k:WORKFLOW_EXECUTION_CANCELED")
            < order.index("q:CHILD_WORKFLOW_EXECUTION_CANCELED"))
    assert CALLS == ["cleanup q.k"]
    closed_once(mem)


async def test_continue_as_new_applies_the_close_policy_to_the_runs_open_children() -> None:
    mem = memory()
    await start(mem, "p", Node(then="continue", kids=[edge("p.t", policy=P.TERMINATE), edge("p.a", policy=P.ABANDON)]))
    first_run = mem.history("p")[0].workflow_context.workflow_run_id
    closing = [e for e in mem.history("p") if e.workflow_context.workflow_run_id == first_run][-3:]
    assert [(e.event_type.value, getattr(e.payload, "child_workflow_exec_id", None),
             getattr(e.payload, "parent_close_status", None)) for e in closing] == [
        ("PARENT_CLOSE_POLICY_APPLIED", "p.t", "CONTINUED_AS_NEW"),
        ("PARENT_CLOSE_POLICY_APPLIED", "p.a", "CONTINUED_AS_NEW"), ("WORKFLOW_EXECUTION_CONTINUED_AS_NEW", None, None)]
    assert payload_of(mem, "p.t", T.WORKFLOW_EXECUTION_TERMINATED)[0].reason == "parent p closed (CONTINUED_AS_NEW)"
    assert mem.state("p").open and mem.state("p").context.workflow_run_id != first_run
    assert mem.state("p").children == {}
    await send(mem, "p.a", m.SignalWorkflowExecution(signal_name="finish"), root="p")
    assert mem.state("p.a").status is Status.COMPLETED
    assert "CHILD_WORKFLOW_EXECUTION_COMPLETED" not in mem.types("p")  # the new run never had it


# ---------------------------------------------------------------- the parent closes while a start is in flight


@pytest.mark.parametrize("policy", [p for p in P if p is not P.UNSPECIFIED])
async def test_a_start_decided_with_the_parents_close_creates_the_child_then_applies_the_policy(policy: P) -> None:
    mem = memory()
    await start(mem, "p", Node(then="same_task", kids=[edge("p.k", policy=policy)]))
    events = flow(mem, "p", "p.k")
    assert events[:6] == [
        "p:WORKFLOW_EXECUTION_STARTED", "p:START_CHILD_WORKFLOW_EXECUTION_INITIATED", "p.k:WORKFLOW_EXECUTION_STARTED",
        "p:CHILD_WORKFLOW_EXECUTION_STARTED", "p:PARENT_CLOSE_POLICY_APPLIED", "p:WORKFLOW_EXECUTION_COMPLETED"]
    [applied] = payload_of(mem, "p", T.PARENT_CLOSE_POLICY_APPLIED)
    assert (applied.child_workflow_exec_id, applied.policy, applied.parent_close_status) == ("p.k", policy, "COMPLETED")
    child = mem.state("p.k")
    if policy is P.TERMINATE:
        assert events[6:] == ["p.k:WORKFLOW_EXECUTION_TERMINATED"]
        assert child.status is Status.TERMINATED
        assert payload_of(mem, "p.k", T.WORKFLOW_EXECUTION_TERMINATED)[0].reason == "parent p closed (COMPLETED)"
        assert T.WORKFLOW_TASK_COMPLETED not in [e.event_type for e in mem.history("p.k")]  # its code never ran
    elif policy is P.REQUEST_CANCEL:
        # the request came before its code ever ran: it gets it at its first await, cleans up
        assert events[6] == "p.k:WORKFLOW_EXECUTION_CANCEL_REQUESTED"
        assert child.status is Status.CANCELED and CALLS == ["cleanup p.k"]
    else:
        assert child.open and not child.cancel_requested
        await send(mem, "p.k", m.SignalWorkflowExecution(signal_name="finish"), root="p")
        assert mem.state("p.k").status is Status.COMPLETED
    closed_once(mem)


@pytest.mark.parametrize("close", ["terminate", "timeout"])
async def test_a_start_still_in_flight_when_the_parent_closes_never_creates_the_child(close: str) -> None:
    mem = memory()
    mem.queue.append(start_command(mem, "p", Node(then="wait", kids=[edge("p.k", policy=P.TERMINATE)]),
                                   timeout_ms=5000))
    await step(mem)  # started; its first workflow task ran and decided to start the child
    report = take_report(mem, "p", m.StartChildWorkflowExecution)
    if close == "terminate":
        await send(mem, "p", m.TerminateWorkflowExecution(reason="stop"), root="p")
    else:
        await mem.advance(5)
    mem.queue.append(report)  # the report arrives after the close: stale
    await mem.drain()
    assert mem.types("p") == ["WORKFLOW_EXECUTION_STARTED",
                              "WORKFLOW_EXECUTION_TERMINATED" if close == "terminate" else "WORKFLOW_EXECUTION_TIMED_OUT"]
    assert "p.k" not in mem.engine.states and mem.history("p.k") == []


# ---------------------------------------------------------------- same instant


@pytest.mark.parametrize("first", ["child", "tick"])
async def test_a_child_completing_in_the_instant_the_parent_times_out(first: str) -> None:
    """The child's last activity reports at the parent's deadline. Child first: the child
    completes, the parent hears of it, then times out with no open child (its own late
    report is stale). Tick first: the parent times out, its policy terminates the child,
    whose report is then stale."""
    mem = memory()
    mem.hold_activities = True
    await start(mem, "p", Node(then="await", kids=[edge("p.k", then="complete", policy=P.TERMINATE)]),
                timeout_ms=10_000)
    [held] = mem.held  # the child's note activity
    mem.held = []
    mem.now = EPOCH + timedelta(seconds=10)  # the parent's deadline, to the microsecond
    mem.queue.append(await mem.runner.run_activity_task(held.context, held.task.payload, mem.send))
    if first == "child":
        while mem.state("p.k").open:
            await step(mem)
        assert mem.state("p.k").status is Status.COMPLETED
        assert mem.history("p.k")[-1].timestamp == mem.now
    await mem.advance(0)  # the clock's tick at the deadline, then whatever is still queued
    assert mem.state("p").status is Status.TIMED_OUT
    parent = flow(mem, "p")
    if first == "child":
        assert parent[-2:] == ["p:CHILD_WORKFLOW_EXECUTION_COMPLETED", "p:WORKFLOW_EXECUTION_TIMED_OUT"]
        assert "p:PARENT_CLOSE_POLICY_APPLIED" not in parent
        assert mem.state("p.k").result_json == '"p.k done"'
    else:
        assert parent[-2:] == ["p:PARENT_CLOSE_POLICY_APPLIED", "p:WORKFLOW_EXECUTION_TIMED_OUT"]
        assert mem.state("p.k").status is Status.TERMINATED
        assert payload_of(mem, "p.k", T.WORKFLOW_EXECUTION_TERMINATED)[0].reason == "parent p closed (TIMED_OUT)"
        assert "ACTIVITY_TASK_COMPLETED" not in mem.types("p.k")  # the late result is not an event
        assert not any(t.startswith("p:CHILD_WORKFLOW_EXECUTION_") and t != "p:CHILD_WORKFLOW_EXECUTION_STARTED"
                       for t in parent)
    assert {e.timestamp for e in mem.events[-3:]} == {mem.now}
    closed_once(mem)


# ---------------------------------------------------------------- sweeps racing a new grandchild


def three(grandchild_policy: P = P.TERMINATE) -> Node:
    """p -> p.k (TERMINATE) -> p.k.g (grandchild_policy), each waiting for its signal."""
    return Node(then="wait", kids=[edge("p.k", policy=P.TERMINATE,
                                        kids=[edge("p.k.g", policy=grandchild_policy)])])


async def test_a_terminate_sweep_while_a_child_starts_a_grandchild_leaves_nothing_running() -> None:
    mem = memory()
    mem.queue.append(start_command(mem, "p", three()))
    while "p.k" not in mem.engine.states or not any(
            c.workflow_exec_id == "p.k" and isinstance(c.payload, m.CompleteWorkflowTask)
            and c.payload.decisions for c in mem.queue):
        await step(mem)
    report = take_report(mem, "p.k", m.StartChildWorkflowExecution)  # p.k is starting its grandchild
    await send(mem, "p", m.TerminateWorkflowExecution(reason="sweep"), root="p")
    assert mem.state("p.k").status is Status.TERMINATED
    mem.queue.append(report)
    await mem.drain()
    assert "p.k.g" not in mem.engine.states  # never created: its start was stale
    assert "START_CHILD_WORKFLOW_EXECUTION_INITIATED" not in mem.types("p.k")
    assert payload_of(mem, "p.k", T.WORKFLOW_EXECUTION_TERMINATED)[0].reason == "parent p closed (TERMINATED)"
    closed_once(mem)


async def test_a_terminate_sweep_right_after_the_grandchild_started_terminates_it_too() -> None:
    mem = memory()
    await start(mem, "p", three())
    assert mem.state("p.k.g").open
    await send(mem, "p", m.TerminateWorkflowExecution(reason="sweep"), root="p")
    assert [mem.state(i).status for i in ("p", "p.k", "p.k.g")] == [Status.TERMINATED] * 3
    assert payload_of(mem, "p.k.g", T.WORKFLOW_EXECUTION_TERMINATED)[0].reason == "parent p.k closed (TERMINATED)"
    closed_once(mem)


@pytest.mark.parametrize("grandchild_policy", [P.TERMINATE, P.ABANDON])
async def test_a_cancel_sweep_while_a_child_starts_a_grandchild_reaches_the_new_grandchild(
        grandchild_policy: P) -> None:
    """p.k gets its cancel request while its start of p.k.g is in flight: the start lands
    (p.k is still running), and the cancel reaches p.k.g through p.k, which was awaiting its
    start: p.k.g is asked to cancel and p.k ends once it has."""
    mem = memory()
    mem.queue.append(start_command(mem, "p", Node(then="wait", kids=[
        edge("p.k", policy=P.REQUEST_CANCEL, kids=[edge("p.k.g", policy=grandchild_policy)])])))
    while not any(c.workflow_exec_id == "p.k" and isinstance(c.payload, m.CompleteWorkflowTask)
                  and c.payload.decisions for c in mem.queue):
        await step(mem)
    report = take_report(mem, "p.k", m.StartChildWorkflowExecution)
    await send(mem, "p", m.RequestCancelWorkflowExecution(reason="sweep"), root="p")
    assert mem.state("p").status is Status.CANCELED
    assert mem.state("p.k").cancel_requested and mem.state("p.k").open
    mem.queue.append(report)
    await mem.drain()
    order = flow(mem, "p.k", "p.k.g")
    assert order.index("p.k:WORKFLOW_EXECUTION_CANCEL_REQUESTED") < order.index("p.k.g:WORKFLOW_EXECUTION_STARTED")
    assert [mem.state(i).status for i in ("p", "p.k", "p.k.g")] == [Status.CANCELED] * 3
    [request] = payload_of(mem, "p.k.g", T.WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    assert request.reason == "parent p.k asked"
    assert sorted(CALLS) == ["cleanup p", "cleanup p.k", "cleanup p.k.g"]
    closed_once(mem)


# ---------------------------------------------------------------- termination, three levels


async def test_terminating_a_child_the_parent_waits_on_raises_child_terminated_in_the_parent() -> None:
    mem = memory()
    await start(mem, "p", Node(then="await", kids=[edge("p.k")]))
    await send(mem, "p.k", m.TerminateWorkflowExecution(reason="operator said so"), root="p")
    assert mem.state("p").status is Status.COMPLETED
    assert json.loads(mem.state("p").result_json) == "TERMINATED: Terminated: operator said so"
    [notice] = payload_of(mem, "p", T.CHILD_WORKFLOW_EXECUTION_TERMINATED)
    assert notice.reason == "operator said so"
    closed_once(mem)


async def test_three_levels_terminate_under_abandon_under_request_cancel() -> None:
    """p -REQUEST_CANCEL-> a -ABANDON-> b -TERMINATE-> c. p completes: a is asked to cancel
    and ends CANCELED; b is abandoned and runs on, c with it; b finishes: c is terminated."""
    mem = memory()
    await start(mem, "p", Node(then="complete", kids=[
        edge("a", policy=P.REQUEST_CANCEL, kids=[edge("b", policy=P.ABANDON, kids=[edge("c", policy=P.TERMINATE)])])]))
    assert [mem.state(i).status for i in ("p", "a", "b", "c")] == [
        Status.COMPLETED, Status.CANCELED, Status.RUNNING, Status.RUNNING]
    assert [(a.child_workflow_exec_id, a.policy) for a in payload_of(mem, "p", T.PARENT_CLOSE_POLICY_APPLIED)] == [
        ("a", P.REQUEST_CANCEL)]
    assert [(a.child_workflow_exec_id, a.policy) for a in payload_of(mem, "a", T.PARENT_CLOSE_POLICY_APPLIED)] == [
        ("b", P.ABANDON)]
    await send(mem, "b", m.SignalWorkflowExecution(signal_name="finish"), root="p")
    assert mem.state("b").status is Status.COMPLETED and mem.state("c").status is Status.TERMINATED
    assert payload_of(mem, "c", T.WORKFLOW_EXECUTION_TERMINATED)[0].reason == "parent b closed (COMPLETED)"
    assert {e.workflow_context.root_workflow_exec_id for e in mem.events} == {"p"}
    closed_once(mem)


# ---------------------------------------------------------------- child retry policies


async def test_a_failed_child_is_retried_per_its_retry_policy_as_the_same_execution() -> None:
    mem = memory()
    await mem.start(RetriesChild, Attempts(key="r", failures=1), exec_id="r")
    await mem.advance(1)
    runs = {e.workflow_context.workflow_run_id for e in mem.history("r.child")}
    assert len(runs) == 2
    assert mem.state("r").result_json == '"r ok after 2"'
    child = mem.history("r.child")
    [retried] = [e for e in child if e.event_type is T.WORKFLOW_EXECUTION_CONTINUED_AS_NEW]
    assert (retried.payload.failure.type, retried.payload.failure.message) == ("NotYet", "r attempt 1: not yet")
    [first, second] = [e for e in child if e.event_type is T.WORKFLOW_EXECUTION_STARTED]
    assert (first.attempt, second.attempt) == (None, 2)
    assert second.payload.first_workflow_task_backoff_ms == 100 and second.payload.input_json == first.payload.input_json
    assert [e.sequence for e in child] == list(range(1, len(child) + 1))
    # The parent hears only of the last attempt.
    assert [t for t in mem.types("r") if t.startswith("CHILD_WORKFLOW_EXECUTION_")] == [
        "CHILD_WORKFLOW_EXECUTION_STARTED", "CHILD_WORKFLOW_EXECUTION_COMPLETED"]


async def test_a_child_out_of_attempts_fails_the_parent_with_the_last_failure() -> None:
    mem = memory()
    await mem.start(RetriesChild, Attempts(key="x", failures=5), exec_id="x")
    await mem.advance(1)
    await mem.advance(1)
    starts = [e for e in mem.history("x.child") if e.event_type is T.WORKFLOW_EXECUTION_STARTED]
    assert [e.attempt or 1 for e in starts] == [1, 2, 3]
    assert mem.state("x.child").status is Status.FAILED
    assert mem.state("x").status is Status.FAILED
    assert "x attempt 3: not yet" in mem.state("x").failure.cause.message


# ---------------------------------------------------------------- a queue nobody serves


def test_a_child_waiting_for_a_worker_of_its_queue_barely_grows_its_history() -> None:
    """A child on a task queue no worker serves stays pending (RUNNING, its workflow task
    in the queue's topic) until one starts. Its task times out and is given out again
    after 10 s, 20 s, 40 s... at most every 10 minutes: a handful of events and copies
    of the task in two minutes, about 150 a day, not one every 10 s forever."""
    engine = PartitionEngine(0)
    engine.handle(Command(command_id="start", timestamp=EPOCH, root_workflow_exec_id="w", workflow_exec_id="w",
                          payload=m.StartWorkflowExecution(workflow_name="child_tree_node", task_queue="nobody")),
                  EPOCH)
    dispatched = 0
    for second in range(1, 121):
        dispatched += len(engine.tick(EPOCH + timedelta(seconds=second), f"tick-{second}").dispatches)
    timeouts = [e.timestamp - EPOCH for e in engine.histories["w"] if e.event_type is T.WORKFLOW_TASK_TIMED_OUT]
    assert timeouts == [timedelta(seconds=s) for s in (10, 30, 70)]
    assert dispatched == 3
    for minute in range(3, 24 * 60 + 1):
        engine.tick(EPOCH + timedelta(minutes=minute), f"tick-m{minute}")
    assert 140 <= engine.states["w"].last_sequence <= 160
    assert engine.states["w"].status is Status.RUNNING
