import os
import subprocess
import sys

import pytest

from treeflow.demo import run_demo
from treeflow.kafka import KafkaSettings
from treeflow.schemas import EventType

pytestmark = pytest.mark.integration


async def test_the_demo_writes_and_reads_back_two_trees(settings: KafkaSettings) -> None:
    lines: list[str] = []
    grouped = await run_demo(settings, lines.append)
    seed, batch = grouped.values()
    assert len(seed) == 10 and len(batch) == 15
    for consumed in grouped.values():
        by_exec: dict[str, list[int]] = {}
        for item in consumed:
            by_exec.setdefault(item.event.workflow_context.workflow_exec_id, []).append(item.event.sequence)
        assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in by_exec.values())
    root = seed[0].event.workflow_context
    assert root.parent_workflow_exec_id is None and root.root_workflow_exec_id == root.workflow_exec_id
    child = next(i.event.workflow_context for i in seed if i.event.workflow_context.parent_workflow_exec_id)
    assert child.parent_workflow_exec_id == root.workflow_exec_id
    assert child.root_workflow_exec_id == root.workflow_exec_id
    assert seed[-1].event.event_type is EventType.WORKFLOW_EXECUTION_COMPLETED
    text = "\n".join(lines)
    assert '"Parent got: processed:hello"' in text
    assert "TERMINATED" in text and "PARENT_CLOSE_POLICY_APPLIED" in text


def test_the_main_command_runs_on_its_own_embedded_broker() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREEFLOW_")}
    done = subprocess.run([sys.executable, "-m", "treeflow.cli", "demo"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(tansu profile)" in done.stdout
    assert "[parent_workflow]  COMPLETED" in done.stdout
    assert "[item_workflow]  TERMINATED" in done.stdout
