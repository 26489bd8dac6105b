"""One distribution, one namespace: nothing generic lands in site-packages, the consumer
library does not pull in faust, and the schemas ship inside the wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[2]


def run_python(code: str, cwd: Path, path: Path | None = None) -> str:
    env = {"PYTHONPATH": str(path)} if path else None
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_consumer_library_does_not_import_faust(tmp_path: Path) -> None:
    out = run_python("import sys, treeflow.consumers, treeflow.kafka, treeflow.schemas; "
                     "print(sorted(m for m in sys.modules if m.split('.')[0] in ('faust', 'mode')))", tmp_path)
    assert out == "[]"


def test_the_wheel_holds_only_the_treeflow_namespace_and_its_schemas(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("treeflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"treeflow", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "treeflow/schemas/avro/events/Event.avsc" in names
    assert "treeflow/schemas/avro/history/event-v1.avsc" in names
    assert "treeflow/consumers/web/index.html" in names and "treeflow/consumers/web/app.js" in names
    # Every package of the source tree is in the wheel (the list in pyproject.toml is by hand).
    for top, installed in (("engine", "treeflow"), ("schemas", "treeflow/schemas"), ("consumers", "treeflow/consumers")):
        for init in (ROOT / top).rglob("__init__.py"):
            assert f"{installed}/{init.relative_to(ROOT / top).as_posix()}" in names, init

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = run_python("import treeflow.schemas as s, treeflow.consumers; "
                     "print(s.__file__.startswith(%r), len(s.EventType))" % str(site), tmp_path, site)
    assert out == "True 50"
