"""Signals, queries, wait_condition, continue-as-new and cancellation, through the processor's
partition engine and the task runner without a broker (tests/inmemory.py). The same
behaviours run on Kafka in tests/integration/test_control.py."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from treeflow import workflow
from treeflow.core import Status
from treeflow.payloads import to_json
from treeflow.schemas import EventType, Reply
from treeflow.schemas import models as m
from treeflow.worker.runner import TaskRunner
from tests import control_workflows as control
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
from tests.inmemory import InMemory

T = EventType


@pytest.fixture(autouse=True)
def reset_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    CALLS.clear()
    monkeypatch.setattr(control, "LONG_STEP_SECONDS", 0)  # virtual time: held, not slept


async def send(mem: InMemory, exec_id: str, payload: Any) -> Reply:
    """Send a client command, run everything it leads to, and return its reply."""
    cmd = mem.command(exec_id, payload)
    mem.queue.append(cmd)
    await mem.drain()
    [reply] = [r for r in mem.replies if r.command_id == cmd.command_id]
    return reply


async def signal(mem: InMemory, exec_id: str, name: str, payload: Any = None) -> Reply:
    return await send(mem, exec_id, m.SignalWorkflowExecution(
        signal_name=name, input_json=None if payload is None else to_json(payload)))


async def query(mem: InMemory, exec_id: str, name: str, payload: Any = None, **fields: Any) -> Reply:
    return await send(mem, exec_id, m.QueryWorkflow(
        query_name=name, input_json=None if payload is None else to_json(payload), **fields))


async def cancel(mem: InMemory, exec_id: str) -> Reply:
    return await send(mem, exec_id, m.RequestCancelWorkflowExecution(reason="test"))


async def test_signals_are_events_delivered_in_order_and_replayed_the_same() -> None:
    mem = InMemory([Collector], [record])
    await mem.start(Collector, exec_id="c")
    for name, quantity in (("apple", 1), ("pear", 2), ("fig", 3)):
        assert (await signal(mem, "c", "add", Item(name=name, quantity=quantity))).accepted
    await signal(mem, "c", "finish")
    state = mem.state("c")
    assert state.status is Status.COMPLETED
    assert json.loads(state.result_json) == ["|", "applex1", "pearx2", "figx3"]
    signaled = [e.payload.signal_name for e in mem.history("c") if e.event_type is T.WORKFLOW_EXECUTION_SIGNALED]
    assert signaled == ["add", "add", "add", "finish"]
    assert CALLS == ["finishing"]
    # A new worker replays the history: same decisions, the activity is not run again.
    history = mem.history("c")[:-1]
    fresh = TaskRunner({"collector": Collector.__treeflow_workflow__}, {"record": record})
    completion = fresh.run_workflow_task(history[0].workflow_context, "replay", history[:-1])
    assert [type(d).__name__ for d in completion.payload.decisions] == ["CompleteWorkflowExecution"]
    assert completion.payload.decisions[0].result_json == state.result_json
    assert CALLS == ["finishing"]


async def test_a_signal_sent_with_the_start_is_handled_before_the_entrypoint_runs() -> None:
    mem = InMemory([Collector], [record])
    start = mem.command("early", m.StartWorkflowExecution(workflow_name="collector", task_queue="default"))
    early = mem.command("early", m.SignalWorkflowExecution(signal_name="add", input_json='{"name":"a","quantity":1}'))
    mem.engine.handle(start, mem.now)
    mem.engine.handle(early, mem.now)  # both events precede the first workflow task
    history = mem.engine.histories["early"]
    assert [e.event_type for e in history] == [T.WORKFLOW_EXECUTION_STARTED, T.WORKFLOW_EXECUTION_SIGNALED]
    fresh = TaskRunner({"collector": Collector.__treeflow_workflow__}, {})
    fresh.run_workflow_task(history[0].workflow_context, "t1", history)
    [instance] = fresh._cache.values()
    assert instance.query("items", None) == ["ax1"]
    instance.workflow_object.done = True
    decisions = instance.activate([])
    assert json.loads(decisions[-1].result_json) == ["ax1", "|", "ax1"]


async def test_a_signal_without_handler_or_with_a_bad_payload_is_dropped_not_fatal() -> None:
    mem = InMemory([Collector], [record])
    await mem.start(Collector, exec_id="c")
    assert (await signal(mem, "c", "no-such-signal", {"x": 1})).accepted
    await signal(mem, "c", "add", {"name": "bad"})  # quantity missing: does not fit Item
    await signal(mem, "c", "add", {"name": "good", "quantity": 1})
    assert (await query(mem, "c", "items")).result_json == '["goodx1"]'
    assert mem.state("c").open


async def test_a_query_answers_from_current_state_and_appends_nothing() -> None:
    mem = InMemory([Collector], [record])
    await mem.start(Collector, exec_id="c")
    await signal(mem, "c", "add", {"name": "apple", "quantity": 2})
    await signal(mem, "c", "add", {"name": "avocado", "quantity": 1})
    before = len(mem.events)
    answer = await query(mem, "c", "items")
    assert (answer.accepted, answer.result_json, answer.error) == (True, '["applex2","avocadox1"]', None)
    by_arg = await query(mem, "c", "count_of", "av")
    assert by_arg.result_json == "1"
    assert len(mem.events) == before  # no event: history unchanged
    assert mem.runner.query_replays == 0  # answered by the cached instance


async def test_a_query_replays_history_when_the_worker_has_no_instance() -> None:
    mem = InMemory([Collector], [record])
    await mem.start(Collector, exec_id="c")
    await signal(mem, "c", "add", {"name": "kiwi", "quantity": 5})
    mem.runner._cache.clear()  # e.g. another worker of the queue takes the query
    answer = await query(mem, "c", "items")
    assert answer.result_json == '["kiwix5"]'
    assert mem.runner.query_replays == 1
    assert not mem.runner._cache  # the replayed instance is not kept


async def test_a_query_sees_a_signal_its_workflow_task_has_not_processed_yet() -> None:
    mem = InMemory([Collector], [record])
    await mem.start(Collector, exec_id="c")
    mem.engine.handle(mem.command("c", m.SignalWorkflowExecution(
        signal_name="add", input_json='{"name":"late","quantity":1}')), mem.now)  # its workflow task not run
    runner = mem.runner
    state = mem.state("c")
    task = m.QueryTask(query_id="q", query_name="items", history=mem.engine.histories["c"])
    answer = runner.run_query_task(state.context, task).payload
    assert answer.result_json == '["latex1"]'
    assert runner.query_replays == 1  # the cached instance had not seen the signal


async def test_query_errors_say_why() -> None:
    mem = InMemory([Collector], [record])
    await mem.start(Collector, exec_id="c")
    unknown = await query(mem, "c", "nope")
    assert (unknown.accepted, unknown.error.type) == (False, "QueryNotFound")
    assert "has no query named 'nope'" in unknown.error.message and "'items'" in unknown.error.message
    broken = await query(mem, "c", "broken")
    assert broken.error.type == "QueryFailed" and "KeyError" in broken.error.message
    assert broken.error.cause.type == "KeyError"
    sneaky = await query(mem, "c", "sneaky")
    assert sneaky.error.type == "QueryFailed" and "only reads the workflow's state" in sneaky.error.message
    assert CALLS == []
    missing = await query(mem, "nobody", "items")
    assert (missing.accepted, missing.error.type) == (False, "WorkflowNotFound")
    expired = await query(mem, "c", "items", deadline=mem.now - timedelta(seconds=1))
    assert expired.error.type == "QueryExpired"
    await signal(mem, "c", "finish")
    closed = await query(mem, "c", "items")
    assert (closed.accepted, closed.error.type) == (False, "WorkflowClosed")
    assert "already closed (COMPLETED)" in closed.error.message
    # The sticky instance still decides as before: the failed queries changed nothing.
    assert mem.state("c").status is Status.COMPLETED
    assert mem.runner.replays == 1


def test_handler_declarations_are_checked() -> None:
    with pytest.raises(TypeError, match="must be a plain `def`"):
        class AsyncQuery:
            @workflow.query
            async def state(self) -> int:
                return 1

    definition = Collector.__treeflow_workflow__
    assert definition.signals == {"add": "add", "finish": "finish"}
    assert definition.queries == {"items": "current_items", "count_of": "count_of", "broken": "broken",
                                  "sneaky": "sneaky"}


async def test_wait_condition_without_timeout_waits_for_the_signal() -> None:
    mem = InMemory([Waiter], [])
    await mem.start(Waiter, None, exec_id="w")
    await mem.advance(3600)
    assert mem.state("w").open and not mem.state("w").timers
    await signal(mem, "w", "go")
    assert mem.state("w").result_json == '"ready"'


async def test_wait_condition_with_a_timeout_uses_a_durable_timer() -> None:
    mem = InMemory([Waiter], [])
    await mem.start(Waiter, 30, exec_id="late")
    [started] = [e for e in mem.history("late") if e.event_type is T.TIMER_STARTED]
    assert started.payload.duration_ms == 30_000
    await mem.advance(29)
    assert mem.state("late").open
    await mem.advance(1)
    assert mem.state("late").status is Status.COMPLETED
    assert mem.state("late").result_json == '"timed out after 30.0s"'

    await mem.start(Waiter, 30, exec_id="early")
    await mem.advance(5)
    await signal(mem, "early", "go")
    assert mem.state("early").result_json == '"ready"'
    types = mem.types("early")
    assert types.index("TIMER_CANCELED") < types.index("WORKFLOW_EXECUTION_COMPLETED")
    assert "TIMER_FIRED" not in types


async def test_continue_as_new_starts_a_new_run_of_the_same_execution() -> None:
    mem = InMemory([Counter], [record])
    await mem.start(Counter, 1, exec_id="cnt")
    history = mem.history("cnt")
    runs = list(dict.fromkeys(e.workflow_context.workflow_run_id for e in history))
    assert len(runs) == 3
    continued = [e for e in history if e.event_type is T.WORKFLOW_EXECUTION_CONTINUED_AS_NEW]
    assert [e.payload.new_workflow_run_id for e in continued] == runs[1:]
    assert [e.payload.input_json for e in continued] == ["2", "3"]
    starts = [e for e in history if e.event_type is T.WORKFLOW_EXECUTION_STARTED]
    assert [e.payload.continued_from_run_id for e in starts] == [None, *runs[:-1]]
    assert {e.workflow_context.workflow_exec_id for e in history} == {"cnt"}
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    state = mem.state("cnt")
    assert state.status is Status.COMPLETED
    assert state.result_json == '"done at 3"'
    assert CALLS == ["run 1", "run 2", "run 3"]


@workflow.define(name="long_runner")
class LongRunner:
    @workflow.entrypoint
    async def run(self, total: int) -> str:
        done = 0
        while done < total:
            await record(f"step {done}")
            done += 1
            if workflow.should_continue_as_new():
                workflow.continue_as_new(total - done)
        return "finished"


async def test_should_continue_as_new_counts_the_runs_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workflow, "CONTINUE_AS_NEW_SUGGESTED_AFTER", 12)
    mem = InMemory([LongRunner], [record])
    await mem.start(LongRunner, 5, exec_id="lr")
    history = mem.history("lr")
    continued = [e for e in history if e.event_type is T.WORKFLOW_EXECUTION_CONTINUED_AS_NEW]
    # The code first sees 1 event (started), then 4 more per step (task completed, scheduled,
    # started, completed): after the third step it has seen 13 >= 12 and continues as new.
    assert [e.payload.input_json for e in continued] == ["2"]
    assert mem.state("lr").status is Status.COMPLETED
    assert CALLS == ["step 0", "step 1", "step 2", "step 0", "step 1"]


async def test_cancel_reaches_the_awaiting_code_which_cleans_up_then_ends_canceled() -> None:
    mem = InMemory([CleansUp], [long_step, record])
    mem.hold_activities = True
    await mem.start(CleansUp, "cu", exec_id="cu")
    assert [h.task.payload.activity_name for h in mem.held] == ["long_step"]
    mem.hold_activities = False
    assert (await cancel(mem, "cu")).accepted
    types = mem.types("cu")
    assert types[types.index("WORKFLOW_EXECUTION_CANCEL_REQUESTED"):] == [
        "WORKFLOW_EXECUTION_CANCEL_REQUESTED", "WORKFLOW_TASK_COMPLETED",
        "ACTIVITY_TASK_CANCEL_REQUESTED", "ACTIVITY_TASK_CANCELED", "ACTIVITY_TASK_SCHEDULED",  # the cleanup
        "WORKFLOW_TASK_COMPLETED", "ACTIVITY_TASK_STARTED", "ACTIVITY_TASK_COMPLETED", "WORKFLOW_TASK_COMPLETED",
        "WORKFLOW_EXECUTION_CANCELED"]
    assert CALLS == ["cleanup cu"]
    assert mem.state("cu").status is Status.CANCELED
    await mem.release()  # the canceled attempt reports late: not an event
    assert CALLS == ["cleanup cu", "cu"]
    assert mem.types("cu")[-1] == "WORKFLOW_EXECUTION_CANCELED"


async def test_a_workflow_that_ignores_the_cancel_keeps_running() -> None:
    mem = InMemory([IgnoresCancel], [])
    await mem.start(IgnoresCancel, exec_id="ig")
    await cancel(mem, "ig")
    assert mem.state("ig").open and mem.state("ig").cancel_requested
    assert "TIMER_CANCELED" in mem.types("ig")
    await mem.advance(10)
    assert (mem.state("ig").status, mem.state("ig").result_json) == (Status.COMPLETED, '"kept running"')


async def test_cancel_propagates_to_the_awaited_child_and_the_parent_waits_for_it() -> None:
    mem = InMemory([AwaitsChild, SleepyChild], [long_step, record])
    mem.hold_activities = True
    await mem.start(AwaitsChild, "mom", exec_id="mom")
    mem.hold_activities = False
    assert mem.state("mom.kid").open
    await cancel(mem, "mom")
    assert mem.state("mom.kid").status is Status.CANCELED
    assert mem.state("mom").status is Status.CANCELED
    assert CALLS == ["child cleanup mom"]
    order = [(e.workflow_context.workflow_exec_id, e.event_type.value) for e in mem.events]
    assert order.index(("mom", "CHILD_WORKFLOW_EXECUTION_CANCEL_REQUESTED")) < order.index(
        ("mom.kid", "WORKFLOW_EXECUTION_CANCEL_REQUESTED")) < order.index(
        ("mom.kid", "ACTIVITY_TASK_CANCELED")) < order.index(
        ("mom.kid", "WORKFLOW_EXECUTION_CANCELED")) < order.index(
        ("mom", "CHILD_WORKFLOW_EXECUTION_CANCELED")) < order.index(("mom", "WORKFLOW_EXECUTION_CANCELED"))
    assert "PARENT_CLOSE_POLICY_APPLIED" not in mem.types("mom")  # the child had closed first


async def test_a_cancel_requested_before_the_code_ran_reaches_it_at_its_first_await() -> None:
    mem = InMemory([CleansUp], [long_step, record])
    start = mem.command("pre", m.StartWorkflowExecution(workflow_name="cleans_up", task_queue="default",
                                                        input_json='"pre"'))
    mem.engine.handle(start, mem.now)  # its workflow task is dispatched, not run
    mem.engine.handle(mem.command("pre", m.RequestCancelWorkflowExecution(reason="never mind")), mem.now)
    state = mem.state("pre")
    history = mem.engine.histories["pre"]
    completion = mem.runner.run_workflow_task(state.context, state.workflow_task.task_id, history)
    assert [type(d).__name__ for d in completion.payload.decisions] == [
        "ScheduleActivityTask", "RequestCancelActivityTask", "ScheduleActivityTask"]
    mem.queue.append(completion)
    await mem.drain()
    assert mem.state("pre").status is Status.CANCELED
    assert CALLS == ["cleanup pre"]  # the canceled activity was never dispatched
