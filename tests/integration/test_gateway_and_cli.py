"""The SSE gateway served by Uvicorn on a real port, read by a real HTTP client while the engine runs;
`treeflow tail` and `treeflow serve` as a user runs them."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid

import httpx
import pytest
import pytest_asyncio
from httpx_sse import ServerSentEvent, aconnect_sse

from treeflow.consumers.gateway import GatewayOptions, GatewayServer, create_app
from treeflow.testing import Environment
from tests.integration import tree_app
from tests.integration.tree_app import logged_tree

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module")
async def gateway(tree_env: Environment):
    # treeflow's own frames (the tests of Mistral's are in test_mistral_api.py).
    server = GatewayServer(create_app(tree_env.settings, options=GatewayOptions(frames="treeflow")), port=0)
    await server.start()
    yield server.url
    await server.stop()


async def read_frames(client: httpx.AsyncClient, url: str, *, headers: dict[str, str] | None = None,
                      limit: int | None = None) -> list[ServerSentEvent]:
    """Frames until the stream ends (or `limit` event frames, then the connection is dropped)."""
    frames: list[ServerSentEvent] = []
    async with asyncio.timeout(20), aconnect_sse(client, "GET", url, headers=dict(headers or {})) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for frame in source.aiter_sse():
            frames.append(frame)
            if limit is not None and sum(f.event not in ("end", "error") for f in frames) == limit:
                break
    return frames


async def test_a_live_tree_streams_over_http_and_resumes_after_a_dropped_connection(
        tree_env: Environment, gateway: str) -> None:
    root = f"sse-{uuid.uuid4().hex[:8]}"
    await tree_env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value="s", straggler_seconds=1.0),
                                    execution_id=root)
    url = f"{gateway}/v1/workflows/events/stream?root_workflow_exec_id={root}&until_closed=true"
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as client:
        before = await read_frames(client, url, limit=6)  # then the connection drops
        after = await read_frames(client, url, headers={"Last-Event-ID": before[-1].id})

    truth = [item.event for item in await logged_tree(tree_env.settings, root)]
    frames = before + after
    assert [f.event for f in frames][-1] == "end"
    events = [f for f in frames if f.event != "end"]
    assert [json.loads(f.data)["event_id"] for f in events] == [e.event_id for e in truth]  # nothing lost or repeated
    assert [f.event for f in events] == [e.event_type.value for e in truth]
    assert [f.id for f in events] == [json.loads(f.data)["cursor"] for f in events]
    assert [int(f.id) for f in events] == sorted(int(f.id) for f in events)
    first = json.loads(events[0].data)
    assert first["workflow_context"] == {
        "workflow_exec_id": root, "workflow_run_id": truth[0].workflow_context.workflow_run_id,
        "workflow_name": "tree_root", "parent_workflow_exec_id": None, "root_workflow_exec_id": root,
        "task_queue": "default"}
    assert first["sequence"] == 1 and first["payload"]["input_json"] == truth[0].payload.input_json
    # The drop happened while the tree was still running: the straggler closed after it.
    straggler_closed = [json.loads(f.data)["workflow_context"]["workflow_name"] for f in after
                        if f.event == "WORKFLOW_EXECUTION_COMPLETED"]
    assert "tree_straggler" in straggler_closed


async def test_the_execution_route_finds_a_grandchild_and_start_seq_is_inclusive(
        tree_env: Environment, gateway: str) -> None:
    root = f"sse-{uuid.uuid4().hex[:8]}"
    handle = await tree_env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value="g", straggler_seconds=0.0),
                                             execution_id=root)
    await handle.result(timeout=20)
    truth = [item.event for item in await logged_tree(tree_env.settings, root)]
    grandchild = next(e.workflow_context.workflow_exec_id for e in truth
                      if e.workflow_context.workflow_name == "tree_grandchild")
    mine = [e for e in truth if e.workflow_context.workflow_exec_id == grandchild]
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as client:
        # No root given: the gateway finds it from the id (children are named <parent>.<hex>).
        whole = await read_frames(client, f"{gateway}/v1/workflows/executions/{grandchild}/stream?until_closed=1")
        assert [json.loads(f.data)["event_id"] for f in whole if f.event != "end"] == [e.event_id for e in mine]
        assert {json.loads(f.data)["workflow_context"]["parent_workflow_exec_id"] for f in whole[:-1]} == {
            mine[0].workflow_context.parent_workflow_exec_id}
        # start_seq names the first event to send (inclusive), as Mistral's does.
        start = whole[1].id
        tail = await read_frames(client, f"{gateway}/v1/workflows/executions/{grandchild}/stream"
                                         f"?until_closed=true&start_seq={start}&root_workflow_exec_id={root}")
        assert [f.id for f in tail if f.event != "end"] == [f.id for f in whole[1:-1]]
        # Filters on the events route: one type, one workflow name.
        closes = await read_frames(client, f"{gateway}/v1/workflows/events/stream?root_workflow_exec_id={root}"
                                           "&workflow_event_types=WORKFLOW_EXECUTION_COMPLETED"
                                           "&workflow_name=tree_child&until_closed=true")
        assert [f.event for f in closes] == ["WORKFLOW_EXECUTION_COMPLETED", "end"]
        assert json.loads(closes[0].data)["workflow_context"]["workflow_name"] == "tree_child"

        missing = await client.get(f"{gateway}/v1/workflows/executions/nobody.abc/stream")
        assert missing.status_code == 404 and "not found" in missing.json()["detail"]
        no_tree = await client.get(f"{gateway}/v1/workflows/events/stream?workflow_name=tree_child")
        assert no_tree.status_code == 400 and "root_workflow_exec_id" in no_tree.json()["detail"]
        bad_type = await client.get(f"{gateway}/v1/workflows/events/stream?root_workflow_exec_id={root}"
                                    "&workflow_event_types=NOT_A_TYPE")
        assert bad_type.status_code == 400 and "unknown event type" in bad_type.json()["detail"]
        bad_seq = await client.get(f"{gateway}/v1/workflows/events/stream?root_workflow_exec_id={root}"
                                   "&start_seq=yesterday")
        assert bad_seq.status_code == 400 and "not a cursor" in bad_seq.json()["detail"]


# ---------------------------------------------------------------- the CLI


async def treeflow(tree_env: Environment, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from treeflow.cli import main; main()", *args,
        "--bootstrap-servers", tree_env.settings.bootstrap_servers, "--prefix", tree_env.settings.topic_prefix,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_tail_prints_json_lines_resumes_from_a_cursor_and_draws_the_tree(tree_env: Environment) -> None:
    root = f"tail-{uuid.uuid4().hex[:8]}"
    handle = await tree_env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value="t", straggler_seconds=0.0),
                                             execution_id=root)
    await handle.result(timeout=20)
    truth = [item.event for item in await logged_tree(tree_env.settings, root)]

    code, out, err = await treeflow(tree_env, "tail", root, "--json", "--until-closed")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["event_id"] for line in lines] == [e.event_id for e in truth]
    assert {line["workflow_context"]["root_workflow_exec_id"] for line in lines} == {root}

    code, out, err = await treeflow(tree_env, "tail", root, "--json", "--until-closed", "--from-cursor", lines[4]["cursor"])
    assert code == 0, err
    assert [json.loads(line)["event_id"] for line in out.splitlines()] == [e.event_id for e in truth[5:]]

    code, out, err = await treeflow(tree_env, "tail", root, "--until-closed")
    assert code == 0, err
    drawn = out.splitlines()
    assert drawn[0].startswith(f"tree_root  {root}  COMPLETED")
    assert sum(line.lstrip("│ ├└─").startswith(("tree_child ", "tree_straggler ")) for line in drawn) == 2
    assert any(line.lstrip("│ ├└─").startswith("tree_grandchild ") and "COMPLETED" in line for line in drawn)
    assert drawn[-1] == "tree closed"

    code, _, err = await treeflow(tree_env, "tail", root, "--from-cursor", "nonsense")
    assert code == 2 and "not a cursor" in err  # bad input


async def test_serve_streams_and_stops_on_sigterm_with_a_stream_open(tree_env: Environment) -> None:
    root = f"serve-{uuid.uuid4().hex[:8]}"
    await tree_env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value="s", straggler_seconds=30.0),
                                    execution_id=root)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from treeflow.cli import main; main()", "serve", "--port", "0",
        "--bootstrap-servers", tree_env.settings.bootstrap_servers, "--prefix", tree_env.settings.topic_prefix,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            banner = (await process.stderr.readline()).decode()
        url = banner.split(" on ")[1].split()[0]
        async with httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as client:
            frames = []
            async with asyncio.timeout(20), aconnect_sse(client, "GET", f"{url}/v1/workflows/executions/{root}"
                                                                        "/stream?format=treeflow") as source:
                async for frame in source.aiter_sse():
                    frames.append(frame)
                    if len(frames) == 3:
                        process.send_signal(signal.SIGTERM)  # the straggler still sleeps: the stream is open
            assert [f.event for f in frames][:1] == ["WORKFLOW_EXECUTION_STARTED"]
        async with asyncio.timeout(10):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode in (0, -signal.SIGTERM)  # Uvicorn re-raises the signal it handled
