"""Updates (validator on the worker, durable ACCEPTED/COMPLETED events, the caller's reply)
and versioning (patched / deprecate_patch markers, the Replayer), without a broker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import treeflow as workflows
from treeflow import workflow
from treeflow.core import Status
from treeflow.errors import NonDeterminismError
from treeflow.payloads import to_json
from treeflow.schemas import EventType, Reply
from treeflow.schemas import models as m
from treeflow.testing import Replayer
from tests.inmemory import InMemory

T = EventType
RAN: list[str] = []


@pytest.fixture(autouse=True)
def reset() -> None:
    RAN.clear()


async def send(mem: InMemory, exec_id: str, payload: Any) -> Reply:
    cmd = mem.command(exec_id, payload)
    mem.queue.append(cmd)
    await mem.drain()
    [reply] = [r for r in mem.replies if r.command_id == cmd.command_id]
    return reply


async def update(mem: InMemory, name: str, payload: Any = None, exec_id: str = "root") -> Reply:
    return await send(mem, exec_id, m.UpdateWorkflowExecution(
        update_name=name, input_json=None if payload is None else to_json(payload)))


@workflows.activity()
async def price_of(item: str) -> int:
    RAN.append(item)
    return len(item)


@workflow.define(name="cart")
class Cart:
    def __init__(self) -> None:
        self.total = 0
        self.items: list[str] = []
        self.closed = False

    @workflow.update(name="add_item")
    async def add_item(self, item: str, qty: int = 1) -> int:
        self.total += qty * await price_of(item)
        self.items.append(item)
        return self.total

    @add_item.validator
    def check_item(self, item: str, qty: int = 1) -> None:
        if qty < 1:
            raise ValueError("qty must be positive")
        if self.closed:
            raise ValueError("the cart is closed")

    @workflow.update
    def explode(self) -> None:
        raise workflows.ApplicationError("no such thing", type="Nope")

    @workflow.signal
    def close(self) -> None:
        self.closed = True

    @workflow.entrypoint
    async def run(self) -> list[str]:
        await workflow.wait_condition(lambda: self.closed)
        return self.items


async def test_an_update_runs_its_handler_and_answers_with_the_result() -> None:
    mem = InMemory([Cart], [price_of])
    await mem.start(Cart)
    reply = await update(mem, "add_item", {"item": "apple", "qty": 2})
    assert (reply.accepted, reply.result_json) == (True, "10")
    reply = await update(mem, "add_item", "fig")  # the raw form: the first parameter
    assert reply.result_json == "13"
    types = mem.types("root")
    assert types.count("WORKFLOW_EXECUTION_UPDATE_ACCEPTED") == 2 and types.count("ACTIVITY_TASK_COMPLETED") == 2
    [first, _] = [e.payload for e in mem.history("root") if e.event_type is T.WORKFLOW_EXECUTION_UPDATE_COMPLETED]
    assert (first.update_name, first.result_json, first.failure) == ("add_item", "10", None)
    await send(mem, "root", m.SignalWorkflowExecution(signal_name="close"))
    assert mem.state("root").result_json == '["apple","fig"]'
    assert Replayer(workflows=[Cart]).replay(mem.history("root"))[0].ok


async def test_a_rejected_update_records_nothing() -> None:
    mem = InMemory([Cart], [price_of])
    await mem.start(Cart)
    before = mem.types("root")
    for payload, expected in [({"item": "apple", "qty": 0}, "qty must be positive"),
                              ({"qty": 2}, "missing parameter(s) item")]:
        reply = await update(mem, "add_item", payload)
        assert (reply.accepted, reply.error.type) == (False, "UpdateRejected")
        assert expected in reply.error.message
    reply = await update(mem, "no_such_update")
    assert (reply.accepted, reply.error.type) == (False, "UpdateNotFound")
    assert mem.types("root") == before and RAN == []


async def test_a_failing_handler_fails_the_update_not_the_workflow() -> None:
    mem = InMemory([Cart], [price_of])
    await mem.start(Cart)
    reply = await update(mem, "explode")
    assert (reply.accepted, reply.error.type, reply.error.cause.type) == (False, "UpdateFailed", "Nope")
    assert mem.state("root").open
    assert (await update(mem, "add_item", "kiwi")).result_json == "4"


async def test_an_update_of_a_closed_or_unknown_execution_is_refused() -> None:
    mem = InMemory([Cart], [price_of])
    await mem.start(Cart)
    await send(mem, "root", m.SignalWorkflowExecution(signal_name="close"))
    assert (await update(mem, "add_item", "x")).error.type == "WorkflowClosed"
    assert (await update(mem, "add_item", "x", exec_id="nobody")).error.type == "WorkflowNotFound"


async def test_an_update_accepted_twice_is_recorded_once() -> None:
    mem = InMemory([Cart], [price_of])
    await mem.start(Cart)
    run_id = mem.state("root").context.workflow_run_id
    accept = m.AcceptWorkflowUpdate(update_id="u-1", workflow_run_id=run_id, update_name="add_item",
                                    input_json='"plum"')
    await send_quiet(mem, accept)
    await send_quiet(mem, accept)
    assert mem.types("root").count("WORKFLOW_EXECUTION_UPDATE_ACCEPTED") == 1
    assert mem.types("root").count("WORKFLOW_EXECUTION_UPDATE_COMPLETED") == 1


async def send_quiet(mem: InMemory, payload: Any) -> None:
    mem.queue.append(mem.command("root", payload))
    await mem.drain()


# ---------------------------------------------------------------- versioning


def order_v1() -> type:
    @workflow.define(name="order")
    class Order:
        @workflow.entrypoint
        async def run(self) -> str:
            await price_of("charge")
            return "done"
    return Order


def order_v2() -> type:
    @workflow.define(name="order")
    class Order:
        @workflow.entrypoint
        async def run(self) -> str:
            await price_of("charge")
            if workflow.patched("receipt"):
                await price_of("receipt")
            return "done"
    return Order


def order_v3() -> type:
    @workflow.define(name="order")
    class Order:
        @workflow.entrypoint
        async def run(self) -> str:
            await price_of("charge")
            workflow.deprecate_patch("receipt")
            await price_of("receipt")
            return "done"
    return Order


def order_unguarded() -> type:
    @workflow.define(name="order")
    class Order:
        @workflow.entrypoint
        async def run(self) -> str:
            await price_of("charge")
            await price_of("receipt")  # changed without a patch
            return "done"
    return Order


async def history_of(workflow_cls: type) -> list[Any]:
    mem = InMemory([workflow_cls], [price_of])
    await mem.start(workflow_cls)
    assert mem.state("root").status is Status.COMPLETED
    return mem.history("root")


async def test_patched_takes_the_new_branch_for_new_executions_and_records_a_marker() -> None:
    history = await history_of(order_v2())
    assert RAN == ["charge", "receipt"]
    [marker] = [e.payload for e in history if e.event_type is T.MARKER_RECORDED]
    assert (marker.marker_name, marker.marker_id, marker.deprecated) == ("version", "receipt", False)


async def test_patched_code_replays_histories_of_the_old_code_and_of_its_own() -> None:
    old, new = await history_of(order_v1()), await history_of(order_v2())
    assert Replayer(workflows=[order_v2()]).replay(old)[0].ok
    assert Replayer(workflows=[order_v2()]).replay(new)[0].ok
    deprecated = await history_of(order_v3())
    for history in (new, deprecated):  # deprecate_patch replays both (the old branch is gone)
        assert Replayer(workflows=[order_v3()]).replay(history)[0].ok


async def test_an_old_execution_reaching_the_patch_after_the_deploy_takes_the_new_branch() -> None:
    # Temporal's rule: the old code never got to the patch, so deciding anew there is deterministic.
    mem = InMemory([order_v1()], [price_of])
    mem.hold_activities = True
    await mem.start(mem.runner.workflows["order"].cls)
    mem.runner = type(mem.runner)({"order": order_v2().__treeflow_workflow__}, {"price_of": price_of},
                                  clock=lambda: mem.now)  # the new code is deployed mid-run
    await mem.release()
    await mem.release()
    assert mem.state("root").status is Status.COMPLETED
    assert RAN == ["charge", "receipt"] and "MARKER_RECORDED" in mem.types("root")
    assert mem.runner.replays == 1  # replayed once from history, with no non-determinism


async def test_the_replayer_names_the_first_mismatch(tmp_path: Path) -> None:
    old = await history_of(order_v1())
    results = Replayer(workflows=[order_unguarded()]).replay(old, raise_on_failure=False)
    assert not results[0].ok
    assert "WORKFLOW_EXECUTION_COMPLETED" in results[0].error and "ScheduleActivityTask" in results[0].error
    with pytest.raises(NonDeterminismError, match="MISMATCH  root run"):
        Replayer(workflows=[order_unguarded()]).replay(old)
    # From a file, as `treeflow history ID --json` prints it.
    path = tmp_path / "order.jsonl"
    path.write_text("".join(event.model_dump_json() + "\n" for event in old))
    assert Replayer(workflows=[order_v2()]).replay(path)[0].ok
    assert not Replayer(workflows=[order_unguarded()]).replay(path, raise_on_failure=False)[0].ok
    unknown = Replayer(workflows=[]).replay(path, raise_on_failure=False)[0]
    assert "no workflow named 'order'" in unknown.error


def test_history_files_round_trip_every_event_field() -> None:
    from treeflow.replay import read_history

    event = m.Event.model_validate_json(json.dumps({
        "event_id": "c:0", "event_type": "MARKER_RECORDED", "timestamp": "2026-01-01T00:00:00Z", "sequence": 3,
        "workflow_context": {"workflow_exec_id": "x", "workflow_run_id": "r", "workflow_name": "order",
                             "parent_workflow_exec_id": None, "root_workflow_exec_id": "x", "task_queue": "q"},
        "payload": {"marker_name": "version", "marker_id": "p"}}))
    assert isinstance(event.payload, m.MarkerRecorded)
    assert read_history  # used above through Replayer.replay(path)
