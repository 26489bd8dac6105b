"""`treeflow dev FILE.py` and `treeflow demo`: the engine, in one process, around a user's file."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import uuid
from collections.abc import Callable
from types import ModuleType
from typing import Any

from treeflow.consumers import ConsumedEvent, EventReader
from treeflow.consumers.tree import TreeTracker
from treeflow.kafka import KafkaSettings, partition_for
from treeflow.kafka.profile import PROFILE_ENV
from treeflow.kafka.settings import BOOTSTRAP_ENV, DEFAULT_PARTITIONS, DEFAULT_PREFIX, PARTITIONS_ENV, PREFIX_ENV
from treeflow.schemas import Event

from .testing import Environment


def dev_environment(modules: list[ModuleType]) -> Environment:
    """An environment on the default topics (or those the `TREEFLOW_*` variables name)."""
    return Environment(modules=modules, topic_prefix=os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX,
                       partitions=int(os.environ.get(PARTITIONS_ENV) or DEFAULT_PARTITIONS))


def export_lines(settings: KafkaSettings) -> list[str]:
    """The `export` lines that point another terminal's treeflow commands at these settings."""
    variables = {BOOTSTRAP_ENV: settings.bootstrap_servers, PROFILE_ENV: settings.profile.name}
    if settings.topic_prefix != DEFAULT_PREFIX:
        variables[PREFIX_ENV] = settings.topic_prefix
    if settings.partitions != DEFAULT_PARTITIONS:
        variables[PARTITIONS_ENV] = str(settings.partitions)
    return [f"export {name}={value}" for name, value in variables.items()]


async def run_file(module: ModuleType, serve: bool, echo: Callable[[str], None], *,
                   http_port: int | None = None, http_host: str = "127.0.0.1") -> None:
    """Run the processor hosting `module`'s workflows and activities, then its `main()`.

    When it serves (with `serve`, or when the file has no `main()`), it first prints the
    `export` lines another terminal needs to reach it (`treeflow signal`, `describe`...).
    With `http_port` (0: any free port) it also serves the gateway there (Mistral's
    Workflows API, the JSON API, the web page and the event streams: `treeflow serve`'s
    app, listing the file's workflows) and prints its URL before `main()` runs.
    """
    async with dev_environment([module]) as env:
        server = None if http_port is None else await _start_gateway(env, http_host, http_port)
        try:
            await _run_in(env, module, serve, echo, server)
        finally:
            if server is not None:
                await server.stop()


async def _start_gateway(env: Environment, host: str, port: int) -> Any:
    from treeflow.consumers.gateway import GatewayServer, create_app

    server = GatewayServer(create_app(env.settings, visibility_url=env.visibility_url, workflows=env.workflows),
                           host=host, port=port)
    await server.start()
    return server


async def _run_in(env: Environment, module: ModuleType, serve: bool, echo: Callable[[str], None],
                  server: Any) -> None:
    settings = env.settings
    assert settings is not None
    echo(f"treeflow dev: broker {settings.bootstrap_servers}, topics {settings.topic_prefix}.*, "
         f"{len(env.workflows)} workflow(s) {sorted(env.workflows)}, "
         f"{len(env.activities)} activity(ies) {sorted(env.activities)} on {env.task_queues}")
    echo(f"treeflow dev: visibility store {env.visibility_url}; from another shell: "
         f"TREEFLOW_BOOTSTRAP_SERVERS={settings.bootstrap_servers} TREEFLOW_TOPIC_PREFIX={settings.topic_prefix} "
         f"TREEFLOW_VISIBILITY_URL={env.visibility_url} treeflow list")
    if server is not None:
        echo(f"treeflow dev: HTTP API on {server.url} (Mistral's: {server.url}/v1/workflows; "
             f"the web page: {server.url}/)")
    main = getattr(module, "main", None)
    has_main = main is not None and inspect.iscoroutinefunction(main)
    if not has_main and not serve:
        echo("treeflow dev: the file has no `async def main()`; serving until interrupted (Ctrl-C)")
        serve = True
    if serve:
        echo("treeflow dev: to use it from another terminal:")
        for line in export_lines(settings):
            echo(line)
    if has_main:
        await main()  # type: ignore[misc]
    if serve:
        await _until_signalled()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_demo(echo: Callable[[str], None] = print) -> list[ConsumedEvent]:
    """Run the seed's parent -> child -> activity example and print its event history."""
    import treeflow as workflows
    from treeflow.examples import child_workflows as example

    async with dev_environment([example]) as env:
        settings = env.settings
        assert settings is not None
        echo(f"broker {settings.bootstrap_servers} ({settings.profile.name} profile), topics "
             f"{settings.topic_prefix}.* with {settings.partitions} partitions; running the seed example")
        root = f"parent-{uuid.uuid4().hex[:6]}"
        result = await workflows.execute_workflow(example.ParentWorkflow, params=example.ParentInput(data="hello"),
                                                  execution_id=root)
        echo(f"result: {result}\n")
        consumed = await tree_events(settings, root)
        echo(render_tree(root, consumed, settings.partitions))
        return consumed


async def tree_events(settings: KafkaSettings, root: str) -> list[ConsumedEvent]:
    reader = EventReader(settings, [partition_for(root, settings.partitions)])
    return [item async for item in reader if item.event.workflow_context.root_workflow_exec_id == root]


def summarize(event: Event) -> str:
    """The payload's set fields on one line, user data (`*_json`) shown decoded."""
    fields = {}
    for key, value in event.payload.model_dump(mode="json").items():
        if value in (None, [], False):
            continue
        if key.endswith("_json"):
            key, value = key.removesuffix("_json"), json.loads(value)
        fields[key] = value
    text = json.dumps(fields, separators=(",", ":"))
    return text if len(text) <= 120 else text[:117] + "..."


def render_tree(root: str, consumed: list[ConsumedEvent], partitions: int) -> str:
    """A tree's executions (indented by depth, with status) and then its events in log order."""
    tracker = TreeTracker(root)
    for item in consumed:
        tracker.observe(item.event)
    depth: dict[str, int] = {}
    lines = [f"tree {root}  (partition {partition_for(root, partitions)}, {len(consumed)} events)"]

    def walk(exec_id: str, level: int) -> None:
        node = tracker.executions[exec_id]
        depth[exec_id] = level
        lines.append(f"  {'    ' * level}{exec_id}  [{node.workflow_name}]  {node.status}")
        for child in node.children:
            walk(child, level + 1)

    if tracker.root is not None:
        walk(root, 0)
    lines.append("  events, in log order:")
    for item in consumed:
        event = item.event
        exec_id = event.workflow_context.workflow_exec_id
        lines.append(f"    @{item.offset:<4} {'  ' * depth.get(exec_id, 0)}{exec_id} #{event.sequence} "
                     f"{event.event_type.value}  {summarize(event)}")
    return "\n".join(lines)
