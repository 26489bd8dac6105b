"""A worker process: consumes task queues, runs the tasks, reports to the processor.

Each task queue is one consumer group (`<prefix>.workers.<queue>`). Workflow tasks
run inline (they are short and CPU-bound); activities run concurrently up to
`max_concurrent_activities`. A record's offset is committed once it and every record
before it in its partition are done, so a worker killed mid-task leaves the task to
the next worker of the group (activities run at least once).

A task that may have run before is claimed before the activity's code runs: the
worker sends a ReportActivityTaskStarted with a fresh claim id and waits for the
processor's reply (one round trip, like Temporal recording the start before handing out
the task). The processor refuses the claim once the attempt is closed, so a task read
again after a crash, or dispatched twice, whose completion is recorded never runs again
(DESIGN §5 invariant 5). A task may have run before when the processor marks it as
possibly not the only copy (not `first_dispatch`: sent again after a recovery), or when
its record was already in its partition when this worker was given the partition
(another member may have read it and not committed). Every other task, the steady
state, runs without the round trip. A copy arriving while this process runs the same
attempt is dropped without asking.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from treeflow.kafka import (
    KafkaSettings,
    TopicsResetError,
    adopt_partitions,
    clients,
    end_offsets,
    ensure_topics,
    partition_for,
    watch_topics,
)
from treeflow.schemas import COMMANDS, REPLIES, TASKS, Command, DecodeError, RecordPosition, Reply
from treeflow.schemas import models as m

from ..definitions import ActivityDefinition, WorkflowDefinition
from ..ids import new_id
from ..observability import metrics, tracing
from .runner import TaskRunner

log = logging.getLogger(__name__)

#: Eagerly taken attempts remembered, to drop their task copies.
EAGER_REMEMBERED = 10_000
#: How long a workflow task's report waits for the first report of an attempt it took
#: eagerly, to go out with it in one produce request (`_HeldReport`).
REPORT_HOLD = 0.010


class _HeldReport:
    """A workflow task's report held back until the first report of an attempt it took
    eagerly is ready, or REPORT_HOLD has passed. The two are queued back to back, so
    they reach the processor in one produce request and are decided in one pass (one
    append, one acknowledgement) instead of the attempt's completion waiting behind the
    report's append. The attempts ran before their report was in the log before too
    (an eager attempt started once its report was queued); a worker that dies now
    loses the report, and the task is redelivered, as before."""

    def __init__(self, report: Command, send: Callable[[Command], Awaitable[Any]], done: Callable[[], None],
                 holding: set[_HeldReport]) -> None:
        self._report: Command | None = report
        self._send, self._done, self._holding = send, done, holding
        #: Resolved once the report is queued (or its lone send failed).
        self.queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timer = asyncio.get_running_loop().call_later(REPORT_HOLD, self._on_timer)
        holding.add(self)

    def take(self) -> Command | None:
        """The report, to the first caller that will queue it (then call `taken_queued`)."""
        report, self._report = self._report, None
        if report is not None:
            self._timer.cancel()
            self._holding.discard(self)
        return report

    def taken_queued(self) -> None:
        self._done()
        if not self.queued.done():
            self.queued.set_result(None)

    def _on_timer(self) -> None:
        report = self.take()
        if report is not None:
            asyncio.ensure_future(self._send_alone(report))

    async def _send_alone(self, report: Command) -> None:
        try:
            await self._send(report)
        except Exception as exc:  # its offset stays unfinished: the task is redelivered
            log.error("sending a workflow task's report failed: %r", exc)
            if not self.queued.done():
                self.queued.set_result(None)
            return
        self.taken_queued()


def _attempt_key(context: m.WorkflowContext, task: m.ActivityTask) -> str:
    return f"{context.workflow_exec_id}|{context.workflow_run_id}|{task.activity_id}|{task.attempt}"


#: Decisions that close the run: a workflow task holding one takes no activity eagerly.
_CLOSING_DECISIONS = (m.CompleteWorkflowExecution, m.FailWorkflowExecution, m.CancelWorkflowExecution,
                      m.ContinueAsNewWorkflowExecution)


@dataclass
class WorkerStats:
    workflow_tasks: int = 0
    activity_tasks: int = 0
    query_tasks: int = 0
    undecodable: int = 0
    #: Activity tasks claimed before running (possibly not their attempt's only task).
    claimed_tasks: int = 0
    #: Claims sent again because no reply came (a processor outage, a lost reply).
    claim_retries: int = 0
    #: First attempts run at once by the worker that completed the scheduling workflow task.
    eager_activities: int = 0
    #: Task copies of attempts this worker took eagerly, dropped.
    eager_copies: int = 0
    #: Eager completions sent with the decisions of the workflow task they cause.
    continuations: int = 0
    #: Children started with their first task's decisions (eager child start).
    eager_children: int = 0


#: A claim not answered within this long is sent again (then doubling, up to CLAIM_RETRY_MAX).
CLAIM_RETRY = 5.0
CLAIM_RETRY_MAX = 30.0


class _Fresh(ConsumerRebalanceListener):
    """Per assigned partition, its end when it was assigned: a record from there on was
    never read by another member of the group (an eager rebalance revokes before it
    assigns), so it cannot be a task someone else ran and did not commit."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.start: dict[TopicPartition, int] = {}

    async def on_partitions_revoked(self, revoked: Any) -> None:
        for tp in revoked:
            self.start.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if not assigned:
            return
        try:
            self.start.update(await end_offsets(self.settings, list(assigned)))
        except Exception as exc:  # then every task of these partitions is claimed
            log.warning("could not read the end of %s (%r): their tasks will be claimed", sorted(assigned), exc)

    def fresh(self, tp: TopicPartition, offset: int) -> bool:
        start = self.start.get(tp)
        return start is not None and offset >= start


class _Replies:
    """Follows the worker's replies partition for the claims it waits on.

    The partition is fetched only while a claim waits (claims are rare: after a
    rebalance or a processor recovery); otherwise it is paused, so an idle or busy
    worker does not poll it (on Tansu, whose fetches do not wake on new data, a
    follower polls every few milliseconds). Before the first claim after a pause it is
    moved to its end, so the answer is read and the replies in between are not.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._follower: asyncio.Task[None] | None = None
        self._waking = asyncio.Lock()
        #: The replies partition this worker reads (chosen at start, by the topics' count).
        self.partition = 0
        #: How many times the partition was resumed for claims (after a pause).
        self.wakes = 0

    async def start(self) -> None:
        # One replies partition of its own, named in each claim (`Command.reply_partition`):
        # the worker does not read the replies meant for clients.
        self.partition = partition_for(f"worker/{new_id()}", self.settings.partitions)
        partitions = [TopicPartition(self.settings.topics.replies, self.partition)]
        ends = await end_offsets(self.settings, partitions)
        self._consumer = await clients.start(clients.consumer(self.settings, "worker-replies"), self.settings)
        self._consumer.assign(partitions)
        for tp, offset in ends.items():
            self._consumer.seek(tp, offset)
        self._consumer.pause(*partitions)
        self._follower = asyncio.ensure_future(self._follow())

    @property
    def _tp(self) -> TopicPartition:
        return TopicPartition(self.settings.topics.replies, self.partition)

    async def expect(self, command_id: str) -> asyncio.Future[Reply]:
        """A future for the reply to `command_id`, to be sent after this returns: the
        partition is fetched (from its end, if it was paused) until that reply came."""
        assert self._consumer is not None
        async with self._waking:
            if not self._waiting and self._tp in self._consumer.paused():
                ends = await end_offsets(self.settings, [self._tp])
                self._consumer.seek(self._tp, ends[self._tp])
                self._consumer.resume(self._tp)
                self.wakes += 1
            future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            self._waiting[command_id] = future
            return future

    def forget(self, command_id: str) -> None:
        self._waiting.pop(command_id, None)
        if not self._waiting and self._consumer is not None and not self._waking.locked():
            self._consumer.pause(self._tp)

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        if self._consumer is not None:
            await clients.stop(self._consumer)

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    command_id = dict(record.headers or ()).get("tf.command", b"").decode()
                    if command_id not in self._waiting:
                        continue
                    try:
                        reply = REPLIES.decode(record.value, RecordPosition(tp.topic, tp.partition, record.offset))
                    except DecodeError as error:
                        log.error("skipped a reply: %s", error)
                        continue
                    future = self._waiting.pop(reply.command_id, None)
                    if future is not None and not future.done():
                        future.set_result(reply)


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
                 max_concurrent_activities: int = 100, runner: TaskRunner | None = None,
                 eager_activities: bool = True, eager_continuations: bool = True) -> None:
        self.settings = settings
        self.task_queues = list(dict.fromkeys(task_queues))
        self.runner = runner or TaskRunner(workflows, activities)
        self.stats = WorkerStats()
        #: Run the first attempt of activities it schedules on its own queues at once.
        self.eager_activities = eager_activities
        #: Send an eager attempt's completion with the decisions of the workflow task it causes,
        #: and a closing child's with its parent's (when this worker has the parent's run).
        self.eager_continuations = eager_continuations
        self.runner.continue_parents = eager_continuations
        #: Attempts taken eagerly here, oldest first: resolved once run (their task copies
        #: are dropped, and done with the run).
        self._eager: OrderedDict[str, asyncio.Future[None]] = OrderedDict()
        #: Reports held for the first report of their eager attempts (`_HeldReport`).
        self._held: set[_HeldReport] = set()
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
        self._replies = _Replies(settings)

    async def start(self) -> None:
        self.settings = await adopt_partitions(self.settings, "worker")
        self._replies.settings = self.settings
        await ensure_topics(self.settings, self.task_queues)  # its queues' topics; nothing else is missing
        self._producer = await clients.start(clients.producer(self.settings, "worker"), self.settings)
        await self._replies.start()  # before any claim is sent
        for queue in self.task_queues:
            consumer = clients.consumer(self.settings, "worker", group_id=f"{self.settings.topic_prefix}.workers.{queue}",
                                        max_partition_fetch_bytes=16 * 1024 * 1024)
            fresh = _Fresh(self.settings)
            consumer.subscribe([self.settings.topics.tasks(queue)], listener=fresh)
            await clients.start(consumer, self.settings)
            self._consumers.append(consumer)
            self._loops.append(asyncio.ensure_future(self._consume(consumer, fresh)))
        self._watch = asyncio.ensure_future(self._watch_topics())
        metrics.CONSUMER_LAG.add(self._lag)
        self.started = True

    async def _watch_topics(self) -> None:
        topics = self.settings.topics
        try:
            await watch_topics(self.settings, [topics.commands, *map(topics.tasks, self.task_queues)], "worker")
        except TopicsResetError as error:
            log.critical("%s", error)
            self.failed = error
            self._stopping.set()

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
        await self._replies.stop()
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

    async def _consume(self, consumer: AIOKafkaConsumer, fresh: _Fresh) -> None:
        offsets = _Offsets()
        # Commits run beside the fetch loop, one at a time: a task that arrives while the
        # previous batch's reports are flushed and its offsets committed is taken at once.
        committing: asyncio.Future[None] | None = None
        try:
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                for tp, records in batches.items():
                    for record in records:
                        self._next_offsets[tp] = record.offset + 1
                        offsets.begin(tp, record.offset)
                        await self._take(tp, record, offsets, fresh)
                if committing is None or committing.done():
                    if committing is not None:
                        committing.result()  # a failed flush stops the worker, as it did inline
                    committing = asyncio.ensure_future(self._commit(consumer, offsets))
        finally:
            if committing is not None:
                await asyncio.gather(committing, return_exceptions=True)
            if self._in_flight and self._stopping.is_set():
                await asyncio.wait(self._in_flight, timeout=self._grace)
            for held in list(self._held):  # reports whose attempts were cut off
                report = held.take()
                if report is not None:
                    await self._send(report)
                    held.taken_queued()
            await self._commit(consumer, offsets)

    async def _take(self, tp: TopicPartition, record: Any, offsets: _Offsets, fresh: _Fresh) -> None:
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
            is_fresh = fresh.fresh(tp, record.offset)
            report, eager = await self._take_eagerly(self.runner.run_workflow_task(
                task.workflow_context, task.task_id, task.payload.history), is_fresh)
            report, children = await self._start_children_eagerly(task.workflow_context, report, is_fresh)
            held = None
            if self.eager_continuations and (eager or children):
                held = _HeldReport(report, self._send, functools.partial(offsets.finish, tp, record.offset),
                                   self._held)
            else:
                await self._send(report)
                offsets.finish(tp, record.offset)
            # After the report: the activity results follow it in the commands partition.
            traceparent = tracing.traceparent_of(record.headers)
            self._run_eagerly(task.workflow_context, report.payload, eager, traceparent, held)
            for child_context, child_task, child_eager in children:
                self._run_eagerly(child_context, child_task, child_eager, traceparent, held)
            return
        if isinstance(task.payload, m.QueryTask):
            self.stats.query_tasks += 1
            metrics.worker_task_counter((queue, "query")).inc()
            await self._send(self.runner.run_query_task(task.workflow_context, task.payload))
            offsets.finish(tp, record.offset)
            return
        metrics.worker_task_counter((queue, "activity")).inc()
        ran = self._eager.get(_attempt_key(task.workflow_context, task.payload))
        if ran is not None:
            # This process runs (or ran) the attempt eagerly: the copy is done when the run
            # is (its offset committed after the report, as the copy's own run would be).
            self.stats.eager_copies += 1
            ran.add_done_callback(lambda _: offsets.finish(tp, record.offset))
            return
        await self._slots.acquire()
        only_copy = task.payload.first_dispatch and fresh.fresh(tp, record.offset)
        self._spawn_activity(task.workflow_context, task.payload, claim=not only_copy,
                             traceparent=tracing.traceparent_of(record.headers),
                             done=functools.partial(offsets.finish, tp, record.offset))

    async def _take_eagerly(self, report: Command, fresh: bool) -> tuple[Command, list[m.ActivityTask]]:
        """Eager activity execution: the first attempts of the activities a completed
        workflow task schedules on a queue this worker serves, with a free slot, are
        run here at once (the report marks them `eager`). The processor sends their task,
        as possibly not the only copy, if the attempt is still open after EAGER_COPY_DELAY:
        this worker drops it (`eager_copies`), another one claims the attempt first. Not
        for a workflow task that may have been run before (not `fresh`: a worker that ran
        it may have died before committing it, its activities possibly done and recorded)."""
        payload = report.payload
        if not fresh or not isinstance(payload, m.CompleteWorkflowTask):
            return report, []
        decisions, eager = await self._eager_decisions(report.workflow_exec_id, payload.workflow_run_id,
                                                       payload.decisions, report.timestamp)
        if not eager:
            return report, []
        return report.model_copy(update={"payload": payload.model_copy(update={"decisions": decisions})}), eager

    async def _start_children_eagerly(
            self, context: m.WorkflowContext, report: Command, fresh: bool
    ) -> tuple[Command, list[tuple[m.WorkflowContext, m.CompleteWorkflowTask, list[m.ActivityTask]]]]:
        """Eager child start: the first workflow task of each child the report starts on a
        queue this worker serves, with its workflow here and an id the SDK chose, is run
        now on its predicted WORKFLOW_EXECUTION_STARTED (`TaskRunner.start_child_eagerly`);
        its decisions go with the start (`StartChildWorkflowExecution.first_task`) and take
        activities eagerly. Returns the report and, per child with eager attempts, what
        `_run_eagerly` needs. Not for a task that may have been run before (not `fresh`),
        nor one that closes the run."""
        payload = report.payload
        if (not (self.eager_continuations and fresh) or not isinstance(payload, m.CompleteWorkflowTask)
                or any(isinstance(d, _CLOSING_DECISIONS) for d in payload.decisions)):
            return report, []
        decisions, children, changed = [], [], False
        for decision in payload.decisions:
            started = None
            if isinstance(decision, m.StartChildWorkflowExecution) and decision.task_queue in self.task_queues:
                started = self.runner.start_child_eagerly(context, report.command_id, decision)
            if started is not None:
                child, first = started
                marked, eager = await self._eager_decisions(child.workflow_exec_id, child.workflow_run_id,
                                                            first.decisions, report.timestamp)
                first = first.model_copy(update={"decisions": marked})
                decision, changed = decision.model_copy(update={"first_task": first}), True
                self.stats.eager_children += 1
                task_id = self.runner.last_task_id(child)
                if eager and task_id is not None:
                    children.append((child, m.CompleteWorkflowTask(
                        task_id=task_id, workflow_run_id=child.workflow_run_id,
                        history_length=first.history_length, decisions=marked), eager))
            decisions.append(decision)
        if not changed:
            return report, children
        return report.model_copy(update={"payload": payload.model_copy(update={"decisions": decisions})}), children

    async def _eager_decisions(self, exec_id: str, run_id: str, decisions: list[Any],
                               scheduled_at: datetime) -> tuple[list[Any], list[m.ActivityTask]]:
        """`decisions` with the activities this worker takes eagerly marked `eager`, and
        their first attempts' tasks. Not when the decisions also close the run (the
        activities would never have been dispatched). Each one taken holds its slot
        (released by the run)."""
        if not self.eager_activities or any(isinstance(d, _CLOSING_DECISIONS) for d in decisions):
            return decisions, []
        marked, eager = [], []
        for decision in decisions:
            if (isinstance(decision, m.ScheduleActivityTask) and decision.task_queue in self.task_queues
                    and decision.activity_name in self.runner.activities and not self._slots.locked()):
                await self._slots.acquire()  # free (not locked): returns at once
                decision = decision.model_copy(update={"eager": True})
                self._eager[f"{exec_id}|{run_id}|{decision.activity_id}|1"] = \
                    asyncio.get_running_loop().create_future()
                while len(self._eager) > EAGER_REMEMBERED:
                    self._eager.popitem(last=False)
                eager.append(m.ActivityTask(
                    activity_id=decision.activity_id, activity_name=decision.activity_name,
                    input_json=decision.input_json, attempt=1, scheduled_at=scheduled_at,
                    start_to_close_timeout_ms=decision.start_to_close_timeout_ms,
                    heartbeat_timeout_ms=decision.heartbeat_timeout_ms, first_dispatch=True))
            marked.append(decision)
        self.stats.eager_activities += len(eager)
        return marked, eager

    def _run_eagerly(self, context: m.WorkflowContext, report: m.CompleteWorkflowTask, eager: list[m.ActivityTask],
                     traceparent: bytes | None, held: _HeldReport | None = None) -> None:
        """Run the attempts `report` took eagerly; their first report goes out with `held`
        (the report that took them, when it is held). A lone one's completion goes with the
        decisions of the workflow task it causes (`_send_continued`)."""
        send: Callable[[Command], Awaitable[Any]] = functools.partial(self._send, after=held)
        if self.eager_continuations and len(eager) == 1:
            send = functools.partial(self._send_continued, context, report, traceparent, held)
        for activity in eager:
            self._spawn_activity(context, activity, claim=False, traceparent=traceparent,
                                 done=functools.partial(self._eager[_attempt_key(context, activity)].set_result, None),
                                 send=send)

    def _spawn_activity(self, context: m.WorkflowContext, task: m.ActivityTask, claim: bool,
                        traceparent: bytes | None, done: Callable[[], None] | None = None,
                        send: Callable[[Command], Awaitable[Any]] | None = None) -> None:
        """Run one attempt (its slot already held) in the background, its reports through
        `send` (default: `_send`); `done()` once its outcome was handed to the producer
        (not when it was cancelled or dropped)."""
        job = asyncio.ensure_future(self._run_activity(context, task, claim, traceparent, done, send or self._send))
        self._in_flight.add(job)
        job.add_done_callback(self._in_flight.discard)

    async def _run_activity(self, context: m.WorkflowContext, task: m.ActivityTask, claim: bool,
                            traceparent: bytes | None, done: Callable[[], None] | None,
                            send: Callable[[Command], Awaitable[Any]]) -> None:
        try:
            self.stats.activity_tasks += 1
            if claim:
                self.stats.claimed_tasks += 1
            await self.runner.run_activity(context, task, send, self._claim if claim else None, traceparent)
            if done is not None:
                done()
        finally:
            self._slots.release()

    async def _claim(self, claim: Command) -> bool:
        """Send the claim; True once the processor grants it, False when it refuses.

        Unanswered (the processor is down, or died between recording the claim and
        replying), it is sent again under a new command id; the processor answers a
        claim it granted before the same way while the attempt is open.
        """
        wait = CLAIM_RETRY
        claim = claim.model_copy(update={"reply_partition": self._replies.partition})
        while True:
            answer = await self._replies.expect(claim.command_id)
            try:
                await self._send(claim)
                reply = await asyncio.wait_for(answer, wait)
                return reply.accepted
            except asyncio.TimeoutError:
                self.stats.claim_retries += 1
            finally:
                self._replies.forget(claim.command_id)
            claim = claim.model_copy(update={"command_id": new_id(), "timestamp": datetime.now(timezone.utc)})
            wait = min(wait * 2, CLAIM_RETRY_MAX)

    async def _send_continued(self, context: m.WorkflowContext, report: m.CompleteWorkflowTask,
                              traceparent: bytes | None, held: _HeldReport | None, command: Command) -> None:
        """Send a report of the attempt `report` took eagerly; its completion with the
        decisions of the workflow task it causes, when the runner can make them
        (`TaskRunner.continue_after_activity`): the processor then records both at once,
        and that task never travels. Activities those decisions take eagerly continue the
        same way."""
        eager: list[m.ActivityTask] = []
        if isinstance(command.payload, m.CompleteActivityTask):
            continuation = self.runner.continue_after_activity(context, report, command.payload)
            if continuation is not None:
                self.stats.continuations += 1
                decisions, eager = await self._eager_decisions(
                    context.workflow_exec_id, context.workflow_run_id, continuation.decisions, command.timestamp)
                continuation = continuation.model_copy(update={"decisions": decisions})
                command = command.model_copy(update={
                    "payload": command.payload.model_copy(update={"continuation": continuation})})
                task_id = self.runner.last_task_id(context)
                if eager and task_id is not None:  # the continued task, as the next one's base
                    report = m.CompleteWorkflowTask(task_id=task_id, workflow_run_id=context.workflow_run_id,
                                                    history_length=continuation.history_length, decisions=decisions)
        delivered = await self._send(command, after=held)
        if eager:  # a chained attempt starts once the completion it follows is in the log
            await delivered
        self._run_eagerly(context, report, eager, traceparent)

    async def _send(self, command: Command, after: _HeldReport | None = None) -> asyncio.Future[Any]:
        """Queue `command` (after the held report `after`); the future resolves when the broker has it."""
        if after is not None:
            report = after.take()
            if report is None:
                await after.queued
            else:  # queued back to back with `command`: no await between them yields
                await self._send(report)
                after.taken_queued()
        assert self._producer is not None
        return await self._producer.send(self.settings.topics.commands, COMMANDS.encode(command),
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
