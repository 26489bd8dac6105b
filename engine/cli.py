"""The `treeflow` command line.

An expected failure (no broker, no processor, bad settings, unknown execution...)
ends a command with ONE line on stderr, `error: <what is wrong and what to do>`, and
the exit code of README.md's table; `--verbose` prints the traceback too. The group
class `TreeflowGroup` does that for every command, `serve` and `tail` included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import traceback
from typing import Any, NoReturn

import click

from treeflow.consumers.cursor import CursorError
from treeflow.errors import TreeflowError, WorkflowQueryError
from treeflow.kafka.errors import from_kafka_error
from treeflow.kafka import BrokerError, EmbeddedBroker, KafkaSettings, SettingsError, TopicConflictError
from treeflow.kafka.profile import PROFILE_ENV
from treeflow.kafka.settings import BOOTSTRAP_ENV, PARTITIONS_ENV, PREFIX_ENV, REPLICATION_ENV

#: Commands that run until stopped: they keep aiokafka's warnings (a lost connection, say).
LONG_RUNNING = frozenset({"broker", "demo", "dev", "processor", "worker", "serve"})
#: Exit codes of the errors raised outside treeflow's own classes (these have `exit_code`).
INTERRUPTED = 130
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (SettingsError, 3), (TopicConflictError, 3), (BrokerError, 4), (CursorError, 2), (TimeoutError, 6),
)

def _remember_bootstrap(ctx: click.Context, _: click.Parameter, value: str | None) -> str | None:
    if value:
        ctx.meta["treeflow.bootstrap_servers"] = value  # named by a Kafka error's one line
    return value


bootstrap_option = click.option(
    "--bootstrap-servers", metavar="HOST:PORT[,...]", callback=_remember_bootstrap,
    help=f"Kafka to use. Default: ${BOOTSTRAP_ENV}.")
prefix_option = click.option(
    "--prefix", metavar="PREFIX", help=f"Topic name prefix. Default: ${PREFIX_ENV} or 'treeflow'.")
partitions_option = click.option(
    "--partitions", type=click.IntRange(min=1),
    help=f"Partitions of every treeflow topic. Default: ${PARTITIONS_ENV} or 12.")

metrics_port_option = click.option(
    "--metrics-port", type=click.IntRange(0, 65535), metavar="PORT",
    help="Serve /metrics, /healthz and /readyz on PORT (0: a free one). Default: $TREEFLOW_METRICS_PORT, else none.")

root_option = click.option(
    "--root", metavar="ROOT_ID",
    help="The tree's root execution id (a top-level execution is its own). Default: looked up in the events topic.")


class CommandFailed(TreeflowError):
    """Ends a command with its message and `exit_code` (see `fail_cleanly`)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def failure_of(error: BaseException, bootstrap_servers: str | None = None) -> tuple[str, int] | None:
    """The one-line message and exit code of an expected failure; None for a bug."""
    from aiokafka.errors import KafkaError

    if isinstance(error, KafkaError):
        address = bootstrap_servers or os.environ.get(BOOTSTRAP_ENV) or "the configured address"
        error = from_kafka_error(error, address, os.environ.get(PROFILE_ENV, "kafka"))
    message = " ".join(str(error).split()) or type(error).__name__  # one line
    if isinstance(error, WorkflowQueryError):
        message = f"{error.type}: {message}"
    code = getattr(error, "exit_code", None)
    if isinstance(code, int):
        return message, code
    for kind, code in _EXIT_CODES:
        if isinstance(error, kind):
            return message, code
    if type(error) is LookupError:  # the consumer library's "topic ... does not exist" (not a KeyError)
        return message, 5
    return None


def fail_cleanly(error: BaseException, exit_code: int | None = None) -> NoReturn:
    """End the command with `error` as one `error: ...` line (the exit code: `exit_code`,
    else the error's)."""
    if isinstance(error, click.ClickException):
        raise error
    found = failure_of(error)
    message = found[0] if found else str(error)
    raise CommandFailed(message, exit_code or (found[1] if found else 1)) from error


class TreeflowGroup(click.Group):
    """A click group whose commands end an expected failure with one line and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except Exception as error:
            found = failure_of(error, ctx.meta.get("treeflow.bootstrap_servers"))
            if found is None:
                raise  # not an expected failure: a bug, with its traceback
            if ctx.find_root().params.get("verbose"):
                traceback.print_exception(error)
            click.echo(f"error: {found[0]}", err=True)
            ctx.exit(found[1])


@click.group(cls=TreeflowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level; print the traceback of a failure.")
@click.version_option(package_name="treeflow")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """treeflow: durable workflows whose source of truth is a keyed Kafka topic."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose and ctx.invoked_subcommand not in LONG_RUNNING:
        # A short command reports a Kafka failure as its one `error:` line; aiokafka's own
        # log lines about it would only repeat it.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


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

    settings = KafkaSettings.resolve(bootstrap_servers, topic_prefix=prefix, partitions=partitions,
                                     replication_factor=replication_factor)
    report = asyncio.run(ensure_topics(settings, task_queues or ("default",)))
    for spec in report.specs:
        state = "created" if spec.name in report.created else "exists"
        configs = ", ".join(f"{k}={v}" for k, v in spec.configs.items())
        click.echo(f"{state:8} {spec.name}  partitions={spec.partitions} "
                   f"replication={spec.replication_factor}  {configs}")


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), help="Port on 127.0.0.1. Default: a free one.")
def broker(port: int | None) -> None:
    """Run the embedded (in-memory) broker until interrupted."""
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
    click.echo("stopped")


@main.command()
def demo() -> None:
    """Run the seed's parent -> child -> activity example and print its event history.

    Uses ${TREEFLOW_BOOTSTRAP_SERVERS} when set, else starts the embedded broker.
    """
    from treeflow.dev import run_demo

    asyncio.run(run_demo(click.echo))


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--serve", is_flag=True, help="Keep running after main() returns (until Ctrl-C).")
@click.option("--http-port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Also serve the HTTP API there (Mistral's Workflows API, the JSON API, the web page, the "
                   "event streams; 0: any free port) and print its URL.")
@click.option("--http-host", default="127.0.0.1", show_default=True, help="Address the HTTP API listens on.")
def dev(file: str, serve: bool, http_port: int | None, http_host: str) -> None:
    """Run FILE's workflows and activities on a local engine, then its `async def main()`.

    Starts the embedded broker unless ${TREEFLOW_BOOTSTRAP_SERVERS} is set, creates
    the topics, runs the processor hosting every workflow and activity defined in
    FILE, and exports TREEFLOW_BOOTSTRAP_SERVERS so that `execute_workflow`,
    clients and consumers in main() need no set-up. With --http-port it also serves
    `treeflow serve`'s HTTP API (e.g. for the `mistralai` client: Mistral(server_url=URL)).
    """
    from treeflow.dev import run_file
    from treeflow.loading import load_module

    module = load_module(file)
    if http_port is not None:
        try:
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as error:
            fail_cleanly(ImportError(f"{error.name} is missing: pip install 'treeflow[serve]'"), exit_code=3)
    asyncio.run(run_file(module, serve, click.echo, http_port=http_port, http_host=http_host))


@main.command()
@bootstrap_option
@click.option("--module", "-m", "modules", multiple=True, required=True, metavar="FILE_OR_MODULE",
              help="A .py file or module whose workflows and activities this worker runs (repeatable).")
@click.option("--task-queue", "-q", "task_queues", multiple=True, metavar="QUEUE",
              help="Task queue to serve (repeatable). Default: 'default'.")
@click.option("--max-concurrent-activities", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--eager-activities/--no-eager-activities", default=True, show_default=True,
              help="Run the first attempt of an activity a workflow task schedules on a queue this worker serves "
                   "at once (Temporal's eager activity execution).")
@click.option("--eager-continuations/--no-eager-continuations", default=True, show_default=True,
              help="Send an eager attempt's completion with the decisions of the workflow task it causes "
                   "(README, \"Eager continuations\").")
@metrics_port_option
def worker(bootstrap_servers: str | None, modules: tuple[str, ...], task_queues: tuple[str, ...],
           max_concurrent_activities: int, eager_activities: bool, eager_continuations: bool,
           metrics_port: int | None) -> None:
    """Run workflow and activity tasks from task queues until SIGTERM (then finish or hand back)."""
    from treeflow.definitions import collect
    from treeflow.loading import load_module
    from treeflow.observability.http import Health, KafkaProbe
    from treeflow.worker.worker import Worker

    workflows, activities = collect(load_module(target) for target in modules)
    settings = KafkaSettings.resolve(bootstrap_servers)
    running = Worker(settings, workflows, activities, task_queues or ("default",),
                     max_concurrent_activities=max_concurrent_activities, eager_activities=eager_activities,
                     eager_continuations=eager_continuations)
    click.echo(f"worker: {len(workflows)} workflow(s), {len(activities)} activity(ies) on "
               f"{list(task_queues or ('default',))} via {settings.bootstrap_servers}", err=True)

    async def run() -> None:
        probe = KafkaProbe(settings, [settings.topics.commands, *map(settings.topics.tasks, running.task_queues)])
        health = Health([running.liveness], [running.readiness], probe)
        server = await _serve_observability(metrics_port, health, "worker")
        try:
            await running.run_until_signalled()
        except BaseException:
            with contextlib.suppress(Exception):
                await running.stop(grace=0)  # close the Kafka clients that did start
            raise
        finally:
            if server is not None:
                await server.stop()

    asyncio.run(run())


async def _serve_observability(port: int | None, health: Any, what: str) -> Any:
    from treeflow.observability.http import serve_observability

    try:
        server = await serve_observability(port, health)
    except (ValueError, OSError) as error:
        fail_cleanly(ValueError(f"cannot serve metrics: {error}"))
    if server is not None:
        click.echo(f"{what}: metrics and health on {server.url}/metrics, /healthz, /readyz", err=True)
    return server


@main.command()
@bootstrap_option
@click.option("--module", "-m", "modules", multiple=True, metavar="FILE_OR_MODULE",
              help="Also run these workflows and activities inside the processor (repeatable).")
@click.option("--task-queue", "-q", "task_queues", multiple=True, metavar="QUEUE",
              help="Queues whose tasks run inside the processor (with --module). Default: 'default'.")
@metrics_port_option
def processor(bootstrap_servers: str | None, modules: tuple[str, ...], task_queues: tuple[str, ...],
              metrics_port: int | None) -> None:
    """Run the stream processor until SIGTERM.

    With --module, the processor also runs those workflows and activities itself for
    the given queues: no task round trip through Kafka (the fastest set-up).
    """
    from treeflow.definitions import collect
    from treeflow.loading import load_module
    from treeflow.observability.http import Health, KafkaProbe
    from treeflow.processor.app import Processor
    from treeflow.worker.runner import TaskRunner

    settings = KafkaSettings.resolve(bootstrap_servers)
    runner = None
    if modules:
        workflows, activities = collect(load_module(target) for target in modules)
        runner = TaskRunner(workflows, activities)

    async def run() -> None:
        from treeflow.kafka import ensure_topics

        await ensure_topics(settings, task_queues or ("default",))
        running = Processor(settings, runner=runner, local_queues=task_queues or ("default",))
        topics = settings.topics
        probe = KafkaProbe(settings, [topics.commands, topics.events, topics.replies])
        health = Health([running.liveness], [running.readiness], probe)
        server = await _serve_observability(metrics_port, health, "processor")
        try:
            await running.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await running.stop()  # close the Kafka clients that did start
            if server is not None:
                await server.stop()
            raise
        click.echo(f"processor: consuming {settings.topics.commands} on {settings.bootstrap_servers}", err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await asyncio.wait([asyncio.ensure_future(stop.wait()), asyncio.ensure_future(running.halted.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        await running.stop()
        if server is not None:
            await server.stop()
        if running.failed is not None:
            raise running.failed

    asyncio.run(run())


@main.command()
@bootstrap_option
@click.argument("execution_id")
@root_option
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
def history(bootstrap_servers: str | None, execution_id: str, root: str | None, as_json: bool) -> None:
    """Print an execution's event history."""
    from treeflow.dev import summarize
    from treeflow.errors import ExecutionNotFoundError

    events = asyncio.run(_with_client(bootstrap_servers, lambda c: c.history(execution_id, root_execution_id=root)))
    if not events:
        raise ExecutionNotFoundError(f"no events for {execution_id} in the tree of {root or execution_id} "
                                     "(check the id and --root)")
    for event in events:
        if as_json:
            click.echo(event.model_dump_json())
        else:
            click.echo(f"#{event.sequence:<4} {event.timestamp.isoformat()} {event.event_type.value}  "
                       f"{summarize(event)}")


@main.command()
@bootstrap_option
@click.argument("execution_id")
@root_option
@click.option("--tree", is_flag=True,
              help="Print the whole tree that holds EXECUTION_ID (usually its root), indented, with statuses.")
def describe(bootstrap_servers: str | None, execution_id: str, root: str | None, tree: bool) -> None:
    """Print an execution's status, run, parent, root and what it waits on.

    With --tree, print every execution of its tree instead, one per line, each
    child indented under its parent: id, workflow name, status.
    """
    async def call(client: Any) -> Any:
        if tree:
            return await client.describe_tree(execution_id, root_execution_id=root)
        return await client.describe(execution_id, root_execution_id=root)

    found = asyncio.run(_with_client(bootstrap_servers, call))
    if tree:
        for line in tree_lines(found):
            click.echo(line)
        return
    for name, value in vars(found).items():
        if value in (None, []):
            continue
        if hasattr(value, "message"):  # a Failure
            value = f"{value.type}: {value.message}"
        click.echo(f"{name:20} {value.value if hasattr(value, 'value') else value}")


def tree_lines(executions: list[Any]) -> list[str]:
    """One line per execution, children indented (two spaces a level) under their parent."""
    children: dict[str | None, list[Any]] = {}
    ids = {e.execution_id for e in executions}
    for execution in executions:
        parent = execution.parent_execution_id if execution.parent_execution_id in ids else None
        children.setdefault(parent, []).append(execution)
    lines: list[str] = []

    def add(parent: str | None, depth: int) -> None:
        for execution in children.get(parent, []):
            stuck = execution.workflow_task_failure_cause
            lines.append(f"{'  ' * depth}{execution.execution_id}  {execution.workflow_name}  "
                         f"{execution.status.value}" + (f"  (workflow task failing: {stuck})" if stuck else ""))
            add(execution.execution_id, depth + 1)

    add(None, 0)
    return lines


command_timeout_option = click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
    help="How long to wait for the processor's answer. Default: $TREEFLOW_COMMAND_TIMEOUT or 30.")

input_option = click.option("--input", "input_json", metavar="JSON",
                            help="The payload, as JSON text (e.g. '{\"name\": \"x\"}' or '3').")


def parse_input(input_json: str | None) -> Any:
    import json

    if input_json is None:
        return None
    try:
        return json.loads(input_json)
    except ValueError as error:
        raise click.BadParameter(f"not JSON: {error}", param_hint="--input") from None


@main.command("signal")
@bootstrap_option
@click.argument("execution_id")
@click.argument("name")
@input_option
@root_option
@command_timeout_option
def signal_command(bootstrap_servers: str | None, execution_id: str, name: str, input_json: str | None,
                   root: str | None, timeout: float | None) -> None:
    """Send signal NAME to any execution (root, child, grandchild).

    Returns once the signal is in the execution's history; fails if it is closed,
    or when no processor answered within --timeout (the signal may still be applied later).
    """
    payload = parse_input(input_json)
    on_handle(bootstrap_servers, execution_id, root, lambda handle: handle.signal(name, payload, timeout=timeout))
    click.echo(f"signal {name} sent to {execution_id}")


@main.command("query")
@bootstrap_option
@click.argument("execution_id")
@click.argument("name")
@input_option
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              metavar="SECONDS", help="How long to wait for a worker's answer.")
@root_option
def query_command(bootstrap_servers: str | None, execution_id: str, name: str, input_json: str | None,
                  timeout: float, root: str | None) -> None:
    """Ask query NAME of a running execution and print the answer as JSON.

    Fails, saying why, when the workflow has no such query, the handler raised, the
    execution is closed or unknown, or no worker answered within --timeout.
    """
    import json

    payload = parse_input(input_json)
    answer = on_handle(bootstrap_servers, execution_id, root,
                       lambda handle: handle.query(name, payload, timeout=timeout))
    click.echo(json.dumps(answer))


@main.command("update")
@bootstrap_option
@click.argument("execution_id")
@click.argument("name")
@input_option
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="How long to wait for the result. Default: as long as the handler runs.")
@root_option
def update_command(bootstrap_servers: str | None, execution_id: str, name: str, input_json: str | None,
                   timeout: float | None, root: str | None) -> None:
    """Run update NAME of a running execution and print its result as JSON.

    --input is the handler's input: the value of its one parameter, or a JSON object of
    its parameters by name. Fails (exit 1), saying why, when the workflow has no such
    update, its validator rejected it (nothing is recorded), the handler raised, or the
    execution is closed or unknown.
    """
    import json

    from treeflow.errors import WorkflowUpdateError

    payload = parse_input(input_json)
    args = () if payload is None else (payload,)
    try:
        answer = on_handle(bootstrap_servers, execution_id, root,
                           lambda handle: handle.update(name, *args, timeout=timeout))
    except WorkflowUpdateError as error:
        fail_cleanly(RuntimeError(f"{error.type}: {error}"))
    click.echo(json.dumps(answer))


@main.command("replay")
@bootstrap_option
@click.option("--module", "-m", "modules", multiple=True, required=True, metavar="FILE_OR_MODULE",
              help="A .py file or module holding the workflows to check (repeatable).")
@click.option("--file", "-f", "files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              metavar="HISTORY.jsonl", help="A history as `treeflow history ID --json` prints it (repeatable).")
@click.argument("execution_ids", nargs=-1, metavar="[EXECUTION_ID]...")
@root_option
def replay_command(bootstrap_servers: str | None, modules: tuple[str, ...], files: tuple[str, ...],
                   execution_ids: tuple[str, ...], root: str | None) -> None:
    """Replay recorded histories against the workflows of --module, to check that changed
    code still accounts for them (run it in CI before a deploy).

    Histories come from --file or, by EXECUTION_ID, from the events topic. Prints one
    line per run and exits 1 at the first mismatch it found (named on its line), 0 when
    every run replays.
    """
    from treeflow.loading import load_module
    from treeflow.replay import Replayer, read_history

    if not files and not execution_ids:
        raise click.UsageError("give an EXECUTION_ID or --file HISTORY.jsonl")
    replayer = Replayer(modules=[load_module(target) for target in modules])
    histories: list[list[Any]] = []
    for path in files:
        try:
            histories.append(list(read_history(path)))
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--file") from None
    for execution_id in execution_ids:
        events = asyncio.run(_with_client(bootstrap_servers,
                                          lambda c, e=execution_id: c.history(e, root_execution_id=root)))
        if not events:
            fail_cleanly(LookupError(f"no events for {execution_id} in the tree of {root or execution_id}"))
        histories.append(events)
    results = [result for events in histories for result in replayer.replay(events, raise_on_failure=False)]
    for result in results:
        click.echo(str(result))
    failed = [result for result in results if not result.ok]
    if failed:
        raise click.exceptions.Exit(1)
    click.echo(f"{len(results)} run(s) replayed without a mismatch")


@main.command("cancel")
@bootstrap_option
@click.argument("execution_id")
@click.option("--reason", default="canceled from the command line", show_default=True)
@root_option
@command_timeout_option
def cancel_command(bootstrap_servers: str | None, execution_id: str, reason: str, root: str | None,
                   timeout: float | None) -> None:
    """Request the cancellation of any execution.

    Its code gets asyncio.CancelledError at its current await, may clean up, and ends
    CANCELED; the cancel reaches the activities and children it awaits.
    """
    on_handle(bootstrap_servers, execution_id, root, lambda handle: handle.cancel(reason, timeout=timeout))
    click.echo(f"cancel requested for {execution_id}")


@main.command("terminate")
@bootstrap_option
@click.argument("execution_id")
@click.option("--reason", default="terminated from the command line", show_default=True)
@root_option
@command_timeout_option
def terminate_command(bootstrap_servers: str | None, execution_id: str, reason: str, root: str | None,
                      timeout: float | None) -> None:
    """Terminate any execution at once.

    It ends TERMINATED with --reason and no workflow code runs; its open children get
    their parent close policy.
    """
    on_handle(bootstrap_servers, execution_id, root, lambda handle: handle.terminate(reason, timeout=timeout))
    click.echo(f"terminated {execution_id}")


def on_handle(bootstrap_servers: str | None, execution_id: str, root: str | None, call: Any) -> Any:
    """`await call(handle)` on a handle of the execution (a failure ends the command:
    `TreeflowGroup`)."""
    return asyncio.run(_with_client(bootstrap_servers, lambda client: call(
        client.get_handle(execution_id, root_execution_id=root))))


async def _with_client(bootstrap_servers: str | None, call: Any) -> Any:
    from treeflow.client import Client

    client = await Client.connect(bootstrap_servers)
    try:
        return await call(client)
    finally:
        await client.close()


# ---------------------------------------------------------------- schedules (README "Schedules")

@main.group("schedule")
def schedule_group() -> None:
    """Create and manage durable schedules (the processor's clock starts their workflows)."""


def _overlap(value: str | None) -> Any:
    from treeflow.schedules import ScheduleOverlapPolicy

    return None if value is None else ScheduleOverlapPolicy(value.upper().replace("-", "_"))


overlap_choice = click.Choice(["skip", "buffer_one", "allow_all"], case_sensitive=False)


@schedule_group.command("create")
@bootstrap_option
@click.argument("schedule_id")
@click.argument("workflow_name")
@click.option("--cron", "crons", multiple=True, metavar="EXPR",
              help="A cron expression, e.g. '*/5 * * * *' (5 fields; 6 with seconds last; repeatable).")
@click.option("--every", "intervals", multiple=True, metavar="DURATION",
              help="An interval, e.g. 2s, 5m, 1h30m, PT10S (repeatable; ticks at multiples of it since the epoch).")
@click.option("--offset", default="0s", show_default=True, metavar="DURATION", help="Shift of the --every ticks.")
@click.option("--jitter", default="0s", show_default=True, metavar="DURATION",
              help="Each tick fires up to this much after its time.")
@click.option("--time-zone", metavar="IANA_NAME", help="Time zone of the cron expressions. Default: UTC.")
@click.option("--overlap", type=overlap_choice, default="skip", show_default=True,
              help="What a tick does while the previous run is open.")
@click.option("--catchup-window", default="365d", show_default=True, metavar="DURATION",
              help="After an outage, the most recent missed tick fires if at most this old.")
@click.option("--task-queue", metavar="QUEUE", help="The runs' task queue. Default: 'default'.")
@click.option("--execution-timeout", metavar="DURATION", help="Bound of each run. Default: none.")
@click.option("--paused", is_flag=True, help="Create it paused.")
@click.option("--note", metavar="TEXT")
@input_option
@command_timeout_option
def schedule_create(bootstrap_servers: str | None, schedule_id: str, workflow_name: str, crons: tuple[str, ...],
                    intervals: tuple[str, ...], offset: str, jitter: str, time_zone: str | None, overlap: str,
                    catchup_window: str, task_queue: str | None, execution_timeout: str | None, paused: bool,
                    note: str | None, input_json: str | None, timeout: float | None) -> None:
    """Create schedule SCHEDULE_ID starting WORKFLOW_NAME (with --input) at each tick.

    Each run's execution id is SCHEDULE_ID.<nominal time, UTC> (e.g. nightly.20261201T030000Z).
    """
    from treeflow.schedules import SchedulePolicy, ScheduleIntervalSpec, ScheduleSpec, parse_duration

    if not crons and not intervals:
        raise click.UsageError("give at least one --cron or --every")
    params = parse_input(input_json)
    spec = ScheduleSpec(cron=list(crons), intervals=[ScheduleIntervalSpec(every, offset) for every in intervals],
                        jitter=jitter, time_zone=time_zone)
    spec.to_record()  # bad input fails here (exit 2), before any connection
    parse_duration(catchup_window)
    policy = SchedulePolicy(overlap=_overlap(overlap), catchup_window=catchup_window)
    run_timeout = parse_duration(execution_timeout) if execution_timeout else None
    handle = asyncio.run(_with_client(bootstrap_servers, lambda client: client.create_schedule(
        schedule_id, workflow_name, params, spec=spec, policy=policy, task_queue=task_queue,
        execution_timeout=run_timeout, paused=paused, note=note, timeout=timeout)))
    click.echo(f"schedule {handle.id} created")


@schedule_group.command("list")
@bootstrap_option
@click.option("--workflow", "workflow_name", metavar="NAME", help="Only the schedules of this workflow.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@command_timeout_option
def schedule_list(bootstrap_servers: str | None, workflow_name: str | None, as_json: bool,
                  timeout: float | None) -> None:
    """List every schedule: id, workflow, state, next fire time, runs started."""
    import json

    found = asyncio.run(_with_client(bootstrap_servers, lambda client: client.list_schedules(
        workflow_name=workflow_name, timeout=timeout)))
    for description in found:
        if as_json:
            click.echo(json.dumps(description.raw))
            continue
        state = "paused" if description.paused else "active"
        upcoming = description.next_fire_at.isoformat() if description.next_fire_at else "-"
        click.echo(f"{description.schedule_id}  {description.workflow_name}  {state}  next {upcoming}  "
                   f"fired {description.fired}  skipped {description.skipped}")


@schedule_group.command("describe")
@bootstrap_option
@click.argument("schedule_id")
@command_timeout_option
def schedule_describe(bootstrap_servers: str | None, schedule_id: str, timeout: float | None) -> None:
    """Print a schedule as JSON: spec, policy, state, next fire times, recent runs."""
    import json

    description = asyncio.run(_with_client(bootstrap_servers, lambda client: client.get_schedule_handle(
        schedule_id).describe(timeout=timeout)))
    click.echo(json.dumps(description.raw, indent=2))


def _on_schedule(bootstrap_servers: str | None, schedule_id: str, call: Any) -> Any:
    return asyncio.run(_with_client(bootstrap_servers, lambda client: call(client.get_schedule_handle(schedule_id))))


@schedule_group.command("pause")
@bootstrap_option
@click.argument("schedule_id")
@click.option("--note", metavar="TEXT")
@command_timeout_option
def schedule_pause(bootstrap_servers: str | None, schedule_id: str, note: str | None, timeout: float | None) -> None:
    """Pause a schedule: no tick fires until it is resumed."""
    _on_schedule(bootstrap_servers, schedule_id, lambda handle: handle.pause(note, timeout=timeout))
    click.echo(f"schedule {schedule_id} paused")


@schedule_group.command("resume")
@bootstrap_option
@click.argument("schedule_id")
@click.option("--note", metavar="TEXT")
@command_timeout_option
def schedule_resume(bootstrap_servers: str | None, schedule_id: str, note: str | None,
                    timeout: float | None) -> None:
    """Resume a paused schedule (ticks due while it was paused do not fire)."""
    _on_schedule(bootstrap_servers, schedule_id, lambda handle: handle.resume(note, timeout=timeout))
    click.echo(f"schedule {schedule_id} resumed")


@schedule_group.command("trigger")
@bootstrap_option
@click.argument("schedule_id")
@click.option("--overlap", type=overlap_choice, help="Override the schedule's overlap policy for this run.")
@command_timeout_option
def schedule_trigger(bootstrap_servers: str | None, schedule_id: str, overlap: str | None,
                     timeout: float | None) -> None:
    """Start the schedule's workflow now; prints the run's execution id."""
    run = _on_schedule(bootstrap_servers, schedule_id,
                       lambda handle: handle.trigger(_overlap(overlap), timeout=timeout))
    click.echo(run if run else f"not started: the overlap policy skipped or buffered it (schedule {schedule_id})")


@schedule_group.command("delete")
@bootstrap_option
@click.argument("schedule_id")
@command_timeout_option
def schedule_delete(bootstrap_servers: str | None, schedule_id: str, timeout: float | None) -> None:
    """Delete a schedule (its runs go on)."""
    _on_schedule(bootstrap_servers, schedule_id, lambda handle: handle.delete(timeout=timeout))
    click.echo(f"schedule {schedule_id} deleted")


# The consumer library's `serve` and `tail`: importing it runs main.add_command for them (it
# imports this module's options, so it registers itself; its HTTP and UI imports wait until a run).
import treeflow.consumers.cli  # noqa: E402,F401


if __name__ == "__main__":  # python -m treeflow.cli: the group `serve` and `tail` registered on
    from treeflow.cli import main as registered

    registered()
