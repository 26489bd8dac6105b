"""Workflow semantics through the processor's partition engine and the task runner, without a
broker (tests/inmemory.py). The same paths run on Kafka in tests/integration/test_engine.py."""

import asyncio
from datetime import timedelta

import pytest
from pydantic import BaseModel

import treeflow as workflows
from treeflow import workflow
from treeflow.core import Status
from treeflow.schemas import EventType
from treeflow.schemas import models as m
from treeflow.worker.runner import TaskRunner
from tests.inmemory import InMemory

CALLS: dict[str, int] = {}


@workflows.activity()
async def process_item(value: str) -> str:
    CALLS[value] = CALLS.get(value, 0) + 1
    return f"processed:{value}"


@workflows.activity(retry_policy=workflows.RetryPolicy(initial_interval=timedelta(seconds=1),
                                                       backoff_coefficient=3, maximum_attempts=3))
async def flaky(key: str, failures: int) -> str:
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] <= failures:
        raise ValueError(f"{key} failed on attempt {CALLS[key]}")
    return f"{key} ok after {CALLS[key]}"


class ChildInput(BaseModel):
    value: str


@workflow.define(name="child")
class Child:
    @workflow.entrypoint
    async def run(self, params: ChildInput) -> str:
        return await process_item(params.value)


@workflow.define(name="parent")
class Parent:
    @workflow.entrypoint
    async def run(self, data: str) -> str:
        result = await workflows.execute_workflow(Child, params=ChildInput(value=data))
        return f"Parent got: {result}"


@workflow.define(name="fan_out")
class FanOut:
    @workflow.entrypoint
    async def run(self, n: int) -> list[str]:
        return list(await asyncio.gather(*(process_item(f"item-{i}") for i in range(n))))


@workflow.define(name="retrying")
class Retrying:
    @workflow.entrypoint
    async def run(self, failures: int) -> str:
        return await flaky(f"retry-{failures}", failures)


@workflow.define(name="catches_child")
class CatchesChild:
    @workflow.entrypoint
    async def run(self) -> str:
        try:
            await workflows.execute_workflow(Failing)
        except workflows.ChildWorkflowError as error:
            return f"{error.status}: {error.cause}"
        return "no error"


@workflow.define(name="failing", failure_exception_types=[KeyError])
class Failing:
    @workflow.entrypoint
    async def run(self) -> str:
        raise KeyError("no such order")


@workflow.define(name="sleeper")
class Sleeper:
    @workflow.entrypoint
    async def run(self) -> list[str]:
        before = workflow.now()
        await asyncio.sleep(30)
        after = workflow.now()
        return [str(workflow.uuid4()), f"{(after - before).total_seconds():.0f}", f"{workflow.random().random():.6f}"]


@pytest.fixture(autouse=True)
def reset_calls() -> None:
    CALLS.clear()


def sequences_are_gapless(mem: InMemory) -> None:
    by_exec: dict[str, list[int]] = {}
    for event in mem.events:
        by_exec.setdefault(event.workflow_context.workflow_exec_id, []).append(event.sequence)
    for exec_id, sequences in by_exec.items():
        assert sequences == list(range(1, len(sequences) + 1)), exec_id


async def test_the_seed_tree_completes_with_contexts_and_ordering() -> None:
    mem = InMemory([Parent, Child], [process_item])
    await mem.start(Parent, "hello", exec_id="p1")
    assert mem.state("p1").status is Status.COMPLETED
    assert mem.state("p1").result_json == '"Parent got: processed:hello"'
    [child_id] = [e.payload.child_workflow_exec_id for e in mem.history("p1")
                  if e.event_type is EventType.CHILD_WORKFLOW_EXECUTION_STARTED]
    child_events = mem.history(child_id)
    assert {e.workflow_context.parent_workflow_exec_id for e in child_events} == {"p1"}
    assert {e.workflow_context.root_workflow_exec_id for e in child_events} == {"p1"}
    assert {e.workflow_context.parent_workflow_exec_id for e in mem.history("p1")} == {None}
    order = [(e.workflow_context.workflow_exec_id, e.event_type) for e in mem.events]
    assert order.index((child_id, EventType.WORKFLOW_EXECUTION_STARTED)) < order.index(
        (child_id, EventType.ACTIVITY_TASK_SCHEDULED))
    assert order.index((child_id, EventType.WORKFLOW_EXECUTION_COMPLETED)) < order.index(
        ("p1", EventType.CHILD_WORKFLOW_EXECUTION_COMPLETED))
    sequences_are_gapless(mem)


async def test_gather_runs_activities_side_by_side_and_each_once() -> None:
    mem = InMemory([FanOut], [process_item])
    await mem.start(FanOut, 5)
    assert mem.state("root").result_json == '["processed:item-0","processed:item-1","processed:item-2",' \
                                            '"processed:item-3","processed:item-4"]'
    scheduled = [e for e in mem.history("root") if e.event_type is EventType.ACTIVITY_TASK_SCHEDULED]
    first_task_end = [e.sequence for e in mem.history("root") if e.event_type is EventType.WORKFLOW_TASK_COMPLETED][1]
    assert len(scheduled) == 5 and all(e.sequence < first_task_end for e in scheduled)  # all in the first task
    assert CALLS == {f"item-{i}": 1 for i in range(5)}


async def test_an_activity_is_retried_with_growing_backoff_then_succeeds() -> None:
    mem = InMemory([Retrying], [flaky])
    await mem.start(Retrying, 2)
    retries = [e for e in mem.history("root") if e.event_type is EventType.ACTIVITY_TASK_RETRYING]
    assert [(e.payload.next_attempt, e.payload.backoff_ms) for e in retries] == [(2, 1000)]
    assert retries[0].payload.failure.type == "ValueError"
    await mem.advance(1)
    retries = [e for e in mem.history("root") if e.event_type is EventType.ACTIVITY_TASK_RETRYING]
    assert [(e.payload.next_attempt, e.payload.backoff_ms) for e in retries] == [(2, 1000), (3, 3000)]
    await mem.advance(3)
    assert mem.state("root").result_json == '"retry-2 ok after 3"'


async def test_an_activity_out_of_attempts_fails_the_workflow_with_its_cause() -> None:
    mem = InMemory([Retrying], [flaky])
    await mem.start(Retrying, 5)
    await mem.advance(1)
    await mem.advance(3)
    state = mem.state("root")
    assert state.status is Status.FAILED
    assert state.failure.type == "ActivityError"
    assert state.failure.cause.type == "ValueError"
    assert state.failure.cause.message == "retry-5 failed on attempt 3"
    assert "raise ValueError" in state.failure.cause.stack_trace
    assert CALLS["retry-5"] == 3


async def test_a_failed_child_raises_a_child_workflow_error_in_the_parent() -> None:
    mem = InMemory([CatchesChild, Failing], [])
    await mem.start(CatchesChild)
    assert mem.state("root").result_json == "\"FAILED: KeyError: 'no such order'\""


async def test_a_workflow_that_raises_ends_failed_with_the_failure_in_its_history() -> None:
    mem = InMemory([Failing], [])
    await mem.start(Failing)
    [closing] = [e for e in mem.history("root") if e.event_type is EventType.WORKFLOW_EXECUTION_FAILED]
    assert (closing.payload.failure.type, closing.payload.failure.message) == ("KeyError", "'no such order'")


async def test_durable_timers_and_deterministic_now_uuid_random() -> None:
    mem = InMemory([Sleeper], [])
    await mem.start(Sleeper)
    assert mem.state("root").timers
    await mem.advance(29)
    assert mem.state("root").open
    await mem.advance(1)
    state = mem.state("root")
    assert state.status is Status.COMPLETED
    uuid_value, elapsed, random_value = __import__("json").loads(state.result_json)
    assert elapsed == "30"
    # Replaying the same history in a fresh runner gives the same values.
    fresh = TaskRunner({"sleeper": Sleeper.__treeflow_workflow__}, {})
    history = [e for e in mem.history("root") if e.event_type is not EventType.WORKFLOW_EXECUTION_COMPLETED]
    completion = fresh.run_workflow_task(history[0].workflow_context, "t", history[:-1])
    [decision] = completion.payload.decisions
    assert decision.result_json == state.result_json


async def test_replay_never_reruns_a_completed_activity() -> None:
    mem = InMemory([Parent, Child], [process_item])
    await mem.start(Parent, "once", exec_id="p1")
    mem.runner._cache.clear()  # a new worker: everything is replayed from history
    for exec_id in list(mem.engine.states):
        history = mem.engine.histories.get(exec_id) or mem.history(exec_id)
        mem.runner.run_workflow_task(history[0].workflow_context, "replay", history)
    assert CALLS == {"once": 1}


async def test_non_determinism_fails_the_workflow_task_naming_the_mismatch() -> None:
    mem = InMemory([Parent, Child], [process_item])
    await mem.start(Parent, "x", exec_id="p1")
    history = [e for e in mem.history("p1") if e.event_type is not EventType.WORKFLOW_EXECUTION_COMPLETED]

    @workflow.define(name="parent")
    class ChangedParent:
        @workflow.entrypoint
        async def run(self, data: str) -> str:
            await asyncio.sleep(1)  # the new code sleeps where the old one started a child
            return "changed"

    runner = TaskRunner({"parent": ChangedParent.__treeflow_workflow__}, {})
    result = runner.run_workflow_task(history[0].workflow_context, "t", history)
    assert isinstance(result.payload, m.FailWorkflowTask)
    assert result.payload.cause == "NON_DETERMINISTIC"
    assert "START_CHILD_WORKFLOW_EXECUTION_INITIATED" in result.payload.failure.message
    assert "StartTimer" in result.payload.failure.message


async def test_an_unknown_workflow_name_fails_its_workflow_task_clearly() -> None:
    mem = InMemory([Parent], [])
    mem.queue.append(mem.command("w", m.StartWorkflowExecution(workflow_name="nope", task_queue="default")))
    await mem.drain()
    [failed] = [e for e in mem.history("w") if e.event_type is EventType.WORKFLOW_TASK_FAILED]
    assert failed.payload.cause == "UNKNOWN_WORKFLOW"
    assert "no workflow named 'nope'" in failed.payload.failure.message
    assert mem.state("w").open  # retried after a backoff, e.g. once a worker that has it is deployed


async def test_starting_a_running_execution_id_again_is_rejected() -> None:
    mem = InMemory([Sleeper], [])
    await mem.start(Sleeper, exec_id="s")
    await mem.start(Sleeper, exec_id="s")
    assert [r.accepted for r in mem.replies] == [True, False]
    assert mem.replies[1].error.type == "WorkflowAlreadyStarted"
    assert "already running" in mem.replies[1].error.message


async def test_a_late_activity_result_appends_nothing() -> None:
    mem = InMemory([Retrying], [flaky])
    mem.hold_activities = True
    await mem.start(Retrying, 0)
    [held] = mem.held
    await mem.advance(5 * 60 + 1)  # the attempt's start-to-close timeout (default 5 min) passes
    types = mem.types("root")
    assert "ACTIVITY_TASK_TIMED_OUT" in types and "ACTIVITY_TASK_RETRYING" in types
    before = len(mem.events)
    mem.held = [held]
    mem.hold_activities = False
    await mem.release()  # attempt 1 reports after its timeout: stale
    late = mem.events[before:]
    assert all(e.attempt != 1 for e in late)


@workflows.activity(start_to_close_timeout=timedelta(seconds=2),
                    retry_policy=workflows.RetryPolicy(maximum_attempts=1))
async def never_answers(key: str) -> str:
    return key  # held by the test: it never reports


@workflow.define(name="awaits_a_timeout")
class AwaitsATimeout:
    @workflow.entrypoint
    async def run(self) -> str:
        try:
            return await never_answers("k")
        except workflows.ActivityError as error:
            return f"{type(error).__name__}: {error} / cause {error.cause.type}"


async def test_an_activity_that_times_out_for_good_raises_in_the_workflow() -> None:
    mem = InMemory([AwaitsATimeout], [never_answers])
    mem.hold_activities = True
    await mem.start(AwaitsATimeout)
    await mem.advance(3)
    assert mem.types("root")[-3:] == ["ACTIVITY_TASK_TIMED_OUT", "WORKFLOW_TASK_COMPLETED",
                                      "WORKFLOW_EXECUTION_COMPLETED"]
    assert mem.state("root").result_json == (
        '"ActivityError: activity never_answers (1) timed out: ActivityTimeoutError: activity timed out '
        '(START_TO_CLOSE) / cause ActivityTimeoutError"')
