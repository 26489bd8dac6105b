"""The rules under time skipping, without a broker: the processor's clocks
(`treeflow.processor.clock`), and what the partition engine tells a time-skipping
environment: the exact next wakeup (`prune_wakeups`) and whether a task handed out
still waits for its report (`outstanding`)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from treeflow.processor.clock import SYSTEM_CLOCK, Clock, VirtualClock
from treeflow.processor.engine import PartitionEngine
from treeflow.schemas import Command, EventType
from treeflow.schemas import models as m
from tests.inmemory import EPOCH

ROOT = "root"


def at(seconds: float) -> datetime:
    return EPOCH + timedelta(seconds=seconds)


def command(payload: Any, seconds: float) -> Command:
    return Command(command_id=f"c{seconds}-{type(payload).__name__}", timestamp=at(seconds),
                   root_workflow_exec_id=ROOT, workflow_exec_id=ROOT, payload=payload)


def complete_task(engine: PartitionEngine, seconds: float, *decisions: Any) -> list[Any]:
    state = engine.states[ROOT]
    return engine.handle(command(m.CompleteWorkflowTask(
        task_id=state.workflow_task.task_id, workflow_run_id=state.context.workflow_run_id,  # type: ignore[union-attr]
        history_length=state.last_sequence, decisions=list(decisions)), seconds), at(seconds)).events


def wakeup(engine: PartitionEngine) -> datetime | None:
    engine.prune_wakeups()
    return engine.next_wakeup()


# ------------------------------------------------------------ clocks

def test_the_default_clock_is_the_systems_clock_in_utc() -> None:
    before = datetime.now(timezone.utc)
    now = SYSTEM_CLOCK.now()
    assert before <= now <= datetime.now(timezone.utc) and now.tzinfo is timezone.utc
    assert type(SYSTEM_CLOCK) is Clock


def test_a_virtual_clock_flows_with_the_system_and_jumps_forward_only() -> None:
    clock = VirtualClock()
    assert abs(clock.now() - datetime.now(timezone.utc)) < timedelta(seconds=1)
    first = clock.now()
    time.sleep(0.02)
    assert clock.now() - first >= timedelta(seconds=0.02)  # time flows between jumps
    clock.advance(timedelta(hours=1))
    assert clock.skipped == timedelta(hours=1)
    assert clock.now() - datetime.now(timezone.utc) >= timedelta(minutes=59)
    target = clock.now() + timedelta(days=1)
    assert clock.advance_to(target)
    assert clock.now() >= target
    assert not clock.advance_to(target - timedelta(hours=5))  # never back
    assert clock.now() >= target
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(timedelta(seconds=-1))


# ------------------------------------------------------------ what the engine tells the environment

def test_a_workflow_task_handed_out_is_outstanding_until_its_report() -> None:
    engine = PartitionEngine(0)
    assert not engine.outstanding()
    effects = engine.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q"), 0), at(0))
    assert [d.item.kind for d in effects.dispatches] == ["workflow"]
    assert engine.outstanding()
    complete_task(engine, 1, m.StartTimer(timer_id="t", duration_ms=3_600_000))
    assert not engine.outstanding()  # only the timer is left: time may skip to it
    assert wakeup(engine) == at(3601)


def test_an_activity_handed_out_is_outstanding_and_its_backoff_is_a_wakeup() -> None:
    engine = PartitionEngine(0)
    engine.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q"), 0), at(0))
    complete_task(engine, 1, m.ScheduleActivityTask(
        activity_id="a", activity_name="act", task_queue="q", start_to_close_timeout_ms=60_000,
        retry_policy=m.RetryPolicy(initial_interval_ms=600_000, maximum_attempts=2)))
    assert engine.outstanding()  # the attempt runs (here or at a worker): time must not skip past it
    run = engine.states[ROOT].context.workflow_run_id
    failed = engine.handle(command(m.FailActivityTask(activity_id="a", workflow_run_id=run, attempt=1,
                                                      failure=m.Failure(type="Boom", message="boom")), 2), at(2))
    assert EventType.ACTIVITY_TASK_RETRYING in [e.event_type for e in failed.events]
    assert not engine.outstanding()  # waiting out the backoff is waiting on the clock
    assert wakeup(engine) == at(602)
    assert [d.item.kind for d in engine.tick(at(602), "tick").dispatches] == ["activity"]
    assert engine.outstanding()


def test_a_canceled_timer_and_a_closed_execution_leave_no_wakeup() -> None:
    engine = PartitionEngine(0)
    engine.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q"), 0), at(0))
    complete_task(engine, 1, m.StartTimer(timer_id="day", duration_ms=86_400_000),
                  m.StartTimer(timer_id="hour", duration_ms=3_600_000))
    assert wakeup(engine) == at(3601)
    engine.handle(command(m.SignalWorkflowExecution(signal_name="go"), 2), at(2))
    complete_task(engine, 3, m.CancelTimer(timer_id="hour"))
    # The heap still holds the canceled timer's entry; the exact wakeup is the day-long one.
    assert engine.next_wakeup() is not None and engine.next_wakeup() <= at(3601)
    assert wakeup(engine) == at(86_401)
    engine.handle(command(m.SignalWorkflowExecution(signal_name="go"), 4), at(4))
    complete_task(engine, 5, m.CompleteWorkflowExecution(result_json="1"))
    assert not engine.states[ROOT].open
    assert wakeup(engine) is None  # nothing to skip to once it closed
    assert engine.tick(at(86_401), "tick").events == []


def test_pruning_never_drops_what_is_due() -> None:
    """A tick after pruning decides what a tick without it decides."""
    def build() -> PartitionEngine:
        engine = PartitionEngine(0)
        engine.handle(command(m.StartWorkflowExecution(workflow_name="w", task_queue="q",
                                                       execution_timeout_ms=7_200_000), 0), at(0))
        complete_task(engine, 1, m.StartTimer(timer_id="a", duration_ms=60_000),
                      m.StartTimer(timer_id="b", duration_ms=120_000))
        return engine

    plain, pruned = build(), build()
    for seconds in (61, 121, 7200):
        pruned.prune_wakeups()
        assert pruned.next_wakeup() >= plain.next_wakeup()  # the plain heap still holds stale entries
        assert pruned.next_wakeup() <= at(seconds)
        one = [e.event_type for e in plain.tick(at(seconds), f"t{seconds}").events]
        other = [e.event_type for e in pruned.tick(at(seconds), f"t{seconds}").events]
        assert one == other and one
        for engine in (plain, pruned):
            if engine.states[ROOT].workflow_task is not None and engine.states[ROOT].open:
                complete_task(engine, seconds + 0.5)
