"""treeflow.testing's shared broker and the pytest plugin: one embedded broker per process,
and no faust data folder left in the working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import treeflow as workflows
from treeflow.testing import Environment, shared_broker

pytest_plugins = ["treeflow.pytest_plugin"]


@workflows.workflow.define(name="hello")
class Hello:
    @workflows.workflow.entrypoint
    async def run(self, name: str) -> str:
        return f"hello {name}"


pytestmark = pytest.mark.integration


async def test_environments_share_one_broker_and_leave_no_data_folder(
        treeflow_broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = Environment(workflows=[Hello])
    async with first as env:
        assert await env.client.execute_workflow(Hello, "ann") == "hello ann"
    async with Environment(workflows=[Hello]) as env:
        assert await env.client.execute_workflow(Hello, "bob") == "hello bob"
        assert env.settings.bootstrap_servers == first.settings.bootstrap_servers
        assert env.settings.bootstrap_servers == treeflow_broker.bootstrap_servers
        if not os.environ.get("TREEFLOW_BOOTSTRAP_SERVERS"):
            assert env.settings.bootstrap_servers == shared_broker().bootstrap_servers
    assert list(tmp_path.iterdir()) == []  # faust's data folder lived in a temporary directory
