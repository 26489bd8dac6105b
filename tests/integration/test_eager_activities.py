"""Eager activity execution (issue 11): the worker completing a workflow task that
schedules activities on a queue it serves runs their first attempt at once; the
processor sends the attempt's task, as possibly not the only copy, only once
EAGER_COPY_DELAY has passed without its completion; that worker drops it (another
would claim it): each attempt runs once."""

from __future__ import annotations

import sys
import uuid
from collections import Counter

import pytest

import treeflow as workflows
from treeflow.client import Client
from treeflow.definitions import collect
from aiokafka import TopicPartition

from treeflow.kafka import KafkaSettings, clients, end_offsets, ensure_topics
from treeflow.processor.app import Processor
from treeflow.schemas import TASKS
from treeflow.schemas import models as m
from treeflow.worker.worker import Worker

pytestmark = pytest.mark.integration

CALLS: Counter[str] = Counter()


@workflows.activity(name="eager_step")
async def eager_step(value: str) -> str:
    CALLS[value] += 1
    return f"done:{value}"


@workflows.workflow.define(name="eager_child")
class EagerChild:
    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        return await eager_step(value)


@workflows.workflow.define(name="eager_parent")
class EagerParent:
    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        return await workflows.execute_workflow(EagerChild, params=value)


async def activity_tasks(settings: KafkaSettings) -> list[m.ActivityTask]:
    """Every activity task in the default queue's topic."""
    partitions = [TopicPartition(settings.topics.tasks("default"), p) for p in range(settings.partitions)]
    ends = await end_offsets(settings, partitions)
    consumer = await clients.start(clients.consumer(settings, "test"), settings)
    found = []
    try:
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, 0)
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining:
            for tp, records in (await consumer.getmany(*remaining, timeout_ms=500)).items():
                for record in records:
                    task = TASKS.decode(record.value)
                    if isinstance(task.payload, m.ActivityTask):
                        found.append(task.payload)
                    if record.offset >= ends[tp] - 1:
                        remaining.discard(tp)
    finally:
        await clients.stop(consumer)
    return found


async def run_trees(settings: KafkaSettings, eager: bool, count: int) -> tuple[list[str], Worker]:
    await ensure_topics(settings, ["default"])
    workflow_defs, activity_defs = collect([sys.modules[__name__]])
    processor = Processor(settings)
    worker = Worker(settings, workflow_defs, activity_defs, eager_activities=eager)
    client = Client(settings)
    await processor.start()
    await worker.start()
    await client.start()
    try:
        await processor.wait_assigned()
        values = [f"v{uuid.uuid4().hex[:8]}" for _ in range(count)]
        for value in values:
            assert await client.execute_workflow(EagerParent, value, result_timeout=60) == f"done:{value}"
        return values, worker
    finally:
        await client.close()
        await worker.stop(grace=5)
        await processor.stop()


@pytest.mark.parametrize("eager, copy_delay", [(True, 2.0), (True, 0.0), (False, 2.0)])
async def test_each_attempt_runs_once_and_an_eager_ones_task_copy_is_dropped(
        settings: KafkaSettings, eager: bool, copy_delay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from treeflow.processor import engine

    monkeypatch.setattr(engine, "EAGER_COPY_DELAY", timedelta(seconds=copy_delay))
    values, worker = await run_trees(settings, eager, 8)
    assert [CALLS[value] for value in values] == [1] * len(values), "an attempt ran twice"
    tasks = await activity_tasks(settings)
    if eager and copy_delay:
        # Each attempt completed before its copy was due (EAGER_COPY_DELAY): none went out.
        assert worker.stats.eager_activities == len(values)
        assert len(tasks) == worker.stats.eager_copies == 0
    elif eager:
        assert len(tasks) == len(values)
        assert worker.stats.eager_activities == worker.stats.eager_copies == len(values)
        assert [task.first_dispatch for task in tasks] == [False] * len(values)
    else:
        assert len(tasks) == len(values)
        assert worker.stats.eager_activities == worker.stats.eager_copies == 0
        assert [task.first_dispatch for task in tasks] == [True] * len(values)
    assert worker.stats.claimed_tasks == 0
