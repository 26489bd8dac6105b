import click
import pytest
from click.testing import CliRunner

from treeflow.cli import main


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += all_commands(command, prefix + (name,))
        else:
            found.append(prefix + (name,))
    return found


COMMANDS = all_commands(main)


def test_the_expected_commands_exist() -> None:
    assert {("topics", "create"), ("broker",), ("demo",)} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "treeflow")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")
    assert len(result.output.splitlines()) > 3


def test_topics_create_without_a_broker_says_how_to_name_one() -> None:
    result = CliRunner().invoke(main, ["topics", "create"], env={"TREEFLOW_BOOTSTRAP_SERVERS": ""})
    assert result.exit_code == 3  # configuration
    assert "no Kafka bootstrap servers" in result.output and "TREEFLOW_BOOTSTRAP_SERVERS" in result.output
