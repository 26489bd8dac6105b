import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).parents[2] / "engine" / "examples" / "child_workflows.py"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TREEFLOW_")}


def test_the_main_command_runs_the_seed_and_prints_its_history() -> None:
    done = subprocess.run([sys.executable, "-m", "treeflow.cli", "demo"], env=clean_env(), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "result: Parent got: processed:hello" in out
    assert "(tansu profile)" in out
    assert "[parent_workflow]  COMPLETED" in out and "[child_workflow]  COMPLETED" in out
    order = [line.split()[3] for line in out.splitlines() if line.strip().startswith("@")]
    assert order[0] == "WORKFLOW_EXECUTION_STARTED" and order[-1] == "WORKFLOW_EXECUTION_COMPLETED"
    assert order.count("ACTIVITY_TASK_COMPLETED") == 1


def test_treeflow_dev_runs_the_seed_page_file_unchanged_but_for_its_import() -> None:
    source = EXAMPLE.read_text()
    assert "import treeflow as workflows" in source
    done = subprocess.run([sys.executable, "-m", "treeflow.cli", "dev", str(EXAMPLE)], env=clean_env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "Parent got: processed:hello"
