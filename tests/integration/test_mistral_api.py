"""Mistral's Workflows API on treeflow, driven by Mistral's own client (`mistralai`), unchanged,
against a real engine: workflows, executions, signals, queries, updates, cancel, terminate,
batches, event streams (one execution, a tree, every tree) and event lists; `treeflow dev
--http-port` as a user runs it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from mistralai.client import Mistral, errors

from treeflow.consumers.gateway import GatewayServer, create_app
from treeflow.consumers.mistral.shapes import mistral_type
from treeflow.kafka.profile import PROFILE_ENV
from treeflow.kafka.settings import BOOTSTRAP_ENV, PREFIX_ENV
from treeflow.testing import Environment
from tests import mistral_program
from tests.integration import tree_app
from tests.integration.tree_app import logged_tree

pytestmark = pytest.mark.integration

PROGRAM = Path(mistral_program.__file__)


@pytest_asyncio.fixture(scope="module")
async def env(broker) -> AsyncIterator[Environment]:
    async with Environment(workflows=[mistral_program.OrderWorkflow, *tree_app.WORKFLOWS],
                           activities=[mistral_program.quote, mistral_program.pack, *tree_app.ACTIVITIES],
                           bootstrap_servers=broker.bootstrap_servers, profile=broker.profile) as environment:
        yield environment


@pytest_asyncio.fixture(scope="module")
async def mistral(env: Environment) -> AsyncIterator[Mistral]:
    server = GatewayServer(create_app(env.settings, visibility_url=env.visibility_url, workflows=env.workflows),
                           port=0)
    await server.start()
    async with Mistral(server_url=server.url, api_key="unused", timeout_ms=60_000) as client:
        yield client
    await server.stop()


async def collect(stream: Any, *, until: Any = None, limit: int | None = None) -> list[Any]:
    """Frames of an SSE stream of the client until it ends, `until(frame)` holds or `limit` frames came."""
    frames: list[Any] = []
    async with asyncio.timeout(30):
        async for frame in stream:
            frames.append(frame)
            if (until is not None and until(frame)) or (limit is not None and len(frames) == limit):
                break
    await stream.close()
    return frames


def order_input(name: str, max_items: int = 10) -> dict[str, Any]:
    return {"customer": {"name": name}, "max_items": max_items}


async def test_a_mistral_client_runs_an_execution_from_start_to_result(mistral: Mistral, env: Environment) -> None:
    workflows = mistral.workflows
    listed = await workflows.get_workflows_async()
    assert listed is not None
    by_name = {w.name: w for w in listed.result.workflows}
    assert by_name["order_workflow"].display_name == "Order"
    assert by_name["order_workflow"].description == "Takes an order"
    assert {"tree_root", "tree_child"} <= set(by_name)

    exec_id = f"order-{uuid.uuid4().hex[:8]}"
    started = await workflows.execute_workflow_async(workflow_identifier="order_workflow",
                                                     input=order_input("Ada"), execution_id=exec_id)
    assert started.execution_id == exec_id and started.status == "RUNNING"
    assert started.root_execution_id == exec_id and started.workflow_name == "order_workflow"

    executions = workflows.executions
    signalled = await executions.signal_workflow_execution_async(execution_id=exec_id, name="add_item",
                                                                 input={"item": "apple", "qty": 2})
    assert signalled.message == "Signal accepted"
    await executions.signal_workflow_execution_async(execution_id=exec_id, name="add_item", input={"item": "fig"})
    basket = await executions.query_workflow_execution_async(execution_id=exec_id, name="basket", input={})
    assert basket.query_name == "basket" and basket.result == {"apple": 2, "fig": 1}
    only = await executions.query_workflow_execution_async(execution_id=exec_id, name="basket",
                                                           input={"only": "fig"})
    assert only.result == {"fig": 1}
    priced = await executions.update_workflow_execution_async(execution_id=exec_id, name="price",
                                                              input={"item": "apple", "qty": 2})
    assert priced.update_name == "price" and priced.result == 10
    with pytest.raises(errors.HTTPValidationError) as rejected:  # the validator refuses: 422, nothing recorded
        await executions.update_workflow_execution_async(execution_id=exec_id, name="price",
                                                         input={"item": "apple", "qty": 500})
    assert "at most 100" in rejected.value.data.detail[0].msg
    with pytest.raises(errors.SDKError) as no_query:
        await executions.query_workflow_execution_async(execution_id=exec_id, name="nothing", input={})
    assert no_query.value.status_code == 404

    stream = await executions.stream_async(execution_id=exec_id)
    await executions.signal_workflow_execution_async(execution_id=exec_id, name="checkout", input={})
    frames = await collect(stream)  # the execution's stream ends after its closing event
    events = [f.data.data for f in frames]
    types = [e.event_type for e in events]
    assert types[0] == "WORKFLOW_EXECUTION_STARTED" and types[-1] == "WORKFLOW_EXECUTION_COMPLETED"
    assert {"CUSTOM_TASK_STARTED", "CUSTOM_TASK_IN_PROGRESS", "CUSTOM_TASK_COMPLETED", "ACTIVITY_TASK_STARTED",
            "ACTIVITY_TASK_COMPLETED"} <= set(types)
    assert events[0].attributes.input.value == order_input("Ada")
    assert {f.data.stream for f in frames if f.data.data.event_type.startswith("CUSTOM_TASK")} == {"order", "packing"}
    sequences = [f.data.broker_sequence for f in frames]
    assert sequences == sorted(set(sequences)) and [f.id for f in frames] == [str(s) for s in sequences]
    assert {f.data.workflow_context.workflow_exec_id for f in frames} == {exec_id}
    activity_started = next(e for e in events if e.event_type == "ACTIVITY_TASK_STARTED")
    assert activity_started.attributes.input.value  # the input scheduled with the activity

    done = await executions.get_workflow_execution_async(execution_id=exec_id)
    assert done.status == "COMPLETED" and done.end_time is not None and done.parent_execution_id is None
    assert done.result == {"customer": "Ada", "packed": "apple,fig", "total": 10, "execution_id": exec_id}
    history = await executions.get_workflow_execution_history_async(execution_id=exec_id)
    recorded = [e["event_type"] for e in history["events"]]
    assert recorded.count("WORKFLOW_EXECUTION_SIGNALED") == 3 and "WORKFLOW_EXECUTION_UPDATE_COMPLETED" in recorded
    assert history["events"][0]["payload"]["input"] == order_input("Ada")  # decode_payloads: values, not JSON text

    # The same events, listed page by page.
    listed_events, cursor = [], None
    for _ in range(20):
        page = await workflows.events.get_workflow_events_async(workflow_exec_id=exec_id, limit=4, cursor=cursor)
        listed_events += page.events
        cursor = page.next_cursor
        if not cursor:
            break
    assert [e.event_id for e in listed_events] == [e.event_id for e in events]

    # Synchronous execution: the result in the answer.
    sync = await workflows.execute_workflow_async(workflow_identifier="tree_root", wait_for_result=True,
                                                  timeout_seconds=30, input={"value": "w", "straggler_seconds": 0})
    assert sync.result == "root(child(leaf:w))"


async def test_bad_requests_get_mistral_error_shapes(mistral: Mistral, env: Environment) -> None:
    workflows = mistral.workflows
    with pytest.raises(errors.SDKError) as unknown:
        await workflows.executions.get_workflow_execution_async(execution_id="nobody-here")
    assert unknown.value.status_code == 404 and "not found" in unknown.value.body
    with pytest.raises(errors.SDKError) as unregistered:
        await workflows.execute_workflow_async(workflow_identifier="no_such_workflow", input={})
    assert unregistered.value.status_code == 404 and "order_workflow" in unregistered.value.body
    with pytest.raises(errors.HTTPValidationError) as unfit:
        await workflows.execute_workflow_async(workflow_identifier="order_workflow", input={"max_items": 2})
    assert "customer" in unfit.value.data.detail[0].msg
    with pytest.raises(errors.HTTPValidationError) as no_input:
        await workflows.execute_workflow_async(workflow_identifier="order_workflow")
    assert "missing parameter(s) customer" in no_input.value.data.detail[0].msg
    exec_id = f"twice-{uuid.uuid4().hex[:8]}"
    await workflows.execute_workflow_async(workflow_identifier="order_workflow", input=order_input("B"),
                                           execution_id=exec_id)
    with pytest.raises(errors.SDKError) as twice:
        await workflows.execute_workflow_async(workflow_identifier="order_workflow", input=order_input("B"),
                                               execution_id=exec_id)
    assert twice.value.status_code == 409
    await workflows.executions.terminate_workflow_execution_async(execution_id=exec_id)
    with pytest.raises(errors.SDKError) as closed:
        await workflows.executions.signal_workflow_execution_async(execution_id=exec_id, name="checkout", input={})
    assert closed.value.status_code == 409

    async with httpx.AsyncClient(base_url=mistral.sdk_configuration.server_url, timeout=20) as raw:
        bad_json = await raw.post(f"/v1/workflows/executions/{exec_id}/signals", content=b"{nope")
        assert bad_json.status_code == 422 and bad_json.json()["detail"][0]["type"] == "json_invalid"
        no_name = await raw.post(f"/v1/workflows/executions/{exec_id}/signals", json={"input": {}})
        assert no_name.status_code == 422 and no_name.json()["detail"][0]["loc"] == ["body", "name"]
        bad_seq = await raw.get("/v1/workflows/events/stream", params={"root_workflow_exec_id": exec_id,
                                                                        "start_seq": "soon"})
        assert bad_seq.status_code == 422 and bad_seq.json()["detail"][0]["loc"] == ["query", "start_seq"]
        bad_type = await raw.get("/v1/workflows/events/stream", params={"root_workflow_exec_id": exec_id,
                                                                         "workflow_event_types": "TIMER_FIRED"})
        assert bad_type.status_code == 422 and "TIMER_FIRED" in bad_type.json()["detail"][0]["msg"]
        resume_all = await raw.get("/v1/workflows/events/stream", params={"start_seq": 5})
        assert resume_all.status_code == 400 and "live" in resume_all.json()["detail"]
        no_tree = await raw.get("/v1/workflows/events/list")
        assert no_tree.status_code == 400


async def test_cancel_terminate_and_their_batches(mistral: Mistral, env: Environment) -> None:
    workflows, executions = mistral.workflows, mistral.workflows.executions
    ids = [f"batch-{n}-{uuid.uuid4().hex[:6]}" for n in range(4)]
    for exec_id in ids:
        await workflows.execute_workflow_async(workflow_identifier="order_workflow", input=order_input(exec_id),
                                               execution_id=exec_id)
    await executions.cancel_workflow_execution_async(execution_id=ids[0])
    terminated = await executions.batch_terminate_workflow_executions_async(execution_ids=[ids[1], ids[2], "ghost"])
    assert terminated.results is not None
    assert {i: r.status for i, r in terminated.results.items()} == {ids[1]: "success", ids[2]: "success",
                                                                    "ghost": "failure"}
    assert "not found" in (terminated.results["ghost"].error or "")
    canceled = await executions.batch_cancel_workflow_executions_async(execution_ids=[ids[3]])
    assert canceled.results is not None and canceled.results[ids[3]].status == "success"
    for exec_id, status in zip(ids, ["CANCELED", "TERMINATED", "TERMINATED", "CANCELED"]):
        async with asyncio.timeout(20):
            while (found := await executions.get_workflow_execution_async(execution_id=exec_id)).status == "RUNNING":
                await asyncio.sleep(0.2)
        assert found.status == status, exec_id


async def test_consuming_events_from_a_workflow_tree_and_resuming_from_broker_sequence(
        mistral: Mistral, env: Environment) -> None:
    """Mistral's pattern: one stream of a parent and every descendant, by root_workflow_exec_id."""
    root = f"tree-{uuid.uuid4().hex[:8]}"
    await mistral.workflows.execute_workflow_async(workflow_identifier="tree_root", execution_id=root,
                                                   input={"value": "t", "straggler_seconds": 0.5})
    truth = [item for item in await _closed_tree(env, root)]
    shown = [(item.event, item.partition, item.offset) for item in truth if mistral_type(item.event.event_type)]

    events = mistral.workflows.events
    stream = await events.get_stream_events_async(root_workflow_exec_id=root)
    frames = await collect(stream, limit=len(shown))
    assert [f.data.data.event_id for f in frames] == [e.event_id for e, _, _ in shown]
    for frame, (event, _, _) in zip(frames, shown):
        context = frame.data.workflow_context
        assert context.root_workflow_exec_id == root
        assert context.parent_workflow_exec_id == event.workflow_context.parent_workflow_exec_id
        assert frame.data.data.parent_workflow_exec_id == event.workflow_context.parent_workflow_exec_id
    top = frames[0].data.workflow_context
    assert top.workflow_exec_id == root and top.parent_workflow_exec_id is None
    assert {f.data.workflow_context.workflow_name for f in frames} == {"tree_root", "tree_child", "tree_grandchild",
                                                                       "tree_straggler"}
    sequences = [f.data.broker_sequence for f in frames]
    assert sequences == sorted(set(sequences))

    # Resume from where a dropped connection left off: start_seq = last broker_sequence + 1 (inclusive) ...
    k = len(frames) // 2
    resumed = await collect(await events.get_stream_events_async(root_workflow_exec_id=root,
                                                                 start_seq=sequences[k] + 1),
                            limit=len(frames) - k - 1)
    assert [f.data.broker_sequence for f in resumed] == sequences[k + 1:]
    # ... or Last-Event-ID (exclusive), as an EventSource reconnects.
    again = await collect(await events.get_stream_events_async(root_workflow_exec_id=root,
                                                               last_event_id=frames[k].id),
                          limit=len(frames) - k - 1)
    assert [f.id for f in again] == [f.id for f in frames[k + 1:]]

    # Filters: one execution of the tree, its type and the scope.
    child = next(f.data.workflow_context.workflow_exec_id for f in frames
                 if f.data.workflow_context.workflow_name == "tree_child")
    mine = [f for f in frames if f.data.workflow_context.workflow_exec_id == child]
    only_child = await collect(await events.get_stream_events_async(workflow_exec_id=child), limit=len(mine))
    assert [f.id for f in only_child] == [f.id for f in mine]
    closes = await collect(await events.get_stream_events_async(
        root_workflow_exec_id=root, workflow_event_types=["WORKFLOW_EXECUTION_COMPLETED"]), limit=4)
    assert {f.data.workflow_context.workflow_name for f in closes} == {"tree_root", "tree_child", "tree_grandchild",
                                                                       "tree_straggler"}
    activities = [f for f in frames if f.data.data.event_type.startswith("ACTIVITY_TASK")]
    scoped = await collect(await events.get_stream_events_async(root_workflow_exec_id=root, scope="activity",
                                                                activity_name="leaf_step"), limit=len(activities))
    assert [f.id for f in scoped] == [f.id for f in activities]


async def test_a_stream_of_every_tree_starts_live(mistral: Mistral, env: Environment) -> None:
    stream = await mistral.workflows.events.get_stream_events_async(
        workflow_name="tree_grandchild", workflow_event_types=["WORKFLOW_EXECUTION_COMPLETED"])
    root = f"live-{uuid.uuid4().hex[:8]}"
    await mistral.workflows.execute_workflow_async(workflow_identifier="tree_root", execution_id=root,
                                                   input={"value": "l", "straggler_seconds": 0})
    frames = await collect(stream, until=lambda f: f.data.workflow_context.root_workflow_exec_id == root)
    assert frames[-1].data.data.event_type == "WORKFLOW_EXECUTION_COMPLETED"
    assert {f.data.workflow_context.workflow_name for f in frames} == {"tree_grandchild"}


async def test_treeflow_dev_serves_the_api_and_prints_its_url(broker) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TREEFLOW_")}
    environ.update({BOOTSTRAP_ENV: broker.bootstrap_servers, PROFILE_ENV: broker.profile.name,
                    PREFIX_ENV: f"dev{uuid.uuid4().hex[:8]}"})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "treeflow.cli", "dev", str(PROGRAM), "--serve", "--http-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environ)
    try:
        assert process.stdout is not None
        url = None
        async with asyncio.timeout(60):
            while url is None:
                line = (await process.stdout.readline()).decode()
                assert line, (await process.stderr.read()).decode()  # type: ignore[union-attr]
                if "HTTP API on " in line:
                    url = line.split("HTTP API on ")[1].split()[0]
        async with Mistral(server_url=url, api_key="unused") as client:
            listed = await client.workflows.get_workflows_async()
            assert listed is not None and [w.name for w in listed.result.workflows] == ["order_workflow"]
            exec_id = f"dev-{uuid.uuid4().hex[:6]}"
            await client.workflows.execute_workflow_async(workflow_identifier="order_workflow", execution_id=exec_id,
                                                          input=order_input("Dev", max_items=1))
            await client.workflows.executions.signal_workflow_execution_async(
                execution_id=exec_id, name="add_item", input={"item": "pear"})
            async with asyncio.timeout(30):
                while (found := await client.workflows.executions.get_workflow_execution_async(
                        execution_id=exec_id)).status == "RUNNING":
                    await asyncio.sleep(0.2)
            assert found.status == "COMPLETED" and found.result["packed"] == "pear"
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0


async def _closed_tree(env: Environment, root: str) -> list[Any]:
    """The tree's events once every execution of it closed (the straggler is the last)."""
    async with asyncio.timeout(30):
        while True:
            items = await logged_tree(env.settings, root)
            opened = {i.event.workflow_context.workflow_exec_id for i in items
                      if i.event.event_type.value == "WORKFLOW_EXECUTION_STARTED"}
            closed = {i.event.workflow_context.workflow_exec_id for i in items
                      if i.event.event_type.value == "WORKFLOW_EXECUTION_COMPLETED"}
            if opened and opened == closed:
                return items
            await asyncio.sleep(0.2)
