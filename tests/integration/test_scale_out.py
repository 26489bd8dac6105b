"""Scale-out: processors in one group share the partitions, workers on a queue share its tasks.

Under a steady load, two processors and two workers run; one of each is killed (kill -9)
and another added. Every execution completes with its result and the events topic holds
each history exactly once (no loss, no duplicate event, each activity completed once).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from treeflow.client import Client
from treeflow.errors import CommandTimeoutError
from treeflow.kafka import KafkaSettings
from treeflow.schemas import CLOSING_STATUS, EventType

from . import durable_app as app
from .durable_app import ChainInput, ChainWorkflow, ParentInput, ParentWorkflow, traces
from .test_durability import (  # noqa: F401 (fixtures)
    Processes,
    activity_counts,
    check_log,
    client,
    processes,
    read_events,
    settle,
    wait_until,
    workdir,
)

pytestmark = pytest.mark.integration


async def unfinished(settings: KafkaSettings, waiting: set[str]) -> str:
    """Each execution of the log without a closing event, with its last events (what it waits
    on), and each execution still awaited with what the log holds of it."""
    histories: dict[str, list[str]] = {}
    closed: set[str] = set()
    for partition, offset, event in await read_events(settings):
        exec_id = event.workflow_context.workflow_exec_id
        histories.setdefault(exec_id, []).append(f"p{partition}@{offset} {event.event_type.value}")
        if event.event_type in CLOSING_STATUS:
            closed.add(exec_id)
    open_ones = {exec_id: history[-4:] for exec_id, history in histories.items() if exec_id not in closed}

    def in_the_log(exec_id: str) -> str:
        if exec_id not in histories:
            return "not in the log"
        return ("closed: " if exec_id in closed else "open: ") + " | ".join(histories[exec_id][-3:])

    return ("open executions in the log:\n" + "\n".join(f"  {exec_id}: {' | '.join(last)}"
                                                       for exec_id, last in open_ones.items())
            + "\nawaited by the test:\n" + "\n".join(f"  {exec_id}: {in_the_log(exec_id)}"
                                                      for exec_id in sorted(waiting)))


async def test_processors_and_workers_killed_and_added_under_load_lose_and_duplicate_nothing(
        settings: KafkaSettings, client: Client, processes: Processes, workdir: Path) -> None:  # noqa: F811
    first = processes.processor()
    processes.processor()
    worker = processes.worker()
    processes.worker()
    specs = []
    for i in range(60):
        if i % 4 == 3:
            data = f"tree-{i}"
            specs.append((ParentWorkflow, ParentInput(data=data), data, app.parent_result(data)))
        else:
            tag = f"chain-{i}"
            specs.append((ChainWorkflow, ChainInput(workdir=str(workdir), tag=tag, b_seconds=0.3), tag,
                          app.chain_result(tag)))

    waiting: set[str] = set()

    async def start(i: int, workflow: type, params: Any, name: str) -> Any:
        await asyncio.sleep(0.25 * i)  # a steady load over 15 s, across the changes
        execution_id = f"{name}-{uuid.uuid4().hex[:6]}"
        waiting.add(execution_id)
        try:
            handle = await client.start_workflow(workflow, params, execution_id=execution_id, timeout=20)
        except CommandTimeoutError:
            # Decided by a processor killed before it replied (or not yet decided): the start
            # stays in the commands topic and takes effect, so wait for its result (README,
            # "Deadlines").
            handle = client.get_handle(execution_id, root_execution_id=execution_id, workflow=workflow)
        result = await handle.result()
        waiting.discard(execution_id)
        return handle, result

    running = asyncio.gather(*(start(i, *spec[:3]) for i, spec in enumerate(specs)))
    try:
        await wait_until(lambda: len(traces(workdir, "A")) >= 8, 60, "the load to run", processes.logs)
        processes.kill(first)
        processes.processor()
        await wait_until(lambda: len(traces(workdir, "A")) >= 20, 60, "the load to go on", processes.logs)
        processes.kill(worker)
        processes.worker()
        outcomes = await asyncio.wait_for(asyncio.shield(running), 150)
    except BaseException as error:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        if isinstance(error, TimeoutError):
            raise AssertionError(f"not every execution finished\n{await unfinished(settings, waiting)}\n"
                                 f"{processes.logs()}")
        raise
    assert [result for _, result in outcomes] == [spec[3] for spec in specs]
    await settle(settings)
    by_exec = check_log(await read_events(settings), settings)
    roots = {handle.execution_id for handle, _ in outcomes}
    children = {x for x, history in by_exec.items() if history[0].workflow_context.parent_workflow_exec_id}
    assert set(by_exec) == roots | children and len(children) == 15
    for exec_id, history in by_exec.items():
        assert history[-1].event_type is EventType.WORKFLOW_EXECUTION_COMPLETED, exec_id
        completed = activity_counts(history, EventType.ACTIVITY_TASK_COMPLETED)
        scheduled = activity_counts(history, EventType.ACTIVITY_TASK_SCHEDULED)
        assert completed == scheduled and set(completed.values()) <= {1}, f"{exec_id}: {completed} / {scheduled}"
