"""Expected failures end a CLI command with one line and a documented exit code (no broker needed)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from treeflow.cli import main
from treeflow.deadlines import COMMAND_TIMEOUT_ENV, DEFAULT_COMMAND_TIMEOUT, command_timeout
from treeflow.kafka import SettingsError
from treeflow.kafka.embedded import free_port


def test_the_command_timeout_comes_from_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COMMAND_TIMEOUT_ENV, raising=False)
    assert command_timeout() == DEFAULT_COMMAND_TIMEOUT == 30
    monkeypatch.setenv(COMMAND_TIMEOUT_ENV, "2.5")
    assert command_timeout() == 2.5
    assert command_timeout(7) == 7
    monkeypatch.setenv(COMMAND_TIMEOUT_ENV, "inf")
    assert math.isinf(command_timeout())
    for bad in ("soon", "0", "-1", "nan"):
        monkeypatch.setenv(COMMAND_TIMEOUT_ENV, bad)
        with pytest.raises(SettingsError, match=COMMAND_TIMEOUT_ENV if bad == "soon" else "more than 0"):
            command_timeout()


def test_no_bootstrap_servers_is_one_line_with_exit_code_3_and_verbose_shows_the_traceback() -> None:
    runner = CliRunner()
    env = {"TREEFLOW_BOOTSTRAP_SERVERS": ""}
    for command in (["describe", "x"], ["signal", "x", "go"], ["tail", "x"], ["topics", "create"]):
        result = runner.invoke(main, command, env=env)
        assert result.exit_code == 3, (command, result.output)
        assert result.output.splitlines() == [result.output.strip()], result.output
        assert result.output.startswith("error: no Kafka bootstrap servers") and "TREEFLOW_BOOTSTRAP_SERVERS" \
            in result.output
    verbose = runner.invoke(main, ["--verbose", "describe", "x"], env=env)
    assert verbose.exit_code == 3
    assert "Traceback (most recent call last)" in verbose.output
    assert verbose.output.splitlines()[-1].startswith("error: no Kafka bootstrap servers")


def test_only_expected_failures_become_one_line() -> None:
    from aiokafka.errors import KafkaConnectionError

    from treeflow.cli import failure_of
    from treeflow.errors import CommandTimeoutError, ExecutionNotFoundError, WorkflowQueryError

    assert failure_of(RuntimeError("a bug")) is None  # a bug keeps its traceback
    assert failure_of(KeyError("x")) is None
    assert failure_of(ExecutionNotFoundError("gone")) == ("gone", 7)
    assert failure_of(CommandTimeoutError("late\nand long", command_id="c", delivered=True)) == ("late and long", 6)
    assert failure_of(WorkflowQueryError("no such query", "QueryNotFound")) == ("QueryNotFound: no such query", 1)
    assert failure_of(WorkflowQueryError("nobody", "WorkflowNotFound"))[1] == 7  # type: ignore[index]
    message, code = failure_of(KafkaConnectionError("down"))  # type: ignore[misc]
    assert code == 4 and message.startswith("cannot connect to Kafka")


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "treeflow.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize("command", [["describe", "some-id"], ["signal", "some-id", "go", "--root", "some-id"],
                                     ["history", "some-id"]])
def test_a_broker_that_does_not_answer_is_one_line_with_exit_code_4(command: list[str]) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = run_cli(*command, TREEFLOW_BOOTSTRAP_SERVERS=address, TREEFLOW_BROKER_PROFILE="tansu")
    assert done.returncode == 4, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr  # one line: no traceback, no
    assert done.stderr.startswith("error: cannot ") and f"Kafka at {address}" in done.stderr  # "Unclosed AIOKafkaProducer"
    assert "TREEFLOW_BOOTSTRAP_SERVERS" in done.stderr
    verbose = run_cli("--verbose", *command, TREEFLOW_BOOTSTRAP_SERVERS=address, TREEFLOW_BROKER_PROFILE="tansu")
    assert verbose.returncode == 4
    assert "Traceback (most recent call last)" in verbose.stderr and "KafkaConnectionError" in verbose.stderr
    assert "Unclosed" not in verbose.stderr


def test_a_kafka_error_met_by_the_consumer_library_names_the_address_given_on_the_command_line() -> None:
    address = f"127.0.0.1:{free_port()}"
    done = run_cli("tail", "some-root", "--json", "--bootstrap-servers", address, TREEFLOW_BOOTSTRAP_SERVERS="",
                   TREEFLOW_BROKER_PROFILE="tansu")
    assert done.returncode == 4, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith(f"error: cannot connect to Kafka at {address}")
