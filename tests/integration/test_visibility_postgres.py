"""The visibility store on a real PostgreSQL server (started by the test set-up: tests/pg_server.py):
the backend contract, and a visibility service filling it from the real event log, read by
`treeflow list` / `count` and by the Client."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from treeflow.client import Client
from treeflow.consumers.visibility import ExecutionQuery, VisibilityError, VisibilityService, open_store
from treeflow.testing import Environment
from tests.integration import tree_app
from tests.pg_server import NoPostgres, postgres_server
from tests.polling import eventually
from tests.visibility_contract import check_backend

pytestmark = pytest.mark.integration

psycopg = pytest.importorskip("psycopg", reason="psycopg is missing: pip install 'treeflow[postgres]'")


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    server = postgres_server()
    try:
        url = server.__enter__()
    except NoPostgres as error:
        pytest.skip(f"no PostgreSQL server could be started: {error}")
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


@pytest_asyncio.fixture
async def database(postgres: str) -> AsyncIterator[str]:
    """A fresh database on the server, for one test."""
    name = f"tf_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(postgres, autocommit=True) as admin:
        await admin.execute(f"CREATE DATABASE {name}")
    yield postgres.rsplit("/", 1)[0] + "/" + name
    async with await psycopg.AsyncConnection.connect(postgres, autocommit=True) as admin:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_the_postgres_backend_keeps_the_contract(database: str) -> None:
    async with open_store(database) as store:
        assert type(store).__name__ == "PostgresStore"
        await check_backend(store)
    async with open_store(database) as again:  # the tables exist: opening again is fine
        assert await again.count(ExecutionQuery()) == 3


async def test_an_unreachable_server_is_one_clear_error() -> None:
    with pytest.raises(VisibilityError, match="cannot open the visibility store postgresql://u:\\*\\*\\*@127.0.0.1:1/x"):
        await open_store("postgresql://u:secret@127.0.0.1:1/x?connect_timeout=2").open()


async def test_list_and_count_against_postgres(tree_env: Environment, database: str) -> None:
    roots = [f"pg-{uuid.uuid4().hex[:6]}-{n}" for n in range(2)]
    for root in roots:
        handle = await tree_env.client.start_workflow(
            tree_app.Root, tree_app.TreeInput(value=root, straggler_seconds=0.0), execution_id=root)
        await handle.result(timeout=30)
    service = VisibilityService(database, settings=tree_env.settings, group_id=f"pg-{uuid.uuid4().hex[:6]}")
    async with service:
        client = Client(tree_env.settings, visibility_url=database)
        try:
            await eventually(lambda: client.count_executions(root_execution_id=roots[1], status="COMPLETED"),
                             lambda n: n == 4, timeout=60)
            rows = await client.list_executions(root_execution_id=roots[0])
            assert sorted(r.workflow_name for r in rows) == ["tree_child", "tree_grandchild", "tree_root",
                                                            "tree_straggler"]
            assert {r.parent_execution_id for r in rows if r.workflow_name != "tree_grandchild"} == {None, roots[0]}
            assert await client.count_executions(workflow_name="tree_root", status="closed") >= 2
            fresh = await eventually(client.visibility_freshness, lambda f: f.lag == 0)
            assert fresh.applied_at is not None
        finally:
            await client.close()

        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from treeflow.cli import main; main()", "list", "--database", database,
            "--root", roots[0], "--status", "COMPLETED", "--json",
            "--bootstrap-servers", tree_env.settings.bootstrap_servers, "--prefix", tree_env.settings.topic_prefix,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        answer = json.loads(out)
        assert len(answer["executions"]) == 4 and answer["freshness"]["lag"] == 0
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from treeflow.cli import main; main()", "count", "--database", database,
            "--parent", roots[1], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert (process.returncode, out.decode().strip()) == (0, "2"), err.decode()


async def test_the_store_connects_again_after_the_server_dropped_it(database: str) -> None:
    async with open_store(database) as store:
        assert await store.count(ExecutionQuery()) == 0
        pid = store._connection.info.backend_pid  # type: ignore[attr-defined]
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            await store.count(ExecutionQuery())  # this call fails (the service retries it) ...
        assert await store.count(ExecutionQuery()) == 0  # ... and the next one has a new connection
        assert store._connection.info.backend_pid != pid  # type: ignore[attr-defined]
