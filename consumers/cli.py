"""`treeflow serve` and `treeflow tail`: the consumer library on the command line.

Importing this module adds both commands to the `treeflow` group (`treeflow.cli`
imports it at its end; either module may be imported first). The HTTP server and
terminal UI libraries (the `serve` extra) are imported only when a command runs,
so `treeflow --help` stays light.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from typing import Any

import click

from treeflow.cli import bootstrap_option, fail_cleanly, main, prefix_option
from treeflow.kafka import KafkaSettings

#: Events shown under the tree by `treeflow tail`.
RECENT_EVENTS = 15


def _settings(bootstrap_servers: str | None, prefix: str | None) -> KafkaSettings:
    return KafkaSettings.resolve(bootstrap_servers, topic_prefix=prefix)


def _serve_extra(error: ImportError) -> None:
    fail_cleanly(ImportError(f"{error.name} is missing: pip install 'treeflow[serve]'"), exit_code=3)


@click.command()
@bootstrap_option
@prefix_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free one).")
@click.option("--keepalive", type=click.FloatRange(min=0.1), default=15.0, show_default=True, metavar="SECONDS",
              help="Send a keep-alive comment on a stream quiet for this long.")
@click.option("--scan-for-roots", is_flag=True,
              help="Find an execution's tree by reading every partition when its id does not name its root "
                   "(a full-topic read per unknown execution).")
@click.option("--database", metavar="URL",
              help="The visibility store the page and /api/executions read: sqlite:///FILE or postgresql://... "
                   "Default: $TREEFLOW_VISIBILITY_URL.")
@click.option("--run-visibility", is_flag=True,
              help="Also keep that store from the events topic in this process (as `treeflow visibility` does).")
@click.option("--group-id", metavar="GROUP",
              help="The consumer group of --run-visibility (one per store). Default: <prefix>.visibility.")
@click.option("--workflows", "workflow_modules", multiple=True, metavar="FILE_OR_MODULE",
              help="Workflows that GET /v1/workflows lists and that /v1/workflows/{name}/execute checks the name "
                   "and input of (repeatable). Default: none listed, any name started.")
@click.option("--frames", type=click.Choice(["mistral", "treeflow"]), default="mistral", show_default=True,
              help="The frames of the stream routes when a request gives no format=.")
def serve(bootstrap_servers: str | None, prefix: str | None, host: str, port: int, keepalive: float,
          scan_for_roots: bool, database: str | None, run_visibility: bool, group_id: str | None,
          workflow_modules: tuple[str, ...], frames: str) -> None:
    """Serve Mistral's Workflows API, the web page, the JSON API and workflow trees as server-sent
    events until SIGINT/SIGTERM.

    \b
    GET /v1/workflows     POST /v1/workflows/{name}/execute
    GET /v1/workflows/executions/{execution_id}[/history|/stream]
    POST /v1/workflows/executions/{execution_id}/signals|queries|updates|cancel|terminate
    POST /v1/workflows/executions/cancel|terminate      (batch)
    GET /v1/workflows/events/stream?root_workflow_exec_id=...&workflow_event_types=...&start_seq=...
    GET /v1/workflows/events/list?root_workflow_exec_id=...&limit=...&cursor=...
    GET /                 the web page: executions, a live tree, histories, signal/cancel/terminate
    GET /api/executions?status=...&workflow=...&root=...&parent=...&since=...&limit=...
    GET /api/executions/count?...   GET /api/executions/{execution_id}
    POST /api/executions/{execution_id}/signal|cancel|terminate
    """
    from datetime import timedelta

    try:
        from .gateway import GatewayOptions, GatewayServer, create_app
    except ImportError as error:
        _serve_extra(error)
    from .visibility import VisibilityError, VisibilityService

    settings = _settings(bootstrap_servers, prefix)
    options = GatewayOptions(keepalive=timedelta(seconds=keepalive), scan_for_roots=scan_for_roots, frames=frames)
    server = GatewayServer(create_app(settings, options=options, visibility_url=database,
                                      workflows=_workflows(workflow_modules)), host=host, port=port)
    try:
        service = VisibilityService(database, settings=settings, group_id=group_id) if run_visibility else None
    except VisibilityError as error:
        fail_cleanly(error)

    async def run() -> None:
        from .reader import partition_count

        await partition_count(settings)  # fail now, in one line, when Kafka or the events topic is missing
        if service is not None:
            await service.start()
        try:
            await server.start()
            click.echo(f"treeflow gateway on {server.url} streaming {settings.topics.events} "
                       f"from {settings.bootstrap_servers}", err=True)
            await server.wait_stopped()
        finally:
            if service is not None:
                await service.stop()

    asyncio.run(run())


def _workflows(targets: tuple[str, ...]) -> dict[str, Any]:
    """The workflows defined in the files or modules `targets`, by name."""
    from treeflow.definitions import collect
    from treeflow.loading import load_module

    try:
        return collect(load_module(target) for target in targets)[0]
    except (ImportError, OSError, ValueError, SyntaxError) as error:
        fail_cleanly(ValueError(f"cannot load the workflows of --workflows: {error}"), exit_code=2)


@click.command()
@bootstrap_option
@prefix_option
@click.argument("root_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON event per line instead of drawing the tree.")
@click.option("--from-cursor", metavar="CURSOR",
              help="Start after the event that carried CURSOR (exclusive). Default: the tree's first event.")
@click.option("--live", is_flag=True, help="Only events appended from now on.")
@click.option("--until-closed", is_flag=True,
              help="Exit once the root and every descendant (abandoned ones included) have closed.")
def tail(bootstrap_servers: str | None, prefix: str | None, root_id: str, as_json: bool, from_cursor: str | None,
         live: bool, until_closed: bool) -> None:
    """Follow the tree of ROOT_ID: draw its executions with their status, and its events as they arrive."""
    from .subscription import TreeSubscription

    if live and from_cursor:
        raise click.UsageError("--live and --from-cursor exclude each other")
    settings = _settings(bootstrap_servers, prefix)
    subscription = TreeSubscription(root_id, settings=settings, cursor=from_cursor, from_beginning=not live,
                                    until_closed=until_closed, track_tree=not as_json)
    asyncio.run(_print_json(subscription) if as_json else _draw(subscription))


async def _print_json(subscription: Any) -> None:
    async with subscription:
        async for event in subscription:
            click.echo(event.to_json())


async def _draw(subscription: Any) -> None:
    try:
        from rich.console import Console
        from rich.live import Live

        from .tui import screen
    except ImportError as error:
        _serve_extra(error)
    recent: deque[Any] = deque(maxlen=RECENT_EVENTS)
    async with subscription:
        with Live(screen(subscription.tree, recent), console=Console(), refresh_per_second=10,
                  auto_refresh=False) as live:
            async for event in subscription:
                recent.append(event)
                live.update(screen(subscription.tree, recent), refresh=True)
            live.update(screen(subscription.tree, recent, closed=subscription.tree.closed), refresh=True)


main.add_command(serve)
main.add_command(tail)


def _exit_with(error: Exception, code: int) -> None:
    failure = click.ClickException(str(error))
    failure.exit_code = code
    raise failure


@click.command("export")
@bootstrap_option
@prefix_option
@click.option("--format", "format_", type=click.Choice(["parquet", "jsonl"]), default="parquet", show_default=True,
              help="Parquet (needs the `export` extra: pyarrow) or JSON lines.")
@click.option("--output", "-o", required=True, metavar="PATH",
              help="The file to write (refused if it exists); `-` writes JSON lines to stdout.")
@click.option("--since", metavar="CURSOR",
              help="Continue where the export that printed CURSOR stopped. Default: from the beginning.")
@click.option("--root", metavar="ROOT_ID", help="Only the events of this tree (read from its partition only).")
@click.option("--cursor-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Read --since from FILE when it exists (and --since is not given); write the new cursor there "
                   "once the export is complete.")
def export(bootstrap_servers: str | None, prefix: str | None, format_: str, output: str, since: str | None,
           root: str | None, cursor_file: str | None) -> None:
    """Write the events topic as a table, one row per event, up to its end as it is now.

    Prints the cursor to pass as --since to the next export (which then continues
    exactly where this one stopped) as the last line on stderr.
    """
    from pathlib import Path

    from aiokafka.errors import KafkaError

    from .export import ExportError, export_events

    settings = _settings(bootstrap_servers, prefix)
    if since is None and cursor_file is not None and Path(cursor_file).exists():
        since = Path(cursor_file).read_text().strip()

    def progress(done: int, total: int) -> None:
        click.echo(f"export: {done:,} of {total:,} records read ({100 * done // max(total, 1)}%)", err=True)

    try:
        report = asyncio.run(export_events(settings, output, format=format_,  # type: ignore[arg-type]
                                           since=since, root=root, progress=progress))
    except ExportError as error:
        _exit_with(error, error.exit_code)
    except LookupError as error:
        _exit_with(error, 5)
    except KafkaError as error:
        _exit_with(ValueError(f"Kafka at {settings.bootstrap_servers}: {error}"), 4)
    except OSError as error:
        _exit_with(error, 1)
    except KeyboardInterrupt:
        sys.exit(130)
    where = "stdout" if output == "-" else output
    skipped = f" ({report.undecodable} undecodable records skipped, see the log)" if report.undecodable else ""
    click.echo(f"export: {report.rows:,} events written to {where}{skipped}", err=True)
    if cursor_file is not None:
        partial = Path(cursor_file).with_name(f".{Path(cursor_file).name}.partial")
        partial.write_text(f"{report.cursor}\n")
        partial.replace(cursor_file)
    click.echo(f"next: --since {report.cursor}", err=True)


main.add_command(export)

# `treeflow list`, `count` and `visibility` register themselves the same way.
import treeflow.consumers.visibility.cli  # noqa: E402,F401
