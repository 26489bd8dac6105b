"""The `treeflow` command line."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import click

from treeflow.kafka import (
    BrokerError,
    EmbeddedBroker,
    KafkaSettings,
    SettingsError,
    TopicConflictError,
    kafka_or_embedded,
)
from treeflow.kafka.settings import BOOTSTRAP_ENV, PARTITIONS_ENV, PREFIX_ENV, REPLICATION_ENV

bootstrap_option = click.option(
    "--bootstrap-servers", metavar="HOST:PORT[,...]",
    help=f"Kafka to use. Default: ${BOOTSTRAP_ENV}.")
prefix_option = click.option(
    "--prefix", metavar="PREFIX", help=f"Topic name prefix. Default: ${PREFIX_ENV} or 'treeflow'.")
partitions_option = click.option(
    "--partitions", type=click.IntRange(min=1),
    help=f"Partitions of every treeflow topic. Default: ${PARTITIONS_ENV} or 12.")


def fail_cleanly(error: Exception) -> None:
    raise click.ClickException(str(error))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
@click.version_option(package_name="treeflow")
def main(verbose: bool) -> None:
    """treeflow: durable workflows whose source of truth is a keyed Kafka topic."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.group()
def topics() -> None:
    """Administer treeflow's topics."""


@topics.command("create")
@bootstrap_option
@prefix_option
@partitions_option
@click.option("--replication-factor", type=click.IntRange(min=1),
              help=f"Default: ${REPLICATION_ENV}, else 3 (or the broker count when smaller).")
@click.option("--task-queue", "task_queues", multiple=True, metavar="QUEUE",
              help="Create <prefix>.tasks.QUEUE too (repeatable). Default: 'default'.")
def topics_create(bootstrap_servers: str | None, prefix: str | None, partitions: int | None,
                  replication_factor: int | None, task_queues: tuple[str, ...]) -> None:
    """Create the commands, events and tasks topics; safe to run again.

    Fails, changing nothing, when an existing topic has another partition count.
    """
    from treeflow.kafka import ensure_topics

    try:
        settings = KafkaSettings.resolve(bootstrap_servers, topic_prefix=prefix, partitions=partitions,
                                         replication_factor=replication_factor)
        report = asyncio.run(ensure_topics(settings, task_queues or ("default",)))
    except (SettingsError, TopicConflictError) as error:
        fail_cleanly(error)
    for spec in report.specs:
        state = "created" if spec.name in report.created else "exists"
        configs = ", ".join(f"{k}={v}" for k, v in spec.configs.items())
        click.echo(f"{state:8} {spec.name}  partitions={spec.partitions} "
                   f"replication={spec.replication_factor}  {configs}")


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), help="Port on 127.0.0.1. Default: a free one.")
def broker(port: int | None) -> None:
    """Run the embedded (in-memory) broker until interrupted."""
    try:
        with EmbeddedBroker(port=port) as running:
            click.echo(f"embedded broker on {running.bootstrap_servers} (log: {running.log_path})")
            for name, value in running.environment().items():
                click.echo(f"export {name}={value}")
            stop = asyncio.Event()

            async def wait() -> None:
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()

            asyncio.run(wait())
    except BrokerError as error:
        fail_cleanly(error)
    click.echo("stopped")


@main.command()
@prefix_option
@partitions_option
def demo(prefix: str | None, partitions: int | None) -> None:
    """Write sample trees of events and print them back, grouped by tree.

    Uses ${TREEFLOW_BOOTSTRAP_SERVERS} when set, else starts the embedded broker.
    """
    from treeflow.demo import run_demo

    options: dict[str, Any] = {"topic_prefix": prefix, "partitions": partitions}
    try:
        with kafka_or_embedded(**options) as settings:
            asyncio.run(run_demo(settings, click.echo))
    except (BrokerError, SettingsError, TopicConflictError) as error:
        fail_cleanly(error)


if __name__ == "__main__":
    main()
