"""A Mistral-style program (multi-parameter entrypoint and handlers, Mistral's activity
options, an update with a validator, custom tasks in workflow and activity code) on the
real (embedded) broker, then `treeflow update` and `treeflow replay` on its history."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import pytest_asyncio
from click.testing import CliRunner, Result

from treeflow.cli import main
from treeflow.errors import WorkflowUpdateError
from treeflow.schemas import EventType
from treeflow.testing import Environment
from tests import mistral_program as program

pytestmark = pytest.mark.integration
T = EventType


@pytest_asyncio.fixture(scope="module")
async def env(broker):
    async with Environment(modules=[program], bootstrap_servers=broker.bootstrap_servers,
                           profile=broker.profile) as environment:
        yield environment


async def cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def treeflow(*args: str) -> tuple[int, str]:
    """The CLI in a process of its own (as CI runs `treeflow replay`); the environment's
    TREEFLOW_* variables point it at the test's broker and topics. (A thread would load
    the workflow module there, and CPython 3.11 does not parse in two threads safely.)"""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from treeflow.cli import main; main()", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


async def test_a_mistral_program_runs_with_only_its_import_changed(env: Environment) -> None:
    handle = await env.client.start_workflow(program.OrderWorkflow, {"customer": {"name": "ann"}, "max_items": 50},
                                             execution_id="mistral-1")
    await handle.signal("add_item", {"item": "apple", "qty": 2})
    await handle.signal("add_item", item="pear")
    assert await handle.query("basket", {"only": "apple"}) == {"apple": 2}
    assert await handle.update("price", item="apple", qty=2) == 10
    assert await handle.update(program.OrderWorkflow.price, "fig") == 13
    with pytest.raises(WorkflowUpdateError) as rejected:
        await handle.update("price", item="fig", qty=1000)
    assert rejected.value.type == "UpdateRejected" and "at most 100" in str(rejected.value)
    result = await cli("update", "mistral-1", "price", "--input", '{"item": "kiwi", "qty": 3}')
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "25"
    await handle.signal("checkout")
    assert await handle.result(timeout=60) == {"customer": "ann", "packed": "apple,pear", "total": 25,
                                               "execution_id": "mistral-1"}

    history = await handle.history()
    types = [e.event_type for e in history]
    assert types.count(T.WORKFLOW_EXECUTION_UPDATE_ACCEPTED) == 3 == types.count(T.WORKFLOW_EXECUTION_UPDATE_COMPLETED)
    scheduled = [e.payload for e in history if e.event_type is T.ACTIVITY_TASK_SCHEDULED]
    quote_ = next(p for p in scheduled if p.activity_name == "quote")
    assert (quote_.start_to_close_timeout_ms, quote_.retry_policy.maximum_attempts,
            quote_.retry_policy.backoff_coefficient) == (20_000, 2, 1.5)
    pack_ = next(p for p in scheduled if p.activity_name == "pack")
    assert (pack_.heartbeat_timeout_ms, pack_.retry_policy.maximum_attempts) == (30_000, 3)
    tasks = [(e.event_type.value, e.payload.custom_task_type, e.payload.activity_id is None)
             for e in history if e.event_type.value.startswith("CUSTOM_TASK_")]
    assert tasks == [("CUSTOM_TASK_STARTED", "order", True), ("CUSTOM_TASK_IN_PROGRESS", "order", True),
                     ("CUSTOM_TASK_STARTED", "packing", False), ("CUSTOM_TASK_IN_PROGRESS", "packing", False),
                     ("CUSTOM_TASK_COMPLETED", "packing", False), ("CUSTOM_TASK_COMPLETED", "order", True)]
    rejected_update = await cli("update", "mistral-1", "price", "--input", '"late"')
    assert rejected_update.exit_code == 1 and "WorkflowClosed" in rejected_update.output


async def test_treeflow_replay_checks_changed_code_against_the_log_and_files(env: Environment,
                                                                             tmp_path: Path) -> None:
    handle = await env.client.start_workflow(program.OrderWorkflow, {"customer": {"name": "bob"}, "max_items": 1},
                                             execution_id="mistral-2")
    await handle.signal("add_item", {"item": "plum"})
    await handle.result(timeout=60)
    source = Path(program.__file__)
    code, out = await treeflow("replay", "--module", str(source), "mistral-2")
    assert code == 0, out
    assert "1 run(s) replayed without a mismatch" in out

    changed = tmp_path / "changed_order_program.py"  # packs twice, without a patch
    changed.write_text(source.read_text().replace(
        "packed = await pack(sorted(self.items))",
        "packed = await pack(sorted(self.items))\n            await pack([])"))
    code, out = await treeflow("replay", "--module", str(changed), "mistral-2")
    assert code == 1, out
    assert "MISMATCH  mistral-2" in out and "ScheduleActivityTask" in out

    printed = await cli("history", "mistral-2", "--json")  # (no module is loaded: a thread will do)
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.output.splitlines()[0])["event_type"] == "WORKFLOW_EXECUTION_STARTED"
    history_file = tmp_path / "mistral-2.jsonl"
    history_file.write_text(printed.output)
    assert (await treeflow("replay", "-m", str(source), "--file", str(history_file)))[0] == 0
    assert (await treeflow("replay", "-m", str(changed), "--file", str(history_file)))[0] == 1
