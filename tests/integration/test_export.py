"""`treeflow export`: the events topic as Parquet / JSON lines, incrementally, read back by pyarrow and DuckDB."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from treeflow.consumers import EventReader
from treeflow.consumers.export import ExportCursor, arrow_schema, export_events
from treeflow.schemas import CLOSING_STATUS, EventType
from treeflow.testing import Environment
from tests.integration import tree_app
from tests.integration.tree_app import logged_tree

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


async def run_trees(env: Environment, count: int) -> list[str]:
    roots = [f"export-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    handles = [await env.client.start_workflow(tree_app.Root, tree_app.TreeInput(value=root, straggler_seconds=0.0),
                                               execution_id=root) for root in roots]
    await asyncio.gather(*(handle.result(timeout=30) for handle in handles))
    for root in roots:  # the abandoned straggler may close after the root: wait for the whole tree
        for _ in range(200):
            events = [item.event for item in await logged_tree(env.settings, root)]
            closed = {e.workflow_context.workflow_exec_id for e in events if e.event_type in CLOSING_STATUS}
            if len(closed) == 4:
                break
            await asyncio.sleep(0.05)
    return roots


async def treeflow(env: Environment, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from treeflow.cli import main; main()", *args,
        "--bootstrap-servers", env.settings.bootstrap_servers, "--prefix", env.settings.topic_prefix,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


def readme_query() -> str:
    text = README.read_text()
    section = text[text.index("### The log as an analytics table"):]
    return re.search(r"```sql\n(.*?)```", section, re.S).group(1)


async def test_incremental_exports_cover_the_log_exactly_and_duckdb_reads_them(tree_env: Environment,
                                                                            tmp_path: Path) -> None:
    import duckdb
    import pyarrow.parquet as pq

    exports = tmp_path / "exports"
    exports.mkdir()
    cursor_file = exports / "cursor"
    first_roots = await run_trees(tree_env, 5)
    code, _, err = await treeflow(tree_env, "export", "--output", str(exports / "1.parquet"),
                                  "--cursor-file", str(cursor_file))
    assert code == 0, err
    first_cursor = cursor_file.read_text().strip()
    assert err.strip().splitlines()[-1] == f"next: --since {first_cursor}"

    second_roots = await run_trees(tree_env, 4)
    code, _, err = await treeflow(tree_env, "export", "--output", str(exports / "2.parquet"),
                                  "--cursor-file", str(cursor_file))
    assert code == 0, err
    # Nothing new: an empty file, and the same cursor again.
    code, _, err = await treeflow(tree_env, "export", "--output", str(exports / "3.parquet"),
                                  "--cursor-file", str(cursor_file))
    assert code == 0, err
    assert "export: 0 events" in err
    final_cursor = ExportCursor.parse(cursor_file.read_text().strip())

    tables = [pq.read_table(exports / f"{n}.parquet") for n in (1, 2, 3)]
    assert all(table.schema.equals(arrow_schema()) for table in tables)
    assert tables[2].num_rows == 0
    rows = [row for table in tables for row in table.to_pylist()]

    # The truth, independent of any end-offset answer: every tree is closed, and each
    # execution's sequences run 1..n with no gap, so every event of the log is here once.
    ids = [row["event_id"] for row in rows]
    assert len(ids) == len(set(ids)), "an event was exported twice"
    sequences: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        sequences[row["workflow_exec_id"]].append(row["sequence"])
    assert len(sequences) == 4 * 9
    for exec_id, seen in sequences.items():
        assert sorted(seen) == list(range(1, len(seen) + 1)), exec_id
    closing = {row["workflow_exec_id"] for row in rows if row["event_type"] in {t.value for t in CLOSING_STATUS}}
    assert closing == set(sequences)
    # The first file holds exactly the first trees; the cursor splits the log where it said.
    first_ids = {row["event_id"] for row in tables[0].to_pylist()}
    for root in first_roots:
        assert {e.event_id for e in (item.event for item in await logged_tree(tree_env.settings, root))} <= first_ids
    assert {row["root_workflow_exec_id"] for row in tables[1].to_pylist()} == set(second_roots)
    split = ExportCursor.parse(first_cursor).positions
    for table in tables[:2]:
        for row in table.to_pylist():
            before = row["offset"] < split[row["partition"]]
            assert before == (table is tables[0])
    # And the final cursor is the log's true end: a reader to the end adds nothing.
    assert sum(final_cursor.positions.values()) == len(rows)
    reader = EventReader(tree_env.settings, start_offsets=final_cursor.positions)
    assert [item async for item in reader] == []

    # A row is the event: envelope, context, payload as JSON, cursor.
    logged = {item.event.event_id: item for root in first_roots for item in await logged_tree(tree_env.settings, root)}
    sample = next(row for row in rows if row["event_type"] == "ACTIVITY_TASK_COMPLETED" and row["event_id"] in logged)
    item = logged[sample["event_id"]]
    assert (sample["partition"], sample["offset"]) == (item.partition, item.offset)
    assert sample["cursor"] == (item.partition << 48) + item.offset
    assert sample["timestamp"] == item.event.timestamp
    assert sample["attempt"] == item.event.attempt == 1
    assert sample["workflow_name"] == item.event.workflow_context.workflow_name
    assert json.loads(sample["payload"]) == json.loads(item.event.payload.model_dump_json())

    # DuckDB reads the files as one table and runs the README's example.
    connection = duckdb.connect()
    connection.execute(f"SET file_search_path = '{tmp_path}'")
    result = connection.execute(readme_query()).fetchall()
    assert [(name, count) for name, count, _ in result] == [("leaf_step", 2 * 9)]
    assert result[0][2] > 0
    assert connection.execute("SELECT count(*) FROM read_parquet('exports/*.parquet')").fetchone()[0] == len(rows)


async def test_a_tree_exports_alone_to_json_lines_and_bad_cursors_are_refused(tree_env: Environment,
                                                                             tmp_path: Path) -> None:
    root, other = await run_trees(tree_env, 2)
    report = await export_events(tree_env.settings, tmp_path / "tree.jsonl", format="jsonl", root=root)
    lines = [json.loads(line) for line in (tmp_path / "tree.jsonl").read_text().splitlines()]
    truth = [item.event for item in await logged_tree(tree_env.settings, root)]
    assert [line["event_id"] for line in lines] == [e.event_id for e in truth]
    assert report.rows == len(truth) and list(report.cursor.positions) == [lines[0]["partition"]]
    assert lines[0]["event_type"] == EventType.WORKFLOW_EXECUTION_STARTED.value
    assert lines[0]["timestamp"].endswith("Z") and lines[0]["parent_workflow_exec_id"] is None

    again = await export_events(tree_env.settings, tmp_path / "again.jsonl", format="jsonl", root=root,
                                since=report.cursor)
    assert again.rows == 0 and again.cursor == report.cursor

    code, _, err = await treeflow(tree_env, "export", "--output", str(tmp_path / "tree.jsonl"), "--format", "jsonl")
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1
    code, _, err = await treeflow(tree_env, "export", "--output", str(tmp_path / "x.jsonl"), "--since", "soon")
    assert code == 2 and "not a cursor" in err
    far = ExportCursor({0: 10**9})
    code, _, err = await treeflow(tree_env, "export", "--output", str(tmp_path / "x.jsonl"), "--since", str(far))
    assert code == 5 and "recreated" in err
    assert not (tmp_path / "x.jsonl").exists()
    code, out, err = await treeflow(tree_env, "export", "--output", "-", "--format", "jsonl", "--root", other)
    assert code == 0, err
    assert {json.loads(line)["root_workflow_exec_id"] for line in out.splitlines()} == {other}
