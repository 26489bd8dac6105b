"""The crash and outage rules of DESIGN §5 (invariants 5 and 6) on the pure core, the
partition engine and the task runner, without a broker: deadlines count from the
decision, a recovered partition restarts attempt timeouts from the recovery and decides
nothing time-based before its backlog, claims are refused once an attempt is closed,
copies of a running attempt are dropped, and signals apply before timers in one
activation. The same rules run against a broker in tests/integration/test_durability.py."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from treeflow.processor.engine import PartitionEngine
from treeflow.schemas import Command, EventType
from treeflow.schemas import models as m
from treeflow.worker.runner import TaskRunner
from tests.control_workflows import Waiter
from tests.inmemory import EPOCH, InMemory

T = EventType
ROOT = "root"


def at(seconds: float) -> Any:
    return EPOCH + timedelta(seconds=seconds)


def command(payload: Any, seconds: float, command_id: str | None = None) -> Command:
    return Command(command_id=command_id or f"c{seconds}-{type(payload).__name__}", timestamp=at(seconds),
                   root_workflow_exec_id=ROOT, workflow_exec_id=ROOT, payload=payload)


def types(events: list[Any]) -> list[str]:
    return [e.event_type.value for e in events]


def started(engine: PartitionEngine, seconds: float = 0) -> str:
    """Start ROOT at `seconds`; its first workflow task's id."""
    engine.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q"), seconds), at(seconds))
    return engine.states[ROOT].workflow_task.task_id  # type: ignore[union-attr]


def schedule(engine: PartitionEngine, task_id: str, sent: float, decided: float, **options: Any) -> list[Any]:
    run = engine.states[ROOT].context.workflow_run_id
    options.setdefault("retry_policy", m.RetryPolicy(maximum_attempts=1))
    return engine.handle(command(m.CompleteWorkflowTask(
        task_id=task_id, workflow_run_id=run, history_length=engine.states[ROOT].last_sequence,
        decisions=[m.ScheduleActivityTask(activity_id="a", activity_name="act", task_queue="q", **options)]),
        sent), at(decided)).events


def test_deadlines_count_from_the_decision_not_the_commands_timestamp() -> None:
    """A CompleteWorkflowTask written at 0.1 s is decided at 12 s (it waited through an
    outage): the activity it schedules gets its whole 2 s attempt from 12 s."""
    engine = PartitionEngine(0)
    task_id = started(engine)
    events = schedule(engine, task_id, sent=0.1, decided=12, start_to_close_timeout_ms=2000)
    assert types(events) == ["WORKFLOW_TASK_COMPLETED", "ACTIVITY_TASK_SCHEDULED"]
    assert {e.timestamp for e in events} == {at(12)}
    assert engine.tick(at(12.001), "t1").events == []
    assert engine.tick(at(13.9), "t2").events == []
    assert types(engine.tick(at(14.001), "t3").events) == ["ACTIVITY_TASK_TIMED_OUT"]


def test_decision_times_never_go_back() -> None:
    """A decision at an earlier clock reading than the previous one (a clock stepped
    back) is recorded at the previous one: histories stay in time order."""
    engine = PartitionEngine(0)
    task_id = started(engine, seconds=5)
    events = schedule(engine, task_id, sent=5, decided=3)
    assert {e.timestamp for e in events} == {at(5)}


def recovered(log: list[Any], seconds: float) -> PartitionEngine:
    engine = PartitionEngine(0)
    engine.replay(log, at(seconds))
    return engine


def test_recovery_restarts_attempt_and_workflow_task_timeouts_but_not_timers() -> None:
    """Recovered at 30 s: a workflow task ready since 0 s and an activity attempt ready
    since 1 s (2 s start-to-close) do not time out on recovery but a full bound after it;
    a timer due at 5 s and the execution timeout stay wall-clock and fire at once."""
    live = PartitionEngine(0)
    log: list[Any] = []
    log += live.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q",
                                                        execution_timeout_ms=40_000), 0), at(0)).events
    task_id = live.states[ROOT].workflow_task.task_id  # type: ignore[union-attr]
    log += schedule(live, task_id, sent=1, decided=1, start_to_close_timeout_ms=2000)
    # A signal asks for another workflow task; a timer is due at 5 s.
    log += live.handle(command(m.SignalWorkflowExecution(signal_name="s"), 1.5), at(1.5)).events
    engine = recovered(log, 30)
    assert engine.tick(at(30.5), "t0").events == [], "nothing time-based before the backlog is decided"
    engine.resume(at(30))
    assert engine.tick(at(30.5), "t1").events == []
    assert types(engine.tick(at(32.01), "t2").events) == ["ACTIVITY_TASK_TIMED_OUT"]
    assert engine.tick(at(39.9), "t3").events == []  # the workflow task: 10 s from the recovery
    assert types(engine.tick(at(40.01), "t4").events) == ["WORKFLOW_EXECUTION_TIMED_OUT"]  # wall clock


def test_a_timer_due_during_the_outage_fires_once_after_it() -> None:
    live = PartitionEngine(0)
    log: list[Any] = []
    log += live.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q"), 0), at(0)).events
    run = live.states[ROOT].context.workflow_run_id
    task_id = live.states[ROOT].workflow_task.task_id  # type: ignore[union-attr]
    log += live.handle(command(m.CompleteWorkflowTask(task_id=task_id, workflow_run_id=run, history_length=1,
                                                      decisions=[m.StartTimer(timer_id="t", duration_ms=5000)]),
                               0.1), at(0.1)).events
    engine = recovered(log, 30)
    engine.resume(at(30))
    assert types(engine.tick(at(30.01), "t1").events) == ["TIMER_FIRED"]
    assert engine.tick(at(31), "t2").events == []


def claim(run: str, claim_id: str, attempt: int = 1, seconds: float = 2) -> Command:
    return command(m.ReportActivityTaskStarted(activity_id="a", workflow_run_id=run, attempt=attempt,
                                               claim_id=claim_id), seconds, f"claim-{claim_id}-{seconds}")


def test_claims_are_granted_while_the_attempt_is_open_and_refused_once_it_closed() -> None:
    engine = PartitionEngine(0)
    task_id = started(engine)
    schedule(engine, task_id, sent=1, decided=1)
    run = engine.states[ROOT].context.workflow_run_id
    first = engine.handle(claim(run, "w1"), at(2))
    assert types(first.events) == ["ACTIVITY_TASK_STARTED"] and [r.accepted for r in first.replies] == [True]
    # Taken over (the first worker was killed, say): granted, no second STARTED event.
    second = engine.handle(claim(run, "w2", seconds=3), at(3))
    assert second.events == [] and [r.accepted for r in second.replies] == [True]
    # The first claim's late completion is stale; the newest claim's counts.
    late = engine.handle(command(m.CompleteActivityTask(activity_id="a", workflow_run_id=run, attempt=1,
                                                        claim_id="w1", result_json="1"), 4), at(4))
    assert late.events == []
    done = engine.handle(command(m.CompleteActivityTask(activity_id="a", workflow_run_id=run, attempt=1,
                                                        claim_id="w2", result_json="2"), 5), at(5))
    assert types(done.events) == ["ACTIVITY_TASK_COMPLETED"]
    # A task read again after that: its claim is refused, whoever sends it, even re-delivered.
    for again in (claim(run, "w3", seconds=6), claim(run, "w2", seconds=3)):
        refused = engine.handle(again, at(6))
        assert refused.events == [] and [(r.accepted, r.error.type) for r in refused.replies] == [
            (False, "ActivityTaskClosed")]


def test_a_recovered_processor_accepts_the_report_of_a_claim_it_never_saw() -> None:
    """Claims are not events: after a recovery the claim holder is unknown, and the
    first report of the open attempt counts."""
    live = PartitionEngine(0)
    log: list[Any] = []
    log += live.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q"), 0), at(0)).events
    task_id = live.states[ROOT].workflow_task.task_id  # type: ignore[union-attr]
    log += schedule(live, task_id, sent=1, decided=1)
    run = live.states[ROOT].context.workflow_run_id
    log += live.handle(claim(run, "w1"), at(2)).events
    live.handle(claim(run, "w2", seconds=3), at(3))
    engine = recovered(log, 10)
    done = engine.handle(command(m.CompleteActivityTask(activity_id="a", workflow_run_id=run, attempt=1,
                                                        claim_id="w1", result_json="1"), 4), at(10))
    assert types(done.events) == ["ACTIVITY_TASK_COMPLETED"]


async def test_copies_of_a_running_attempt_run_once() -> None:
    """The same attempt's task delivered several times at once runs once in a process."""
    runs = 0
    gate = asyncio.Event()

    from treeflow import activity as activity_decorator

    @activity_decorator()
    async def slow() -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        return "ok"

    runner = TaskRunner({}, {slow.name: slow})
    context = m.WorkflowContext(workflow_exec_id=ROOT, workflow_run_id="run", workflow_name="w",
                                parent_workflow_exec_id=None, root_workflow_exec_id=ROOT, task_queue="q")
    task = m.ActivityTask(activity_id="a", activity_name=slow.name, input_json=None, attempt=1,
                          scheduled_at=EPOCH, start_to_close_timeout_ms=None, heartbeat_timeout_ms=None)
    sent: list[Command] = []

    async def send(cmd: Command) -> None:
        sent.append(cmd)

    copies = [asyncio.ensure_future(runner.run_activity(context, task, send)) for _ in range(4)]
    await asyncio.sleep(0.1)
    gate.set()
    assert sorted(await asyncio.gather(*copies)) == [False, False, False, True]
    assert runs == 1 and runner.duplicate_tasks == 3
    assert [type(c.payload) for c in sent if not isinstance(c.payload, m.ReportActivityTaskStarted)] == [
        m.CompleteActivityTask]


async def refused_claim(_: Command) -> bool:
    return False


async def test_a_refused_claim_runs_nothing() -> None:
    calls = 0

    from treeflow import activity as activity_decorator

    @activity_decorator()
    async def never() -> str:
        nonlocal calls
        calls += 1
        return "ran"

    runner = TaskRunner({}, {never.name: never})
    context = m.WorkflowContext(workflow_exec_id=ROOT, workflow_run_id="run", workflow_name="w",
                                parent_workflow_exec_id=None, root_workflow_exec_id=ROOT, task_queue="q")
    task = m.ActivityTask(activity_id="a", activity_name=never.name, input_json=None, attempt=1,
                          scheduled_at=EPOCH, start_to_close_timeout_ms=None, heartbeat_timeout_ms=None)
    sent: list[Command] = []

    async def send(cmd: Command) -> None:
        sent.append(cmd)

    assert await runner.run_activity(context, task, send, refused_claim) is False
    assert calls == 0 and sent == [] and runner.closed_tasks == 1


@pytest.mark.parametrize("order", ["timer-first", "signal-first"])
async def test_a_signal_and_a_timer_in_one_activation_apply_the_signal_first(order: str) -> None:
    """`wait_condition(pred, timeout=10)`: the timer's firing and a signal that makes
    `pred` true reach the workflow in one task (the worker was slow, or the processor
    decided both on recovery), in either order in the history. The signal applies and
    the condition is re-checked before the timer fires: the wait returns."""
    mem = InMemory([Waiter], [])
    await mem.start(Waiter, 10.0, exec_id="w")
    assert mem.state("w").timers, "the workflow waits on its timeout timer"
    mem.now += timedelta(seconds=11)
    signal = mem.command("w", m.SignalWorkflowExecution(signal_name="go"))
    dispatches = []
    steps = ["tick", "signal"] if order == "timer-first" else ["signal", "tick"]
    for step in steps:
        effects = (mem.engine.tick(mem.now, "tick-1") if step == "tick" else mem.engine.handle(signal, mem.now))
        mem._record(effects)
        dispatches += [d for d in effects.dispatches if d.history is not None]
    assert [e for e in mem.types("w")[-2:]] == (["TIMER_FIRED", "WORKFLOW_EXECUTION_SIGNALED"]
                                                if order == "timer-first" else
                                                ["WORKFLOW_EXECUTION_SIGNALED", "TIMER_FIRED"])
    [task] = dispatches  # one workflow task for both
    history = list(mem.engine.histories["w"])
    mem.queue.append(mem.runner.run_workflow_task(task.context, task.task.task_id, history))
    await mem.drain()
    assert mem.state("w").result_json == '"ready"', mem.types("w")


def test_tasks_sent_again_after_a_recovery_are_marked_as_maybe_not_the_only_copy() -> None:
    """A worker claims an attempt only when its task may not be the only one: the
    processor marks the tasks it re-sends after a recovery (`first_dispatch=False`)."""
    live = PartitionEngine(0)
    log: list[Any] = []
    log += live.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q"), 0), at(0)).events
    task_id = live.states[ROOT].workflow_task.task_id  # type: ignore[union-attr]
    run = live.states[ROOT].context.workflow_run_id
    effects = live.handle(command(m.CompleteWorkflowTask(
        task_id=task_id, workflow_run_id=run, history_length=1, decisions=[
            m.ScheduleActivityTask(activity_id="a", activity_name="act", task_queue="q")]), 1), at(1))
    log += effects.events
    [first] = [d.task.payload for d in effects.dispatches if d.item.kind == "activity"]
    assert first.first_dispatch
    engine = recovered(log, 10)
    [again] = [d.task.payload for d in engine.resume(at(10)) if d.item.kind == "activity"]
    assert not again.first_dispatch
    # The attempt fails and is retried: the new attempt's task is its only one.
    engine.handle(command(m.FailActivityTask(activity_id="a", workflow_run_id=run, attempt=1,
                                             failure=m.Failure(type="Boom", message="boom")), 11), at(11))
    [retry] = [d.task.payload for d in engine.tick(at(13), "t").dispatches if d.item.kind == "activity"]
    assert retry.attempt == 2 and retry.first_dispatch


def test_decision_times_have_the_logs_precision() -> None:
    """Events carry milliseconds: a decision at a microsecond reading is recorded at its
    millisecond, so the live state equals the fold of the log (invariant 1)."""
    engine = PartitionEngine(0)
    events = engine.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q"), 0),
                           at(1.2345678)).events
    assert {e.timestamp for e in events} == {at(1.234)}
    assert engine.states[ROOT].execution_started_at == at(1.234)


def scheduled_eagerly(engine: PartitionEngine, task_id: str, seconds: float) -> Any:
    run = engine.states[ROOT].context.workflow_run_id
    return engine.handle(command(m.CompleteWorkflowTask(
        task_id=task_id, workflow_run_id=run, history_length=engine.states[ROOT].last_sequence,
        decisions=[m.ScheduleActivityTask(activity_id="a", activity_name="act", task_queue="q", eager=True)]),
        seconds), at(seconds))


def test_an_eager_first_attempt_is_dispatched_as_maybe_not_the_only_copy() -> None:
    """Eager activity execution: the worker that reported the scheduling runs attempt 1
    itself; its task goes out once EAGER_COPY_DELAY has passed with the attempt open,
    marked as possibly not the only copy, so that any other worker claims before running
    it (invariant 5), and a killed eager worker is replaced through it. A retry is an
    ordinary first dispatch."""
    from treeflow.processor.engine import EAGER_COPY_DELAY

    engine = PartitionEngine(0)
    effects = scheduled_eagerly(engine, started(engine), 1)
    assert types(effects.events) == ["WORKFLOW_TASK_COMPLETED", "ACTIVITY_TASK_SCHEDULED"]
    assert [d for d in effects.dispatches if d.item.kind == "activity"] == []
    assert engine.tick(at(1 + EAGER_COPY_DELAY.total_seconds() - 0.1), "t0").dispatches == []
    copy_at = 1 + EAGER_COPY_DELAY.total_seconds()
    [task] = [d.task.payload for d in engine.tick(at(copy_at), "t1").dispatches if d.item.kind == "activity"]
    assert (task.attempt, task.first_dispatch) == (1, False)
    run = engine.states[ROOT].context.workflow_run_id
    failed = engine.handle(command(m.FailActivityTask(activity_id="a", workflow_run_id=run, attempt=1,
                                                      failure=m.Failure(type="E", message="boom")), copy_at),
                           at(copy_at))
    assert "ACTIVITY_TASK_FAILED" not in types(failed.events)  # retried (default policy)
    [retry] = [d.task.payload for d in engine.tick(at(copy_at + 2), "t").dispatches if d.item.kind == "activity"]
    assert (retry.attempt, retry.first_dispatch) == (2, True)


def test_an_eager_attempt_decided_in_a_recovery_backlog_is_dispatched_on_resume_and_claimed() -> None:
    live = PartitionEngine(0)
    log = live.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q"), 0), at(0)).events
    task_id = live.states[ROOT].workflow_task.task_id  # type: ignore[union-attr]
    engine = recovered(log, 10)
    assert scheduled_eagerly(engine, task_id, 10).dispatches == []
    [task] = [d.task.payload for d in engine.resume(at(10)) if d.item.kind == "activity"]
    assert (task.attempt, task.first_dispatch) == (1, False)
