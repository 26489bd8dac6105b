"""A complete treeflow in one process, for users' tests and for `treeflow dev`.

    async with Environment(workflows=[ParentWorkflow, ChildWorkflow], activities=[process_item]) as env:
        result = await env.client.execute_workflow(ParentWorkflow, ParentInput(data="hello"))

It uses the Kafka named by `bootstrap_servers` or `TREEFLOW_BOOTSTRAP_SERVERS`, or
the embedded broker: one per process (`shared_broker()`), started by the first
environment and reused by the next ones (`own_broker=True` starts one of its own); creates
the topics under its own prefix; and runs the processor with the given workflows and
activities hosted in-process, and the visibility service on a SQLite file of its own
(``visibility=False`` leaves it out). While it runs, `TREEFLOW_*` variables point at it
(`TREEFLOW_VISIBILITY_URL` too), so `treeflow.execute_workflow`, `treeflow.connect()` and
`client.list_executions()` need no arguments.

With ``time_skipping=True`` the processor runs on a `VirtualClock`: while a result is
awaited (`WorkflowHandle.result`, `execute_workflow`) and nothing is runnable, time jumps
to the next timer, timeout or backoff, and `env.sleep()` moves it forward by hand (see
`Environment`).

`Replayer` (from `treeflow.replay`) checks changed workflow code against recorded
histories.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from types import ModuleType, TracebackType
from typing import Any

from aiokafka import TopicPartition

from treeflow.consumers.visibility import VISIBILITY_URL_ENV, VisibilityService
from treeflow.kafka import TANSU, BrokerProfile, EmbeddedBroker, KafkaSettings, end_offsets, ensure_topics
from treeflow.kafka.profile import PROFILE_ENV
from treeflow.kafka.settings import BOOTSTRAP_ENV, PARTITIONS_ENV, PREFIX_ENV

from .client import Client, close_default_clients, use_as_default
from .definitions import DEFAULT_TASK_QUEUE, ActivityDefinition, collect, workflow_definition
from .errors import TreeflowError
from .processor.app import Processor
from .processor.clock import SYSTEM_CLOCK, Clock, VirtualClock
from .replay import Replayer, ReplayResult
from .worker.runner import TaskRunner

__all__ = ["Environment", "ReplayResult", "Replayer", "shared_broker"]

log = logging.getLogger(__name__)

_shared: EmbeddedBroker | None = None


def shared_broker() -> EmbeddedBroker:
    """The embedded broker that every `Environment` of this process shares: started on
    first use, stopped when the process exits. Each environment has topics of its own
    (a fresh prefix), so they never see each other's data."""
    global _shared
    if _shared is None or not _shared.running:
        _shared = EmbeddedBroker().start()
        atexit.register(_shared.stop)
    return _shared


#: How often a time-skipping environment looks whether it may skip (seconds).
SKIP_POLL = 0.005


class Environment:
    """A broker's topics, a processor hosting `workflows` and `activities`, visibility and a
    client, in this process (see the module's docstring).

    ``time_skipping=True`` runs the processor on a `VirtualClock` (Temporal's
    `start_time_skipping`). Time skips only while a result is awaited through this
    environment's client (`env.client`, `env.execute_workflow`, `treeflow.execute_workflow`:
    `WorkflowHandle.result`), and only when nothing is runnable: no command of that client
    waits for its answer, the processor has read the commands topic to its end and decided
    it, nothing is queued, being decided or on its way out, no activity runs in-process, and
    every task handed out has its report. Then the clock jumps to the processor's next
    wakeup (a timer, a timeout, a retry or workflow-task backoff, an execution timeout).
    While an activity runs, time flows as on the system's clock. `sleep()` moves time by
    hand; `now()` reads it.
    """

    def __init__(self, *, workflows: Iterable[type] = (), activities: Iterable[ActivityDefinition] = (),
                 modules: Iterable[ModuleType] = (), bootstrap_servers: str | None = None,
                 topic_prefix: str | None = None, partitions: int | None = None,
                 task_queues: Iterable[str] | None = None, profile: BrokerProfile | None = None,
                 own_broker: bool = False, visibility: bool = True, time_skipping: bool = False) -> None:
        found_workflows, found_activities = collect(modules)
        self.workflows = {**found_workflows, **{d.name: d for d in map(workflow_definition, workflows)}}
        self.activities = {**found_activities, **{a.name: a for a in activities}}
        queues = {DEFAULT_TASK_QUEUE}
        queues |= {d.task_queue for d in self.workflows.values() if d.task_queue}
        queues |= {a.options.task_queue for a in self.activities.values() if a.options.task_queue}
        self.task_queues = sorted(task_queues) if task_queues is not None else sorted(queues)
        self._bootstrap = bootstrap_servers
        self._prefix = topic_prefix
        self._partitions = partitions
        self._profile = profile
        self._own_broker = own_broker
        self._broker: EmbeddedBroker | None = None
        self._saved_env: dict[str, str | None] = {}
        self.settings: KafkaSettings | None = None
        self.processor: Processor | None = None
        self.client: Client = None  # type: ignore[assignment]
        self._visibility = visibility
        self._visibility_dir: str | None = None
        #: The visibility service keeping `visibility_url` (None with ``visibility=False``).
        self.visibility: VisibilityService | None = None
        self.visibility_url: str | None = None
        self.time_skipping = time_skipping
        #: The processor's clock: a `VirtualClock` with ``time_skipping=True``.
        self.clock: Clock = VirtualClock() if time_skipping else SYSTEM_CLOCK
        self._result_waits = 0
        self._waited = asyncio.Event()
        self._sleeping = 0
        self._skipper: asyncio.Task[None] | None = None
        #: What the exported variables resolve to: the key of this environment's default clients.
        self._resolved: KafkaSettings | None = None

    async def __aenter__(self) -> Environment:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        bootstrap = self._bootstrap or os.environ.get(BOOTSTRAP_ENV)
        profile = self._profile
        if not bootstrap:
            if self._own_broker:
                self._broker = EmbeddedBroker().start()
                bootstrap = self._broker.bootstrap_servers
            else:
                bootstrap = shared_broker().bootstrap_servers
            profile = TANSU
        self.settings = KafkaSettings.resolve(
            bootstrap, topic_prefix=self._prefix or f"test-{uuid.uuid4().hex[:8]}",
            partitions=self._partitions or 4, profile=profile)
        self._export({BOOTSTRAP_ENV: bootstrap, PREFIX_ENV: self.settings.topic_prefix,
                      PARTITIONS_ENV: str(self.settings.partitions), PROFILE_ENV: self.settings.profile.name})
        self._resolved = KafkaSettings.resolve()
        await ensure_topics(self.settings, self.task_queues)
        runner = TaskRunner(self.workflows, self.activities)
        self.processor = Processor(self.settings, runner=runner, local_queues=self.task_queues, clock=self.clock)
        await self.processor.start()
        await self.processor.wait_assigned()
        if self._visibility:
            self._visibility_dir = tempfile.mkdtemp(prefix="treeflow-visibility-")
            self.visibility_url = f"sqlite:///{self._visibility_dir}/visibility.db"
            self._export({VISIBILITY_URL_ENV: self.visibility_url})
            self.visibility = VisibilityService(self.visibility_url, settings=self.settings)
            await self.visibility.start()  # it joins its group in the background
        self.client = Client(self.settings)
        await self.client.start()
        if self.time_skipping:
            self.client.result_waits = self._result_wait
            use_as_default(self.client, self._resolved)  # treeflow.execute_workflow waits through it too
            self._skipper = asyncio.ensure_future(self._skip_while_waited())

    async def stop(self) -> None:
        if self._skipper is not None:
            self._skipper.cancel()
            await asyncio.gather(self._skipper, return_exceptions=True)
        # Only this environment's: an enclosing environment's stay open.
        await close_default_clients(self._resolved)
        if self.client is not None:
            await self.client.close()
        if self.visibility is not None:
            await self.visibility.stop()
        if self._visibility_dir is not None:
            shutil.rmtree(self._visibility_dir, ignore_errors=True)
        if self.processor is not None:
            await self.processor.stop()
        if self._broker is not None:
            self._broker.stop()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def _export(self, variables: dict[str, str]) -> None:
        for name, value in variables.items():
            self._saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value

    async def execute_workflow(self, workflow: type | str, params: Any = None, **options: Any) -> Any:
        return await self.client.execute_workflow(workflow, params, **options)

    # ------------------------------------------------------------ time

    def now(self) -> datetime:
        """The environment's current time: the processor's clock (ahead of the system's
        clock by what was skipped, with ``time_skipping=True``)."""
        return self.clock.now()

    async def sleep(self, duration: timedelta | float) -> None:
        """Let `duration` (seconds, or a timedelta) pass for the workflows.

        With ``time_skipping=True``, time moves forward by hand: to each wakeup due within
        `duration` in turn (so the workflows react to each timer before the next fires),
        then to the end of it; returns once what became due is decided and nothing is
        runnable. A running activity is waited for on the system's clock (time does not
        skip past it). Without time skipping, an `asyncio.sleep`.
        """
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
        if seconds < 0:
            raise ValueError(f"cannot sleep a negative duration ({seconds:g}s)")
        if not isinstance(self.clock, VirtualClock):
            await asyncio.sleep(seconds)
            return
        target = self.clock.now() + timedelta(seconds=seconds)
        self._sleeping += 1
        try:
            while True:
                await self._settled()
                if self.clock.now() >= target:
                    return
                wake = self._processor().next_wakeup()
                self.clock.advance_to(target if wake is None or wake > target else wake)
        finally:
            self._sleeping -= 1

    @contextlib.contextmanager
    def _result_wait(self) -> Iterator[None]:
        self._result_waits += 1
        self._waited.set()
        try:
            yield
        finally:
            self._result_waits -= 1
            if not self._result_waits:
                self._waited.clear()

    async def _skip_while_waited(self) -> None:
        """While a result is awaited (and `sleep` is not moving time), jump the clock to
        the next wakeup whenever nothing is runnable."""
        assert isinstance(self.clock, VirtualClock)
        while True:
            await self._waited.wait()
            await asyncio.sleep(SKIP_POLL)
            if self._sleeping or not self._result_waits:
                continue
            wake = self._processor().next_wakeup()
            if wake is None or wake <= self.clock.now():
                continue  # nothing to skip to, or the processor's clock loop is about to tick
            try:
                quiet = await self._quiet()
            except Exception as exc:  # noqa: BLE001 - the broker hiccuped: time flows, ask again
                log.warning("time skipping could not read the commands topic's end (%r); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if quiet and self._result_waits and not self._sleeping:
                self.clock.advance_to(wake)

    async def _settled(self) -> None:
        """Wait until nothing is runnable and nothing is due."""
        while True:
            processor = self._processor()
            if processor.halted.is_set():
                raise TreeflowError(processor.liveness() or "the environment's processor stopped")
            wake = processor.next_wakeup()
            if (wake is None or wake > self.clock.now()) and await self._quiet():
                return
            await asyncio.sleep(SKIP_POLL)

    async def _quiet(self) -> bool:
        """Whether nothing is runnable: the processor is idle, this environment's client has
        no command waiting for its answer, and the processor has read the commands topic to
        the end it had after those were checked (and nothing moved meanwhile)."""
        processor, settings = self._processor(), self.settings
        assert settings is not None
        if not self._still(processor):
            return False
        before = _progress(processor)
        commands = [TopicPartition(settings.topics.commands, p) for p in range(settings.partitions)]
        ends = await end_offsets(settings, commands)
        positions = processor.positions()
        return (self._still(processor) and _progress(processor) == before
                and all(positions.get(tp.partition, 0) >= end for tp, end in ends.items()))

    def _still(self, processor: Processor) -> bool:
        return processor.idle() and not self.client.commands_in_flight

    def _processor(self) -> Processor:
        if self.processor is None:
            raise TreeflowError("the environment is not started: use `async with Environment(...)`")
        return self.processor


def _progress(processor: Processor) -> tuple[int, ...]:
    """Changes whenever the processor decides, appends or dispatches something."""
    stats = processor.stats
    return stats.commands, stats.events, stats.local_tasks, stats.remote_tasks
