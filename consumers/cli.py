"""`treeflow serve` and `treeflow tail`: the consumer library on the command line.

Importing this module adds both commands to the `treeflow` group (`treeflow.cli`
imports it at its end; either module may be imported first). The HTTP server and
terminal UI libraries (the `serve` extra) are imported only when a command runs,
so `treeflow --help` stays light.
"""

from __future__ import annotations

import asyncio
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
def serve(bootstrap_servers: str | None, prefix: str | None, host: str, port: int, keepalive: float,
          scan_for_roots: bool) -> None:
    """Serve workflow trees as server-sent events over HTTP until SIGINT/SIGTERM.

    \b
    GET /v1/workflows/executions/{execution_id}/stream
    GET /v1/workflows/events/stream?root_workflow_exec_id=...&workflow_event_types=...&start_seq=...
    """
    from datetime import timedelta

    try:
        from .gateway import GatewayOptions, GatewayServer, create_app
    except ImportError as error:
        _serve_extra(error)
    settings = _settings(bootstrap_servers, prefix)
    options = GatewayOptions(keepalive=timedelta(seconds=keepalive), scan_for_roots=scan_for_roots)
    server = GatewayServer(create_app(settings, options=options), host=host, port=port)

    async def run() -> None:
        from .reader import partition_count

        await partition_count(settings)  # fail now, in one line, when Kafka or the events topic is missing
        await server.start()
        click.echo(f"treeflow gateway on {server.url} streaming {settings.topics.events} "
                   f"from {settings.bootstrap_servers}", err=True)
        await server.wait_stopped()

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
