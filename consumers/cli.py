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
from treeflow.kafka import KafkaSettings, SettingsError

from .cursor import CursorError

#: Events shown under the tree by `treeflow tail`.
RECENT_EVENTS = 15


def _settings(bootstrap_servers: str | None, prefix: str | None) -> KafkaSettings:
    try:
        return KafkaSettings.resolve(bootstrap_servers, topic_prefix=prefix)
    except SettingsError as error:
        fail_cleanly(error)
        raise  # unreachable: fail_cleanly raises


def _serve_extra(error: ImportError) -> None:
    fail_cleanly(ImportError(f"{error.name} is missing: pip install 'treeflow[serve]'"))


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
def serve(bootstrap_servers: str | None, prefix: str | None, host: str, port: int, keepalive: float,
          scan_for_roots: bool, database: str | None, run_visibility: bool, group_id: str | None) -> None:
    """Serve the web page, the JSON API and workflow trees as server-sent events until SIGINT/SIGTERM.

    \b
    GET /                 the web page: executions, a live tree, histories, signal/cancel/terminate
    GET /api/executions?status=...&workflow=...&root=...&parent=...&since=...&limit=...
    GET /api/executions/count?...   GET /api/executions/{execution_id}
    POST /api/executions/{execution_id}/signal|cancel|terminate
    GET /v1/workflows/executions/{execution_id}/stream
    GET /v1/workflows/events/stream?root_workflow_exec_id=...&workflow_event_types=...&start_seq=...
    """
    from datetime import timedelta

    try:
        from .gateway import GatewayOptions, GatewayServer, create_app
    except ImportError as error:
        _serve_extra(error)
    from .visibility import VisibilityError, VisibilityService

    settings = _settings(bootstrap_servers, prefix)
    options = GatewayOptions(keepalive=timedelta(seconds=keepalive), scan_for_roots=scan_for_roots)
    server = GatewayServer(create_app(settings, options=options, visibility_url=database), host=host, port=port)
    try:
        service = VisibilityService(database, settings=settings, group_id=group_id) if run_visibility else None
    except VisibilityError as error:
        fail_cleanly(error)

    async def run() -> None:
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
        fail_cleanly(click.UsageError("--live and --from-cursor exclude each other"))
    settings = _settings(bootstrap_servers, prefix)
    subscription = TreeSubscription(root_id, settings=settings, cursor=from_cursor, from_beginning=not live,
                                    until_closed=until_closed, track_tree=not as_json)
    try:
        asyncio.run(_print_json(subscription) if as_json else _draw(subscription))
    except CursorError as error:
        fail_cleanly(error)
    except LookupError as error:
        fail_cleanly(error)
    except KeyboardInterrupt:
        sys.exit(130)


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

# `treeflow list`, `count` and `visibility` register themselves the same way.
import treeflow.consumers.visibility.cli  # noqa: E402,F401
