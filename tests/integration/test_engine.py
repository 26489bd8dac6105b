"""The engine end to end on the real (embedded) broker: processor, in-process worker, client."""

import asyncio
from datetime import timedelta

import pytest
import pytest_asyncio
from pydantic import BaseModel

import treeflow as workflows
from treeflow import workflow
from treeflow.activities import activity
from treeflow.core import Status
from treeflow.examples import child_workflows as seed
from treeflow.schemas import EventType
from treeflow.testing import Environment

pytestmark = pytest.mark.integration


@activity()
async def report_progress(steps: int) -> int:
    async with activity.custom_task("crunch", type="compute") as task:
        for step in range(steps):
            await task.progress({"step": step})
        await task.progress_patch([{"op": "replace", "path": "/step", "value": steps}])
        task.complete({"steps": steps})
    return steps


class Order(BaseModel):
    order_id: str
    quantity: int


@workflow.define(name="with_progress")
class WithProgress:
    @workflow.entrypoint
    async def run(self, steps: int) -> int:
        return await report_progress(steps)


@workflow.define(name="slow")
class Slow:
    @workflow.entrypoint
    async def run(self, order: Order) -> str:
        await asyncio.sleep(60)
        return order.order_id


@workflow.define(name="broken", failure_exception_types=[ValueError])
class Broken:
    @workflow.entrypoint
    async def run(self) -> None:
        raise ValueError("the order book is closed")


@pytest_asyncio.fixture(scope="module")
async def env(broker):
    async with Environment(workflows=[seed.ParentWorkflow, seed.ChildWorkflow, WithProgress, Slow, Broken],
                           activities=[seed.process_item, report_progress],
                           bootstrap_servers=broker.bootstrap_servers, profile=broker.profile) as environment:
        yield environment


async def test_the_seed_runs_through_the_top_level_execute_workflow(env: Environment) -> None:
    result = await workflows.execute_workflow(seed.ParentWorkflow, params=seed.ParentInput(data="hello"))
    assert result == "Parent got: processed:hello"


async def test_a_handle_gives_result_describe_and_history(env: Environment) -> None:
    handle = await workflows.execute_workflow(seed.ParentWorkflow, params=seed.ParentInput(data="h"),
                                              execution_id="handle-1", wait=False)
    assert handle.execution_id == "handle-1"
    assert await handle == "Parent got: processed:h"
    description = await handle.describe()
    assert (description.status, description.parent_execution_id, description.root_execution_id) == (
        Status.COMPLETED, None, "handle-1")
    history = await handle.history()
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    assert history[-1].event_type is EventType.WORKFLOW_EXECUTION_COMPLETED
    [child] = {e.payload.child_workflow_exec_id for e in history
               if e.event_type is EventType.CHILD_WORKFLOW_EXECUTION_STARTED}
    child_history = await env.client.history(child, root_execution_id="handle-1")
    assert {(e.workflow_context.parent_workflow_exec_id, e.workflow_context.root_workflow_exec_id)
            for e in child_history} == {("handle-1", "handle-1")}


async def test_a_failed_workflow_raises_its_cause_at_the_client(env: Environment) -> None:
    with pytest.raises(workflows.WorkflowFailureError) as caught:
        await env.client.execute_workflow(Broken)
    assert caught.value.status == "FAILED"
    assert caught.value.cause.type == "ValueError"
    assert caught.value.cause.message == "the order book is closed"


async def test_an_execution_id_given_twice_while_running_is_an_error(env: Environment) -> None:
    await env.client.start_workflow(Slow, Order(order_id="o-1", quantity=1), execution_id="twice")
    with pytest.raises(workflows.WorkflowAlreadyStartedError, match="twice is already running"):
        await env.client.start_workflow(Slow, Order(order_id="o-1", quantity=1), execution_id="twice")
    await env.client.get_handle("twice").terminate("test over")


async def test_params_that_fail_validation_are_refused_before_anything_is_sent(env: Environment) -> None:
    with pytest.raises(workflows.ApplicationError, match="payload does not fit Order"):
        await env.client.start_workflow(Slow, {"order_id": "o-2", "quantity": "many"})


async def test_the_execution_timeout_closes_the_run_as_timed_out(env: Environment) -> None:
    handle = await env.client.start_workflow(Slow, Order(order_id="o-3", quantity=1),
                                             execution_timeout=timedelta(milliseconds=300))
    with pytest.raises(workflows.WorkflowFailureError) as caught:
        await handle.result(timeout=10)
    assert caught.value.status == "TIMED_OUT"
    types = [e.event_type for e in await handle.history()]
    assert types[-1] is EventType.WORKFLOW_EXECUTION_TIMED_OUT
    assert EventType.TIMER_STARTED in types and EventType.TIMER_FIRED not in types


async def test_custom_task_events_are_in_the_history(env: Environment) -> None:
    handle = await env.client.start_workflow(WithProgress, 2)
    assert await handle == 2
    custom = [e for e in await handle.history() if e.event_type.value.startswith("CUSTOM_TASK_")]
    assert [e.event_type.value for e in custom] == [
        "CUSTOM_TASK_STARTED", "CUSTOM_TASK_IN_PROGRESS", "CUSTOM_TASK_IN_PROGRESS", "CUSTOM_TASK_IN_PROGRESS",
        "CUSTOM_TASK_COMPLETED"]
    assert custom[1].payload.payload.value_json == '{"step":0}'
    assert custom[3].payload.payload.kind.value == "JSON_PATCH"
    assert custom[4].payload.payload.value_json == '{"steps":2}'
    assert {e.payload.custom_task_id for e in custom} == {"crunch"}
    assert {e.attempt for e in custom} == {1}
