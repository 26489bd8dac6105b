"""The visibility store kept by the Environment's visibility service from the real event log:
the Client methods, `treeflow list` / `count`, and the HTTP API, on running and closed trees."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import pytest_asyncio

from treeflow.consumers.gateway import GatewayServer, create_app
from treeflow.consumers.visibility import ExecutionQuery, VisibilityService, open_store
from treeflow.testing import Environment
from tests.integration import tree_app
from tests.polling import eventually

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module")
async def trees(tree_env: Environment) -> dict[str, str]:
    """Two closed trees and one whose abandoned straggler is still running (it sleeps 60 s)."""
    done = [f"vis-{uuid.uuid4().hex[:6]}-{n}" for n in range(2)]
    running = f"vis-{uuid.uuid4().hex[:6]}-slow"
    for root in done:
        handle = await tree_env.client.start_workflow(
            tree_app.Root, tree_app.TreeInput(value=root, straggler_seconds=0.0), execution_id=root)
        await handle.result(timeout=30)
    handle = await tree_env.client.start_workflow(
        tree_app.Root, tree_app.TreeInput(value=running, straggler_seconds=60.0), execution_id=running)
    await handle.result(timeout=30)
    client = tree_env.client
    for root in done:
        await eventually(lambda: client.count_executions(root_execution_id=root, status="closed"),
                         lambda n: n == 4, timeout=60)
    await eventually(lambda: client.count_executions(root_execution_id=running), lambda n: n == 4, timeout=60)
    return {"a": done[0], "b": done[1], "slow": running}


async def test_rows_follow_the_trees_and_filters_hold(tree_env: Environment, trees: dict[str, str]) -> None:
    client = tree_env.client
    a = trees["a"]
    rows = {r.execution_id: r for r in await client.list_executions(root_execution_id=a)}
    assert len(rows) == 4
    by_name = {r.workflow_name: r for r in rows.values()}
    assert set(by_name) == {"tree_root", "tree_child", "tree_grandchild", "tree_straggler"}
    assert by_name["tree_root"].execution_id == a and by_name["tree_root"].parent_execution_id is None
    assert by_name["tree_child"].parent_execution_id == a
    assert by_name["tree_grandchild"].parent_execution_id == by_name["tree_child"].execution_id
    assert by_name["tree_straggler"].parent_execution_id == a
    for row in rows.values():
        assert row.root_execution_id == a and row.status == "COMPLETED" and row.task_queue == "default"
        assert row.start_time is not None and row.close_time is not None and row.close_time >= row.start_time
        assert row.last_event_type == "WORKFLOW_EXECUTION_COMPLETED"
        assert row.last_sequence == len(await client.history(row.execution_id, root_execution_id=a))

    slow = trees["slow"]
    running = await client.list_executions(status="RUNNING", root_execution_id=slow)
    assert [(r.workflow_name, r.close_time) for r in running] == [("tree_straggler", None)]
    assert await client.count_executions(status="open", root_execution_id=slow) == 1
    assert await client.count_executions(workflow_name="tree_child") == 3
    assert await client.count_executions(parent_execution_id=a) == 2
    assert await client.count_executions(since=datetime.now(timezone.utc) + timedelta(minutes=1)) == 0
    assert await client.count_executions(since=timedelta(minutes=10)) >= 12
    newest = await client.list_executions(workflow_name="tree_root", limit=2)
    assert [r.execution_id for r in newest] == [slow, trees["b"]]
    fresh = await eventually(client.visibility_freshness, lambda f: f.lag == 0)
    assert fresh.applied_at is not None


async def test_a_terminated_execution_gets_its_reason_and_a_reread_changes_nothing(
        tree_env: Environment, trees: dict[str, str]) -> None:
    client = tree_env.client
    slow = trees["slow"]
    [straggler] = await client.list_executions(status="RUNNING", root_execution_id=slow)
    await client.get_handle(straggler.execution_id, root_execution_id=slow).terminate("enough waiting")
    row = await eventually(lambda: client.list_executions(root_execution_id=slow, workflow_name="tree_straggler"),
                           lambda rows: rows[0].status == "TERMINATED")
    assert row[0].close_reason == "enough waiting"

    # A second service with a group of its own re-reads the whole log into the same store: nothing changes.
    before = await client.list_executions(limit=1000)
    assert tree_env.visibility_url is not None
    async with open_store(tree_env.visibility_url) as store:
        service = VisibilityService(store, settings=tree_env.settings, group_id=f"reread-{uuid.uuid4().hex[:6]}")
        async with service:
            events = 0
            for root in (trees["a"], trees["b"], slow):
                for row in await client.list_executions(root_execution_id=root):
                    events += len(await client.history(row.execution_id, root_execution_id=root))

            async def applied() -> int:
                return service.stats.applied

            await eventually(applied, lambda n: n >= events, timeout=60)
        assert await store.list(ExecutionQuery(limit=1000)) == before


async def treeflow(tree_env: Environment, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from treeflow.cli import main; main()", *args,
        "--bootstrap-servers", tree_env.settings.bootstrap_servers, "--prefix", tree_env.settings.topic_prefix,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_treeflow_list_and_count(tree_env: Environment, trees: dict[str, str]) -> None:
    a = trees["a"]
    code, out, err = await treeflow(tree_env, "list", "--root", a)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["EXECUTION", "ID", "WORKFLOW", "STATUS", "STARTED", "CLOSED", "PARENT", "ROOT"]
    assert len(lines) == 5 and all("COMPLETED" in line for line in lines[1:])
    assert "4 execution(s); visibility lag:" in err

    code, out, err = await treeflow(tree_env, "list", "--workflow", "tree_child", "--status", "completed", "--json",
                                    "--limit", "2")
    assert code == 0, err
    answer = json.loads(out)
    assert [r["workflow_name"] for r in answer["executions"]] == ["tree_child", "tree_child"]
    assert isinstance(answer["freshness"]["lag"], int)

    code, out, err = await treeflow(tree_env, "count", "--parent", a)
    assert (code, out.strip()) == (0, "2") and "visibility lag" in err
    code, out, err = await treeflow(tree_env, "count", "--root", a, "--since", "1h", "--json")
    assert code == 0 and json.loads(out)["count"] == 4

    code, out, err = await treeflow(tree_env, "list", "--status", "finished")
    assert code == 2 and err.strip().splitlines() == [
        "Error: unknown status 'FINISHED': one of RUNNING, COMPLETED, FAILED, CANCELED, TERMINATED, TIMED_OUT, "
        "CONTINUED_AS_NEW, open or closed"]
    code, out, err = await treeflow(tree_env, "count", "--database", "mysql://nowhere")
    assert code == 3 and len(err.strip().splitlines()) == 1 and "sqlite:// or postgresql://" in err


@pytest_asyncio.fixture(scope="module")
async def gateway(tree_env: Environment):
    server = GatewayServer(create_app(tree_env.settings), port=0)
    await server.start()
    yield server.url
    await server.stop()


async def test_the_http_api_lists_counts_and_controls(tree_env: Environment, trees: dict[str, str],
                                                      gateway: str) -> None:
    a = trees["a"]
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        answer = (await http.get("/api/executions", params={"root": a})).json()
        assert len(answer["executions"]) == 4 and "lag" in answer["freshness"]
        answer = (await http.get("/api/executions", params=[("status", "COMPLETED"), ("workflow", "tree_root"),
                                                            ("root", a)])).json()
        assert [r["execution_id"] for r in answer["executions"]] == [a]
        assert (await http.get("/api/executions/count", params={"parent": a})).json()["count"] == 2
        row = (await http.get(f"/api/executions/{a}")).json()["execution"]
        assert row["status"] == "COMPLETED" and row["start_time"].endswith("+00:00")
        assert (await http.get("/api/executions/nope")).status_code == 404
        bad = await http.get("/api/executions", params={"status": "later"})
        assert bad.status_code == 400 and "unknown status" in bad.json()["detail"]
        assert (await http.get("/api/executions", params={"limit": "x"})).status_code == 400

        # Control: a closed execution refuses a signal; a bad body is 400.
        refused = await http.post(f"/api/executions/{a}/signal", json={"name": "go", "root_workflow_exec_id": a})
        assert refused.status_code == 409, refused.text
        assert (await http.post(f"/api/executions/{a}/signal", json={"input": 1})).status_code == 400
        assert (await http.post(f"/api/executions/{a}/cancel", content=b"[1]")).status_code == 400

        root = f"vis-{uuid.uuid4().hex[:6]}-http"
        await tree_env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value=root, straggler_seconds=60.0),
                                             execution_id=root)
        straggler = await eventually(lambda: tree_env.client.list_executions(
            root_execution_id=root, workflow_name="tree_straggler", status="RUNNING"), lambda rows: len(rows) == 1)
        done = await http.post(f"/api/executions/{straggler[0].execution_id}/terminate",
                               json={"reason": "from the test", "root_workflow_exec_id": root})
        assert done.status_code == 200, done.text
        row = await eventually(lambda: tree_env.client.list_executions(root_execution_id=root,
                                                                       workflow_name="tree_straggler"),
                               lambda rows: rows[0].status == "TERMINATED")
        assert row[0].close_reason == "from the test"


async def test_treeflow_visibility_and_serve_run_the_service(tree_env: Environment, trees: dict[str, str],
                                                             tmp_path) -> None:
    """The standalone service fills a store of its own; `serve --run-visibility` fills another and answers
    from it; both stop on SIGTERM."""
    common = ["--bootstrap-servers", tree_env.settings.bootstrap_servers, "--prefix", tree_env.settings.topic_prefix]
    alone = f"sqlite:///{tmp_path}/alone.db"
    served = f"sqlite:///{tmp_path}/served.db"
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from treeflow.cli import main; main()", "visibility", "--database", alone,
        "--group-id", f"cli-{uuid.uuid4().hex[:6]}", *common, stderr=asyncio.subprocess.PIPE)
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from treeflow.cli import main; main()", "serve", "--port", "0", "--run-visibility",
        "--database", served, "--group-id", f"serve-{uuid.uuid4().hex[:6]}", *common, stderr=asyncio.subprocess.PIPE)
    try:
        assert server.stderr is not None and service.stderr is not None
        async with asyncio.timeout(30):
            assert "treeflow visibility:" in (await service.stderr.readline()).decode()
            url = (await server.stderr.readline()).decode().split(" on ")[1].split()[0]
        a = trees["a"]
        async with open_store(alone) as store:
            rows = await eventually(lambda: store.list(ExecutionQuery.of(root_execution_id=a)),
                                    lambda rows: len(rows) == 4 and all(r.status == "COMPLETED" for r in rows),
                                    timeout=60, interval=0.3)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            async def count() -> int:
                return int((await http.get("/api/executions/count", params={"root": a})).json()["count"])
            await eventually(count, lambda n: n == 4, timeout=60, interval=0.3)
        for process in (service, server):
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(40):
            assert await service.wait() == 0
            assert await server.wait() in (0, -signal.SIGTERM)
        assert [r.execution_id for r in rows] == [r.execution_id for r in await tree_env.client.list_executions(
            root_execution_id=a)]
    finally:
        for process in (service, server):
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_the_client_finds_roots_in_the_store_without_reading_the_topic(
        tree_env: Environment, trees: dict[str, str]) -> None:
    from treeflow.client import Client

    a = trees["a"]
    [grandchild] = await tree_env.client.list_executions(root_execution_id=a, workflow_name="tree_grandchild")
    client = Client(tree_env.settings)
    await client.start()
    try:
        async def no_topic_read(execution_id: str) -> str | None:
            raise AssertionError(f"the events topic was read for the root of {execution_id}")

        client._roots.find = no_topic_read  # type: ignore[method-assign]
        assert await client.find_root(grandchild.execution_id) == a
        described = await client.describe(grandchild.execution_id)
        assert (described.status.value, described.root_execution_id) == ("COMPLETED", a)
        # A store of other topics does not answer: the lookup falls back to the topic.
        other = Client(replace(tree_env.settings, topic_prefix=f"other-{uuid.uuid4().hex[:6]}"))
        assert await other._root_from_visibility(grandchild.execution_id) is None
        await other.close()
    finally:
        await client.close()


async def test_a_store_outage_stalls_the_service_and_loses_nothing(tree_env: Environment, trees: dict[str, str],
                                                                   tmp_path) -> None:
    """A 4 s outage (more failed attempts per event than a subscription's default 5): the events wait,
    none is dead-lettered, every row arrives."""
    from treeflow.consumers.visibility.service import DEFAULT_OPTIONS

    assert DEFAULT_OPTIONS.backoff(10**6) == 30.0
    inner = open_store(f"sqlite:///{tmp_path}/outage.db")

    class Flaky(type(inner)):  # type: ignore[misc]
        failures = 0
        down_until: float | None = None

        async def apply(self, updates, positions):  # type: ignore[no-untyped-def]
            now = asyncio.get_running_loop().time()
            Flaky.down_until = Flaky.down_until or now + 4.0
            if now < Flaky.down_until:
                Flaky.failures += 1
                raise OSError("the database is down")
            await super().apply(updates, positions)

    store = Flaky(inner.url)
    async with store:
        service = VisibilityService(store, settings=tree_env.settings, group_id=f"outage-{uuid.uuid4().hex[:6]}")
        async with service:
            rows = await eventually(lambda: store.list(ExecutionQuery.of(root_execution_id=trees["a"])),
                                    lambda rows: len(rows) == 4 and all(r.status == "COMPLETED" for r in rows),
                                    timeout=90, interval=0.3)
        assert Flaky.failures >= 5 and service.stats.failures == Flaky.failures
        assert service.subscription.stats.dead_lettered == 0 and service.subscription.stats.retries >= 5
    assert [r.execution_id for r in rows] == [
        r.execution_id for r in await tree_env.client.list_executions(root_execution_id=trees["a"])]
