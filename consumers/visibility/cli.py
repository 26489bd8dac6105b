"""`treeflow list`, `treeflow count` and `treeflow visibility`: the visibility store on the command line.

Importing this module adds the three commands to the `treeflow` group
(`treeflow.consumers.cli` imports it).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import click

from treeflow.cli import bootstrap_option, main, prefix_option
from treeflow.kafka import KafkaSettings, SettingsError

from .model import STATUSES, ExecutionQuery, ExecutionRecord, Freshness, VisibilityError
from .service import VisibilityService, freshness
from .store import VISIBILITY_URL_ENV, open_store

F = TypeVar("F", bound=Callable[..., Any])

database_option = click.option(
    "--database", "database", metavar="URL",
    help=f"The visibility store: sqlite:///FILE or postgresql://... Default: ${VISIBILITY_URL_ENV}.")


def filter_options(command: F) -> F:
    for option in reversed([
        click.option("--status", "statuses", multiple=True, metavar="S",
                     help=f"Only this status (repeatable or comma-separated): {', '.join(STATUSES)}, "
                          "open (RUNNING, CONTINUED_AS_NEW) or closed."),
        click.option("--workflow", "workflow_name", metavar="NAME", help="Only executions of this workflow name."),
        click.option("--root", "root_id", metavar="ID", help="Only executions of this tree (its root id)."),
        click.option("--parent", "parent_id", metavar="ID", help="Only children of this execution."),
        click.option("--since", metavar="T",
                     help="Only executions started at or after T: an ISO 8601 time (UTC if no offset) or a "
                          "duration back from now (90s, 15m, 2h, 1d, 1w)."),
        database_option, bootstrap_option, prefix_option,
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document (rows and freshness)."),
    ]):
        command = option(command)
    return command


def fail(error: Exception) -> None:
    """`error: <message>` on one line, and the error's exit code (treeflow's convention)."""
    exception = click.ClickException(str(error))
    exception.exit_code = getattr(error, "exit_code", 1)
    raise exception


def _query(statuses: tuple[str, ...], workflow_name: str | None, root_id: str | None, parent_id: str | None,
           since: str | None, limit: int | None = None) -> ExecutionQuery:
    try:
        return ExecutionQuery.of(status=list(statuses), workflow_name=workflow_name, root_execution_id=root_id,
                                 parent_execution_id=parent_id, since=since, limit=limit)
    except VisibilityError as error:
        fail(error)
        raise  # unreachable


def _kafka(bootstrap_servers: str | None, prefix: str | None) -> KafkaSettings | None:
    try:
        return KafkaSettings.resolve(bootstrap_servers, topic_prefix=prefix)
    except SettingsError:
        return None  # the answer stands; its lag is unknown


async def _ask(database: str | None, settings: KafkaSettings | None,
               call: Callable[[Any], Any]) -> tuple[Any, Freshness]:
    async with open_store(database) as store:
        answer = await call(store)
        if settings is None:
            fresh = Freshness(applied={}, end=None, applied_at=None)
        else:
            fresh = await freshness(store, settings)
        return answer, fresh


def _run(database: str | None, settings: KafkaSettings | None, call: Callable[[Any], Any]) -> tuple[Any, Freshness]:
    try:
        return asyncio.run(_ask(database, settings, call))
    except VisibilityError as error:
        fail(error)
        raise  # unreachable
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _time(value: Any) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z") if value else "-"


def table(rows: list[ExecutionRecord]) -> list[str]:
    """The rows as aligned text columns, a header first."""
    header = ("EXECUTION ID", "WORKFLOW", "STATUS", "STARTED", "CLOSED", "PARENT", "ROOT")
    cells = [header] + [(r.execution_id, r.workflow_name, r.status, _time(r.start_time), _time(r.close_time),
                         r.parent_execution_id or "-", r.root_execution_id) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]


@click.command("list")
@filter_options
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="At most this many rows, newest start first.")
def list_command(statuses: tuple[str, ...], workflow_name: str | None, root_id: str | None, parent_id: str | None,
                 since: str | None, database: str | None, bootstrap_servers: str | None, prefix: str | None,
                 as_json: bool, limit: int) -> None:
    """List executions from the visibility store, newest first, with how fresh the answer is.

    The store is kept from the events topic by `treeflow visibility` (and by `treeflow dev`).
    The last line (on stderr) gives the lag: events in the topic the store has not applied yet.
    """
    query = _query(statuses, workflow_name, root_id, parent_id, since, limit)
    rows, fresh = _run(database, _kafka(bootstrap_servers, prefix), lambda store: store.list(query))
    if as_json:
        click.echo(json.dumps({"executions": [r.to_json() for r in rows], "freshness": fresh.to_json()}))
        return
    for line in table(rows):
        click.echo(line)
    click.echo(f"{len(rows)} execution(s); {fresh.describe()}", err=True)


@click.command("count")
@filter_options
def count_command(statuses: tuple[str, ...], workflow_name: str | None, root_id: str | None, parent_id: str | None,
                  since: str | None, database: str | None, bootstrap_servers: str | None, prefix: str | None,
                  as_json: bool) -> None:
    """Count the executions matching the filters (the same as `treeflow list`'s)."""
    query = _query(statuses, workflow_name, root_id, parent_id, since)
    count, fresh = _run(database, _kafka(bootstrap_servers, prefix), lambda store: store.count(query))
    if as_json:
        click.echo(json.dumps({"count": count, "freshness": fresh.to_json()}))
        return
    click.echo(str(count))
    click.echo(fresh.describe(), err=True)


@click.command("visibility")
@database_option
@bootstrap_option
@prefix_option
@click.option("--group-id", metavar="GROUP", help="The consumer group. Default: <prefix>.visibility.")
def visibility_command(database: str | None, bootstrap_servers: str | None, prefix: str | None,
                       group_id: str | None) -> None:
    """Keep the visibility store from the events topic until SIGINT/SIGTERM.

    Run one or more (same --group-id: they share the partitions); each execution is one
    row, updated as its events arrive. Safe to restart: events read twice change nothing.
    """
    try:
        settings = KafkaSettings.resolve(bootstrap_servers, topic_prefix=prefix)
        service = VisibilityService(database, settings=settings, group_id=group_id)
    except (SettingsError, VisibilityError) as error:
        fail(error)
        raise  # unreachable

    async def run() -> None:
        runner = asyncio.ensure_future(service.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Cancelling run() stops the subscription in order: what was read is applied and committed.
            loop.add_signal_handler(sig, runner.cancel)
        click.echo(f"treeflow visibility: {settings.topics.events} on {settings.bootstrap_servers} -> "
                   f"{service.store.url} (group {service.group_id})", err=True)
        try:
            await runner
        except asyncio.CancelledError:
            if not runner.cancelled():
                raise

    try:
        asyncio.run(run())
    except VisibilityError as error:
        fail(error)


main.add_command(list_command)
main.add_command(count_command)
main.add_command(visibility_command)
