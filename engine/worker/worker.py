"""A worker process: consumes task queues, runs the tasks, reports to the processor.

Each task queue is one consumer group (`<prefix>.workers.<queue>`). Workflow tasks
run inline (they are short and CPU-bound); activities run concurrently up to
`max_concurrent_activities`. A record's offset is committed once it and every record
before it in its partition are done, so a worker killed mid-task leaves the task to
the next worker of the group (activities run at least once).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from treeflow.kafka import KafkaSettings, TopicsResetError, adopt_partitions, clients, ensure_topics, watch_topics
from treeflow.schemas import COMMANDS, TASKS, Command, DecodeError, RecordPosition, Task
from treeflow.schemas import models as m

from ..definitions import ActivityDefinition, WorkflowDefinition
from ..observability import metrics, tracing
from .runner import TaskRunner

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    workflow_tasks: int = 0
    activity_tasks: int = 0
    query_tasks: int = 0
    undecodable: int = 0


class _Offsets:
    """Commits each partition up to the first record not yet done."""

    def __init__(self) -> None:
        self.pending: dict[TopicPartition, dict[int, bool]] = {}

    def begin(self, tp: TopicPartition, offset: int) -> None:
        self.pending.setdefault(tp, {})[offset] = False

    def finish(self, tp: TopicPartition, offset: int) -> None:
        if tp in self.pending and offset in self.pending[tp]:
            self.pending[tp][offset] = True

    def committable(self) -> dict[TopicPartition, int]:
        result = {}
        for tp, offsets in self.pending.items():
            done_upto = None
            for offset in sorted(offsets):
                if not offsets[offset]:
                    break
                done_upto = offset
                del offsets[offset]
            if done_upto is not None:
                result[tp] = done_upto + 1
        return result

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self.pending.pop(tp, None)


class Worker:
    """Runs the given workflows and activities for `task_queues`."""

    def __init__(self, settings: KafkaSettings, workflows: dict[str, WorkflowDefinition],
                 activities: dict[str, ActivityDefinition], task_queues: Iterable[str] = ("default",), *,
                 max_concurrent_activities: int = 100, runner: TaskRunner | None = None) -> None:
        self.settings = settings
        self.task_queues = list(dict.fromkeys(task_queues))
        self.runner = runner or TaskRunner(workflows, activities)
        self.stats = WorkerStats()
        self._slots = asyncio.Semaphore(max_concurrent_activities)
        self._producer: AIOKafkaProducer | None = None
        self._consumers: list[AIOKafkaConsumer] = []
        self._loops: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._grace = 0.0
        self._watch: asyncio.Task[None] | None = None
        #: Why the worker stopped by itself (its topics vanished), else None.
        self.failed: BaseException | None = None
        #: The next offset to take of each task partition (for `treeflow_consumer_lag`).
        self._next_offsets: dict[TopicPartition, int] = {}
        self._queues = {self.settings.topics.tasks(queue): queue for queue in self.task_queues}
        self.started = False

    async def start(self) -> None:
        self.settings = await adopt_partitions(self.settings, "worker")
        await ensure_topics(self.settings, self.task_queues)  # its queues' topics; nothing else is missing
        self._producer = await clients.start(clients.producer(self.settings, "worker"), self.settings)
        for queue in self.task_queues:
            consumer = await clients.start(clients.consumer(
                self.settings, "worker", self.settings.topics.tasks(queue),
                group_id=f"{self.settings.topic_prefix}.workers.{queue}",
                max_partition_fetch_bytes=16 * 1024 * 1024), self.settings)
            self._consumers.append(consumer)
            self._loops.append(asyncio.ensure_future(self._consume(consumer)))
        self._watch = asyncio.ensure_future(self._watch_topics())

    async def _watch_topics(self) -> None:
        topics = self.settings.topics
        try:
            await watch_topics(self.settings, [topics.commands, *map(topics.tasks, self.task_queues)], "worker")
        except TopicsResetError as error:
            log.critical("%s", error)
            self.failed = error
            self._stopping.set()
        metrics.CONSUMER_LAG.add(self._lag)
        self.started = True

    async def stop(self, grace: float = 30.0) -> None:
        """Stop taking tasks, let running ones finish for up to `grace` seconds, commit, leave."""
        self._grace = grace
        self._stopping.set()
        if self._watch is not None:
            self._watch.cancel()
        # Each loop waits for the running tasks, then commits what they finished.
        if self._loops:
            _, late = await asyncio.wait(self._loops, timeout=grace + 10)
            for task in late:
                task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for task in self._in_flight:
            task.cancel()
        for consumer in self._consumers:
            await consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        metrics.CONSUMER_LAG.remove(self._lag)

    def liveness(self) -> str | None:
        """None while every task queue is being consumed; else which loop died, and why."""
        for queue, loop in zip(self.task_queues, self._loops):
            if loop.done() and not self._stopping.is_set():
                error = None if loop.cancelled() else loop.exception()
                return f"the worker stopped consuming {queue}: {error!r}"
        return None

    def readiness(self) -> str | None:
        return None if self.started else "starting"

    def _lag(self) -> dict[tuple[str, ...], float]:
        lag: dict[tuple[str, ...], float] = {}
        for consumer in self._consumers:
            for tp in consumer.assignment():
                highwater = consumer.highwater(tp)
                taken = self._next_offsets.get(tp)
                if highwater is not None and taken is not None:
                    lag[("worker", tp.topic, str(tp.partition))] = max(highwater - taken, 0)
        return lag

    async def run_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await asyncio.wait([asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._stopping.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping: finishing %d running task(s)", len(self._in_flight))
        await self.stop()
        if self.failed is not None:
            raise self.failed

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        offsets = _Offsets()
        try:
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                for tp, records in batches.items():
                    for record in records:
                        self._next_offsets[tp] = record.offset + 1
                        offsets.begin(tp, record.offset)
                        await self._take(tp, record, offsets)
                await self._commit(consumer, offsets)
        finally:
            if self._in_flight and self._stopping.is_set():
                await asyncio.wait(self._in_flight, timeout=self._grace)
            await self._commit(consumer, offsets)

    async def _take(self, tp: TopicPartition, record: Any, offsets: _Offsets) -> None:
        try:
            task = TASKS.decode(record.value, RecordPosition(tp.topic, tp.partition, record.offset))
        except DecodeError as error:
            self.stats.undecodable += 1
            log.error("skipping an undecodable task: %s", error)
            offsets.finish(tp, record.offset)
            return
        queue = self._queues.get(tp.topic, tp.topic)
        if isinstance(task.payload, m.WorkflowTask):
            self.stats.workflow_tasks += 1
            metrics.worker_task_counter((queue, "workflow")).inc()
            await self._send(self.runner.run_workflow_task(task.workflow_context, task.task_id,
                                                           task.payload.history))
            offsets.finish(tp, record.offset)
            return
        if isinstance(task.payload, m.QueryTask):
            self.stats.query_tasks += 1
            metrics.worker_task_counter((queue, "query")).inc()
            await self._send(self.runner.run_query_task(task.workflow_context, task.payload))
            offsets.finish(tp, record.offset)
            return
        metrics.worker_task_counter((queue, "activity")).inc()
        await self._slots.acquire()
        job = asyncio.ensure_future(self._run_activity(task, tp, record.offset, offsets,
                                                       tracing.traceparent_of(record.headers)))
        self._in_flight.add(job)
        job.add_done_callback(self._in_flight.discard)

    async def _run_activity(self, task: Task, tp: TopicPartition, offset: int, offsets: _Offsets,
                            traceparent: bytes | None = None) -> None:
        try:
            self.stats.activity_tasks += 1
            began = time.perf_counter()
            payload = task.payload
            with tracing.activity_span(payload.activity_name, payload.activity_id, payload.attempt,
                                       task.workflow_context, traceparent) as span:
                result = await self.runner.run_activity_task(task.workflow_context, payload, self._send)
                tracing.activity_outcome(span, result)
            metrics.activity_ran(task.payload.activity_name, isinstance(result.payload, m.CompleteActivityTask),
                                 time.perf_counter() - began)
            await self._send(result)
            offsets.finish(tp, offset)
        finally:
            self._slots.release()

    async def _send(self, command: Command) -> None:
        assert self._producer is not None
        await self._producer.send(self.settings.topics.commands, COMMANDS.encode(command),
                                  key=command.root_workflow_exec_id.encode())

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: _Offsets) -> None:
        ready = offsets.committable()
        if not ready or self.failed is not None:  # a commit to a vanished topic would retry forever
            return
        assert self._producer is not None
        await self._producer.flush()  # the reports go out before their tasks are marked done
        try:
            await consumer.commit(ready)
        except Exception as exc:  # a rebalance took the partitions: the next owner redoes them
            log.warning("commit failed (%s); the tasks will be redelivered", exc)
            offsets.forget(ready)
