"""Fail fast and say why, on a real broker: no processor, unknown ids and names, bad settings."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import treeflow as workflows
from treeflow.cli import main
from treeflow.client import Client
from treeflow.definitions import workflow_definition
from treeflow.errors import (
    CommandTimeoutError,
    DeadlineExceededError,
    QueryTimeoutError,
    WorkflowAlreadyStartedError,
    WorkflowNotRegisteredError,
)
from treeflow.kafka import KafkaSettings, ensure_topics
from treeflow.processor.app import Processor
from treeflow.schemas import EventType
from treeflow.testing import Environment
from treeflow.worker.runner import TaskRunner

from tests.conftest import BrokerUnderTest
from tests.polling import eventually

pytestmark = pytest.mark.integration


@workflows.workflow.define(name="fail_fast_greeting")
class Greeting:
    @workflows.workflow.entrypoint
    async def run(self, name: str) -> str:
        return f"hello {name}"


def env_of(settings: KafkaSettings) -> dict[str, str]:
    return {"TREEFLOW_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "TREEFLOW_BROKER_PROFILE": settings.profile.name,
            "TREEFLOW_TOPIC_PREFIX": settings.topic_prefix, "TREEFLOW_PARTITIONS": str(settings.partitions)}


async def cli(settings: KafkaSettings, *args: str) -> Result:
    """The CLI in a thread (it runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), env=env_of(settings))


def one_line(result: Result) -> str:
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ------------------------------------------------------------ no processor

async def test_a_start_with_no_processor_fails_within_its_deadline_and_is_applied_later(
        settings: KafkaSettings) -> None:
    await ensure_topics(settings)  # topics, but no processor
    client = Client(settings, command_timeout=60)
    await client.start()
    processor = None
    try:
        began = time.monotonic()
        with pytest.raises(CommandTimeoutError) as timed_out:
            await client.start_workflow(Greeting, "world", execution_id="ff-late", timeout=2)  # the call's own
        elapsed = time.monotonic() - began
        assert 2 <= elapsed < 2 + 5 + 3  # its deadline, plus at most DIAGNOSIS_TIMEOUT to say why (and slack)
        error = timed_out.value
        message = str(error)
        assert f"no processor answered the start of workflow execution ff-late within 2s" in message
        assert f"consumer group '{settings.topic_prefix}-processor' has no members" in message
        assert "treeflow processor" in message  # what to do
        assert f"stays in {settings.topics.commands}" in message and "even after this error" in message
        assert "same execution id is safe" in message
        assert error.delivered and error.offset is not None and error.exit_code == 6
        assert isinstance(error, TimeoutError)

        # The command was not lost: a processor started now applies it...
        runner = TaskRunner({"fail_fast_greeting": workflow_definition(Greeting)}, {})
        processor = Processor(settings, runner=runner, local_queues=["default"])
        await processor.start()
        await processor.wait_assigned()
        handle = client.get_handle("ff-late", root_execution_id="ff-late", workflow=Greeting)
        assert await handle.result(timeout=30) == "hello world"
        # ...and the retry the message recommends is safe while the execution runs: refused,
        # or (use_existing) the running execution's handle.
        await client.start_workflow("fail_fast_unregistered", execution_id="ff-twice", timeout=10)  # stays open
        same = await client.start_workflow("fail_fast_unregistered", execution_id="ff-twice", timeout=10,
                                           id_conflict_policy="use_existing")
        assert same.execution_id == "ff-twice" and same.root_execution_id == "ff-twice"
        with pytest.raises(WorkflowAlreadyStartedError):
            await client.start_workflow("fail_fast_unregistered", execution_id="ff-twice", timeout=10)
    finally:
        await client.close()
        if processor is not None:
            await processor.stop()


async def test_the_cli_signal_with_no_processor_says_so_in_one_line_with_exit_code_6(
        settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    began = time.monotonic()
    done = await cli(settings, "signal", "ff-nobody", "go", "--root", "ff-nobody", "--timeout", "1")
    assert time.monotonic() - began < 1 + 5 + 10
    assert done.exit_code == 6, done.output
    line = one_line(done)
    assert "no processor answered the signal to workflow execution ff-nobody within 1s" in line
    assert "no processor is running" in line and "may deliver the signal twice" in line


async def test_the_client_timeout_comes_from_the_environment(settings: KafkaSettings,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    await ensure_topics(settings)
    monkeypatch.setenv("TREEFLOW_COMMAND_TIMEOUT", "1")
    client = Client(settings)
    await client.start()
    try:
        assert client.command_timeout == 1
        with pytest.raises(CommandTimeoutError, match="within 1s"):
            await client.get_handle("ff-env", root_execution_id="ff-env").cancel()
    finally:
        await client.close()


async def test_a_query_with_no_processor_names_the_processor(settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    client = Client(settings)
    await client.start()
    try:
        with pytest.raises(QueryTimeoutError, match="within 1s: no processor is running"):
            await client.get_handle("ff-query", root_execution_id="ff-query").query("status", timeout=1)
    finally:
        await client.close()


# ------------------------------------------------------------ one-line CLI errors

async def test_an_unknown_execution_is_one_line_with_exit_code_7(settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    for command in (["describe", "ff-missing"], ["history", "ff-missing"], ["signal", "ff-missing", "go"]):
        done = await cli(settings, *command)
        assert done.exit_code == 7, done.output
        assert "ff-missing not found" in one_line(done)


async def test_a_topic_with_another_partition_count_is_one_line_with_exit_code_3(settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    done = await cli(settings, "topics", "create", "--partitions", str(settings.partitions + 2))
    assert done.exit_code == 3, done.output
    assert f"has {settings.partitions} partitions, {settings.partitions + 2} are configured" in one_line(done)


async def test_the_wrong_broker_profile_is_one_line_naming_the_likely_cause(broker: BrokerUnderTest,
                                                                             settings: KafkaSettings) -> None:
    if broker.kind != "embedded":
        pytest.skip("the kafka profile is the right one on this broker")
    await ensure_topics(settings)  # the topics are there: what fails is the profile
    done = subprocess.run([sys.executable, "-m", "treeflow.cli", "describe", "ff-x"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env_of(settings), "TREEFLOW_BROKER_PROFILE": "kafka"})
    assert done.returncode == 3, done.stderr  # a configuration error (README, "Errors and exit codes")
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr  # no traceback, no "Unclosed ..."
    assert done.stderr.startswith("error: ") and "TREEFLOW_BROKER_PROFILE=tansu" in done.stderr


# ------------------------------------------------------------ unknown workflow name

async def test_an_unregistered_workflow_name_is_logged_once_shown_by_describe_and_raised_to_the_caller(
        broker: BrokerUnderTest, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="treeflow.worker.runner")
    async with Environment(workflows=[Greeting], bootstrap_servers=broker.bootstrap_servers,
                           profile=broker.profile) as env:
        began = time.monotonic()
        with pytest.raises(WorkflowNotRegisteredError) as refused:
            await env.client.execute_workflow("fail_fast_typo", execution_id="ff-typo", result_timeout=60)
        assert time.monotonic() - began < 30
        message = str(refused.value)
        assert "no workflow named 'fail_fast_typo' is registered" in message and "fail_fast_greeting" in message
        assert "retried with backoff" in message and "treeflow terminate ff-typo" in message

        # The execution stays open and its workflow task is retried (another worker may register it).
        async def failures() -> int:
            history = await env.client.history("ff-typo", root_execution_id="ff-typo")
            return sum(e.event_type is EventType.WORKFLOW_TASK_FAILED for e in history)
        await eventually(lambda: failures(), lambda n: n >= 2, timeout=30)
        described = await env.client.describe("ff-typo", root_execution_id="ff-typo")
        assert described.status.value == "RUNNING"
        assert described.workflow_task_failure_cause == "UNKNOWN_WORKFLOW"
        assert described.workflow_task_failure is not None and "fail_fast_greeting" in \
            described.workflow_task_failure.message
        warnings = [r for r in caplog.records if "ff-typo" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        assert "fail_fast_greeting" in warnings[0].getMessage()

        # A handle from another client learns it from the history; one may choose to wait instead.
        handle = env.client.get_handle("ff-typo")
        with pytest.raises(WorkflowNotRegisteredError):
            await handle.result()
        with pytest.raises(DeadlineExceededError, match="did not close within 1s"):
            await handle.result(timeout=1, wait_for_registration=True)

        done = await cli(env.settings, "describe", "ff-typo")
        assert done.exit_code == 0, done.output
        assert "UNKNOWN_WORKFLOW" in done.output and "WorkflowNotRegistered: no workflow named" in done.output
        await env.client.get_handle("ff-typo").terminate()


# ------------------------------------------------------------ treeflow dev --serve

def test_dev_serve_prints_the_export_lines_of_a_second_terminal(settings: KafkaSettings, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent('''
        import treeflow as workflows

        @workflows.workflow.define(name="served")
        class Served:
            @workflows.workflow.entrypoint
            async def run(self) -> str:
                return "ok"
    '''))
    env = {**os.environ, **env_of(settings)}
    output = tmp_path / "dev.out"
    with open(output, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "treeflow.cli", "dev", str(app), "--serve"],
                                   stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        exports: list[str] = []
        while len(exports) < 4 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            exports = [line for line in output.read_text().splitlines() if line.startswith("export ")]
        assert exports == [f"export TREEFLOW_BOOTSTRAP_SERVERS={settings.bootstrap_servers}",
                           f"export TREEFLOW_BROKER_PROFILE={settings.profile.name}",
                           f"export TREEFLOW_TOPIC_PREFIX={settings.topic_prefix}",
                           f"export TREEFLOW_PARTITIONS={settings.partitions}"], output.read_text()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
