"""Mistral's SDK surface (multi-parameter entrypoints and handlers, activity options and
defaults, define's arguments, custom tasks in workflow code, the task-failure rule),
through the partition engine and the task runner without a broker (tests/inmemory.py)."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import treeflow as workflows
from treeflow import ParentClosePolicy, workflow
from treeflow.core import Status
from treeflow.payloads import Parameters, to_json
from treeflow.schemas import EventType, Reply
from treeflow.schemas import models as m
from treeflow.worker.runner import TaskRunner
from tests.inmemory import InMemory

T = EventType
SEEN: list[Any] = []


@pytest.fixture(autouse=True)
def reset() -> None:
    SEEN.clear()


async def send(mem: InMemory, exec_id: str, payload: Any) -> Reply:
    cmd = mem.command(exec_id, payload)
    mem.queue.append(cmd)
    await mem.drain()
    [reply] = [r for r in mem.replies if r.command_id == cmd.command_id]
    return reply


def replays_cleanly(mem: InMemory, workflow_cls: type, exec_id: str = "root") -> None:
    """A fresh worker replays the recorded history with no non-determinism."""
    runner = TaskRunner({d.name: d for d in [workflow_cls.__treeflow_workflow__]}, {})
    history = mem.history(exec_id)
    cmd = runner.run_workflow_task(history[0].workflow_context, "replay", history)
    assert isinstance(cmd.payload, m.CompleteWorkflowTask), cmd.payload


# ---------------------------------------------------------------- parameters


class Customer(BaseModel):
    name: str
    tier: str = "basic"


@workflows.activity()
async def note(value: str) -> str:
    SEEN.append(value)
    return value


@workflow.define(name="basket")
class Basket:
    def __init__(self) -> None:
        self.items: dict[str, int] = {}
        self.done = False

    @workflow.signal(name="add_item")
    def add_item(self, item: str, qty: int = 1) -> None:
        self.items[item] = self.items.get(item, 0) + qty

    @workflow.signal()
    def finish(self) -> None:
        self.done = True

    @workflow.query(name="count")
    def count(self, item: str, times: int = 1) -> int:
        return self.items.get(item, 0) * times

    @workflow.entrypoint
    async def run(self, customer: Customer, max_items: int = 10) -> dict[str, Any]:
        await workflow.wait_condition(lambda: self.done or sum(self.items.values()) >= max_items)
        return {"customer": customer.name, "items": self.items, "max": max_items}


@workflow.define(name="single")
class Single:
    @workflow.signal
    def take(self, item: str) -> None:
        SEEN.append(item)

    @workflow.signal
    def take_customer(self, customer: Customer) -> None:
        SEEN.append(customer)

    @workflow.entrypoint
    async def run(self, data: str) -> str:
        await workflow.wait_condition(lambda: len(SEEN) >= 4)
        return data


def test_a_payload_maps_to_parameters_raw_or_as_an_object_of_them() -> None:
    def one(self: Any, item: str) -> None: ...
    def model(self: Any, customer: Customer) -> None: ...
    def named(self: Any, item: Customer) -> None: ...  # a model with no field named item
    def many(self: Any, item: str, qty: int = 1) -> None: ...
    def none(self: Any) -> None: ...

    assert Parameters.of(one).bind('"apple"') == (["apple"], {})
    assert Parameters.of(one).bind('{"item": "apple"}') == (["apple"], {})
    assert Parameters.of(model).bind('{"name": "ann"}') == ([Customer(name="ann")], {})
    assert Parameters.of(named).bind('{"item": {"name": "ann"}}') == ([Customer(name="ann")], {})
    assert Parameters.of(many).bind('{"item": "apple"}') == ([], {"item": "apple"})
    assert Parameters.of(many).bind('{"item": "apple", "qty": "3"}') == ([], {"item": "apple", "qty": 3})
    assert Parameters.of(many).bind('["apple", 2]') == ([], {"item": "apple", "qty": 2})
    assert Parameters.of(many).bind('"apple"') == ([], {"item": "apple"})
    assert Parameters.of(none).bind('{"anything": 1}') == ([], {})
    # Mistral's object form with nothing given ({}) leaves a defaulted parameter to its default,
    # unless {} is a value of its type.
    def optional(self: Any, only: str | None = None) -> None: ...
    def mapping(self: Any, extra: dict[str, int] | None = None) -> None: ...
    assert Parameters.of(optional).bind("{}") == ([], {})
    assert Parameters.of(mapping).bind("{}") == ([{}], {})
    with pytest.raises(workflows.ApplicationError, match="does not fit"):
        Parameters.of(one).bind("{}")
    for bad in ('{"qty": 2}', '{"item": "a", "colour": "red"}', '["a", 1, 2]', '{"item": "a", "qty": "many"}'):
        with pytest.raises(workflows.ApplicationError, match="does not fit") as caught:
            Parameters.of(many).bind(bad)
        assert caught.value.type == "PayloadValidationError"


async def test_a_multi_parameter_entrypoint_and_handlers_take_mistral_shaped_input() -> None:
    mem = InMemory([Basket], [])
    await mem.start(Basket, {"customer": {"name": "ann"}, "max_items": 5})
    assert (await send(mem, "root", m.SignalWorkflowExecution(
        signal_name="add_item", input_json=to_json({"item": "apple", "qty": 2})))).accepted
    await send(mem, "root", m.SignalWorkflowExecution(signal_name="add_item", input_json=to_json(["pear"])))
    answer = await send(mem, "root", m.QueryWorkflow(query_name="count", input_json=to_json({"item": "apple",
                                                                                             "times": 10})))
    assert answer.result_json == "20"
    await send(mem, "root", m.SignalWorkflowExecution(signal_name="add_item", input_json=to_json({"item": "fig",
                                                                                                  "qty": 2})))
    state = mem.state("root")
    assert state.status is Status.COMPLETED
    assert json.loads(state.result_json) == {"customer": "ann", "items": {"apple": 2, "pear": 1, "fig": 2}, "max": 5}
    replays_cleanly(mem, Basket)


async def test_a_default_parameter_may_be_left_out_and_a_missing_one_fails_the_start() -> None:
    mem = InMemory([Basket], [])
    await mem.start(Basket, {"customer": {"name": "bob"}})
    await send(mem, "root", m.SignalWorkflowExecution(signal_name="finish"))
    assert json.loads(mem.state("root").result_json)["max"] == 10
    mem = InMemory([Basket], [])
    await mem.start(Basket, {"max_items": 3})
    state = mem.state("root")
    assert state.status is Status.FAILED
    assert state.failure.type == "PayloadValidationError" and "customer" in state.failure.message


async def test_a_single_parameter_handler_takes_the_raw_value_or_an_object_of_its_name() -> None:
    mem = InMemory([Single], [])
    await mem.start(Single, {"data": "x"})  # Mistral's form of a one-parameter input
    for name, payload in [("take", "raw"), ("take", {"item": "named"}), ("take_customer", {"name": "ann"}),
                          ("take_customer", {"customer": {"name": "bob"}})]:
        await send(mem, "root", m.SignalWorkflowExecution(signal_name=name, input_json=to_json(payload)))
    assert SEEN == ["raw", "named", Customer(name="ann"), Customer(name="bob")]
    assert mem.state("root").result_json == '"x"'


# ---------------------------------------------------------------- activity options

ATTEMPTS: dict[str, int] = {}


@workflows.activity(timedelta(seconds=30), 5, 3.0, "mistral_style", heartbeat_timeout=timedelta(seconds=7))
async def mistral_style(value: str) -> str:
    return value


@workflows.activity()
async def always_fails(key: str) -> str:
    ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    raise ValueError(f"attempt {ATTEMPTS[key]}")


@workflows.activity()
def beats_in_a_thread(n: int) -> int:
    for i in range(n):
        workflows.activity_heartbeat(i, "of", n)
    return n


@workflow.define(name="uses_activities")
class UsesActivities:
    @workflow.entrypoint
    async def run(self, which: str) -> Any:
        if which == "options":
            return await mistral_style("v")
        if which == "beats":
            return await beats_in_a_thread(3)
        return await always_fails(which)


def test_activity_takes_mistrals_positional_options_and_defaults() -> None:
    options = mistral_style.options
    assert options.start_to_close_timeout == timedelta(seconds=30)
    assert (options.retry_policy.maximum_attempts, options.retry_policy.backoff_coefficient) == (5, 3.0)
    assert options.heartbeat_timeout == timedelta(seconds=7)
    defaults = always_fails.options
    assert defaults.start_to_close_timeout == timedelta(minutes=5)
    assert (defaults.retry_policy.maximum_attempts, defaults.retry_policy.backoff_coefficient) == (3, 2.0)
    assert workflows.activity("named")(lambda: None).name == "named"

    @workflows.activity
    def bare() -> None: ...
    assert (bare.name, bare.options.retry_policy.maximum_attempts) == ("bare", 3)


async def test_the_activity_options_reach_the_schedule_and_three_attempts_is_the_default() -> None:
    mem = InMemory([UsesActivities], [mistral_style, always_fails])
    await mem.start(UsesActivities, "options")
    [scheduled] = [e.payload for e in mem.history("root") if e.event_type is T.ACTIVITY_TASK_SCHEDULED]
    assert (scheduled.start_to_close_timeout_ms, scheduled.heartbeat_timeout_ms) == (30_000, 7_000)
    assert (scheduled.retry_policy.maximum_attempts, scheduled.retry_policy.backoff_coefficient) == (5, 3.0)
    ATTEMPTS.clear()
    mem = InMemory([UsesActivities], [always_fails])
    await mem.start(UsesActivities, "k")
    for _ in range(5):
        await mem.advance(10)
    state = mem.state("root")
    assert state.status is Status.FAILED and state.failure.type == "ActivityError"
    assert ATTEMPTS["k"] == 3


async def test_activity_heartbeat_is_sync_and_works_from_a_thread() -> None:
    mem = InMemory([UsesActivities], [beats_in_a_thread])
    sent: list[Any] = []
    original = mem.send

    async def spy(cmd: Any) -> None:
        sent.append(cmd.payload)
        await original(cmd)

    mem.send = spy  # type: ignore[method-assign]
    await mem.start(UsesActivities, "beats")
    beats = [p for p in sent if isinstance(p, m.RecordActivityHeartbeat)]
    assert [json.loads(b.details_json) for b in beats] == [[0, "of", 3], [1, "of", 3], [2, "of", 3]]
    assert mem.state("root").result_json == "3"


# ---------------------------------------------------------------- define, ids, policies, random


@workflow.define(name="child_of_mistral")
class MistralChild:
    @workflow.entrypoint
    async def run(self) -> str | None:
        return workflows.get_execution_id()


@workflow.define("described", "What it does", None, "A display name", True)
class Described:
    @workflow.entrypoint
    async def run(self) -> dict[str, Any]:
        handle = await workflow.execute_workflow(MistralChild, wait=False, execution_id="root.kid",
                                                 parent_close_policy=ParentClosePolicy.UNSPECIFIED)
        rng = workflow.random()
        assert isinstance(rng, random.Random)
        return {"me": workflows.get_execution_id(), "child": handle.id, "child_said": await handle,
                "draw": rng.randint(0, 10 ** 9)}


async def test_define_keeps_mistrals_arguments_and_the_helpers_work() -> None:
    definition = Described.__treeflow_workflow__
    assert (definition.description, definition.display_name) == ("What it does", "A display name")
    assert definition.metadata == {"is_technical": True}
    assert definition.execution_timeout == timedelta(hours=1)  # Mistral's default
    assert workflows.get_execution_id() is None
    mem = InMemory([Described, MistralChild], [])
    await mem.start(Described)
    result = json.loads(mem.state("root").result_json)
    assert (result["me"], result["child"], result["child_said"]) == ("root", "root.kid", "root.kid")
    [initiated] = [e.payload for e in mem.history("root") if e.event_type is T.START_CHILD_WORKFLOW_EXECUTION_INITIATED]
    assert initiated.parent_close_policy is ParentClosePolicy.ABANDON  # UNSPECIFIED with wait=False
    assert initiated.execution_timeout_ms == 3_600_000
    replays_cleanly(mem, Described)


@workflow.define(name="waits_for_word")
class WaitsForWord:
    def __init__(self) -> None:
        self.words: list[str] = []

    @workflow.signal
    def word(self, text: str, times: int = 1) -> None:
        self.words.extend([text] * times)

    @workflow.entrypoint
    async def run(self, count: int) -> list[str]:
        await workflow.wait_condition(lambda: len(self.words) >= count)
        return self.words


@workflow.define(name="signals_its_child")
class SignalsItsChild:
    @workflow.entrypoint
    async def run(self) -> dict[str, Any]:
        handle = await workflow.execute_workflow(WaitsForWord, 3, wait=False, execution_id="root.w")
        await handle.signal("word", text="hi", times=2)
        await handle.signal(WaitsForWord.word, "yo")
        words = await handle
        try:
            await handle.signal("word", "late")
        except workflows.ApplicationError as error:
            return {"words": words, "late": error.type}
        return {"words": words, "late": None}


async def test_a_child_handle_signals_the_child_and_learns_it_was_delivered() -> None:
    mem = InMemory([SignalsItsChild, WaitsForWord], [])
    await mem.start(SignalsItsChild)
    assert json.loads(mem.state("root").result_json) == {"words": ["hi", "hi", "yo"], "late": "SignalNotDelivered"}
    sent = [e.payload for e in mem.history("root") if e.event_type is T.EXTERNAL_WORKFLOW_EXECUTION_SIGNALED]
    assert [(p.target_workflow_exec_id, p.delivered) for p in sent] == [("root.w", True)] * 2 + [("root.w", False)]
    assert mem.types("root.w").count("WORKFLOW_EXECUTION_SIGNALED") == 2
    replays_cleanly(mem, SignalsItsChild)


# ---------------------------------------------------------------- custom tasks in workflow code


class Progress(BaseModel):
    done: int = 0
    label: str = "start"


@workflow.define(name="reports_progress")
class ReportsProgress:
    @workflow.entrypoint
    async def run(self) -> int:
        async with workflows.task("export", state={"done": 0}) as t:
            await note("step")
            await t.update_state({"done": 50})
            await t.set_state({"done": 100, "ok": True})
        async with workflows.task_from(Progress(), id="fixed") as p:
            await p.update_state({"label": "end"})
        try:
            async with workflows.task("doomed"):
                raise workflows.ApplicationError("broke")
        except workflows.ApplicationError:
            pass
        return 1


async def test_custom_tasks_in_workflow_code_are_recorded_and_replayed() -> None:
    mem = InMemory([ReportsProgress], [note])
    await mem.start(ReportsProgress)
    assert mem.state("root").status is Status.COMPLETED
    tasks = [e for e in mem.history("root") if e.event_type.value.startswith("CUSTOM_TASK_")]
    assert [(e.event_type.value, e.payload.custom_task_type) for e in tasks] == [
        ("CUSTOM_TASK_STARTED", "export"), ("CUSTOM_TASK_IN_PROGRESS", "export"),
        ("CUSTOM_TASK_IN_PROGRESS", "export"), ("CUSTOM_TASK_COMPLETED", "export"),
        ("CUSTOM_TASK_STARTED", "Progress"), ("CUSTOM_TASK_IN_PROGRESS", "Progress"),
        ("CUSTOM_TASK_COMPLETED", "Progress"), ("CUSTOM_TASK_STARTED", "doomed"), ("CUSTOM_TASK_FAILED", "doomed")]
    assert all(e.payload.activity_id is None for e in tasks)
    assert json.loads(tasks[0].payload.payload.value_json) == {"done": 0}
    assert json.loads(tasks[1].payload.payload.value_json) == [{"op": "replace", "path": "/done", "value": 50}]
    assert json.loads(tasks[2].payload.payload.value_json) == [
        {"op": "replace", "path": "/done", "value": 100}, {"op": "add", "path": "/ok", "value": True}]
    assert json.loads(tasks[3].payload.payload.value_json) == {"done": 100, "ok": True}
    assert tasks[4].payload.custom_task_id == "fixed"
    assert tasks[8].payload.failure.message == "broke"
    replays_cleanly(mem, ReportsProgress)


# ---------------------------------------------------------------- a plain exception fails the task

BUGGY = {"on": True}


@workflow.define(name="buggy")
class Buggy:
    @workflow.entrypoint
    async def run(self) -> str:
        await note("before")
        if BUGGY["on"]:
            {}["missing"]  # a bug: KeyError
        return "fixed"


async def test_a_plain_exception_fails_the_workflow_task_which_is_retried_until_the_code_is_fixed() -> None:
    BUGGY["on"] = True
    mem = InMemory([Buggy], [note])
    await mem.start(Buggy)
    state = mem.state("root")
    assert state.open
    [failed] = [e.payload for e in mem.history("root") if e.event_type is T.WORKFLOW_TASK_FAILED]
    assert (failed.cause, failed.failure.type) == ("WORKFLOW_CODE_ERROR", "KeyError")
    BUGGY["on"] = False  # the fix is deployed
    await mem.advance(2)
    state = mem.state("root")
    assert state.status is Status.COMPLETED and state.result_json == '"fixed"'
    assert SEEN == ["before"]  # the activity did not run again
