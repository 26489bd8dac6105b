"""Fault and durability tests: kill -9 a worker and a processor mid-flight, rebuild
state from the events topic, and feed the processor garbage (DESIGN.md §3, §5, §6).

The kill tests run `treeflow processor` and `treeflow worker` as subprocesses (each
in its own session, so SIGKILL reaches the whole process group) against the test's
broker and topic prefix; the others run the processor in this process so its live
state can be inspected. The workflows are in `durable_app.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

import treeflow
from treeflow.client import Client
from treeflow.consumers import EventReader
from treeflow.core import fold
from treeflow.definitions import collect
from treeflow.kafka import KafkaSettings, end_offsets, ensure_topics, partition_for
from treeflow.kafka.profile import PROFILE_ENV
from treeflow.kafka.settings import BOOTSTRAP_ENV, PARTITIONS_ENV, PREFIX_ENV
from treeflow.payloads import to_json
from treeflow.processor.app import Processor
from treeflow.schemas import CLOSING_STATUS, COMMANDS, TASKS, Command, Event, EventType
from treeflow.schemas import models as m
from treeflow.worker.runner import TaskRunner
from treeflow.worker.worker import Worker

from . import durable_app as app
from .durable_app import ChainInput, ChainWorkflow, TaggedInput, FlakyWorkflow, ParentInput, ParentWorkflow, traces

pytestmark = pytest.mark.integration

APP_FILE = Path(__file__).with_name("durable_app.py")
REPO = Path(__file__).resolve().parents[2]
QUEUES = ("default",)


# ---------------------------------------------------------------- subprocesses


class Processes:
    """`treeflow` subprocesses pointed at one test's topics; all killed at teardown."""

    def __init__(self, settings: KafkaSettings, logdir: Path) -> None:
        self.settings = settings
        self.logdir = logdir
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("TREEFLOW_")}
        self.env.update({BOOTSTRAP_ENV: settings.bootstrap_servers, PREFIX_ENV: settings.topic_prefix,
                         PARTITIONS_ENV: str(settings.partitions), PROFILE_ENV: settings.profile.name,
                         "PYTHONUNBUFFERED": "1"})

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log_path = self.logdir / f"{name}-{len(self.running)}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen([sys.executable, "-m", "treeflow.cli", *args], cwd=REPO, env=self.env,
                                       stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.running.append((name, process, log_path))
        return process

    def processor(self, *args: str) -> subprocess.Popen[bytes]:
        return self.start("processor", "processor", *args)

    def worker(self) -> subprocess.Popen[bytes]:
        return self.start("worker", "worker", "--module", str(APP_FILE), "-q", "default")

    @staticmethod
    def kill(process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process's whole group and reap it."""
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=10)

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for name, process, path in self.running:
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path.name} (pid {process.pid}, exit {process.poll()}) ---\n{text[-tail:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for _, process, _ in self.running:
            try:
                self.kill(process)
            except Exception:  # keep killing the others
                pass


@pytest.fixture
def processes(settings: KafkaSettings, tmp_path: Path) -> Iterator[Processes]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    running = Processes(settings, logdir)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Where the activities of durable_app.py leave their traces."""
    path = tmp_path / "traces"
    path.mkdir()
    return path


@pytest.fixture
async def client(settings: KafkaSettings) -> AsyncIterator[Client]:
    await ensure_topics(settings, QUEUES)  # before any client touches the topics
    connected = await treeflow.connect(settings.bootstrap_servers, topic_prefix=settings.topic_prefix,
                                       partitions=settings.partitions, profile=settings.profile)
    try:
        yield connected
    finally:
        await asyncio.wait_for(connected.close(), 10)


# ---------------------------------------------------------------- helpers


async def wait_until(condition: Callable[[], Any], timeout: float, what: str,
                     diagnostics: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{diagnostics()}")
        await asyncio.sleep(0.02)


async def read_events(settings: KafkaSettings, partitions: list[int] | None = None) -> list[tuple[int, int, Event]]:
    """(partition, offset, event) of every event of the topic (or of `partitions`), in log order."""
    reader = EventReader(settings, partitions)
    found = [(item.partition, item.offset, item.event) async for item in reader]
    assert reader.stats.undecodable == 0, "the events topic holds a record that does not decode"
    return found


async def settle(settings: KafkaSettings, quiet: float = 1.0, timeout: float = 20.0) -> None:
    """Wait until the events topic has not grown for `quiet` seconds."""
    partitions = [TopicPartition(settings.topics.events, p) for p in range(settings.partitions)]
    deadline = time.monotonic() + timeout
    last = await end_offsets(settings, partitions)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = await end_offsets(settings, partitions)
        if now == last:
            return
        last = now
    raise AssertionError("the events topic kept growing")


def check_log(events: list[tuple[int, int, Event]], settings: KafkaSettings,
              closed: bool = True) -> dict[str, list[Event]]:
    """The log-wide invariants of DESIGN §3: every execution's sequences are exactly
    1..n in log order, event ids are unique, each run is started once and closed exactly
    once by its last event (the last run at most once when not `closed`), only a run
    closed by CONTINUED_AS_NEW is followed by another, and every event
    sits in its root's partition. Returns each execution's events in log order."""
    ids = Counter(event.event_id for _, _, event in events)
    duplicates = {event_id: n for event_id, n in ids.items() if n > 1}
    assert not duplicates, f"duplicate event ids: {duplicates}"
    by_exec: dict[str, list[Event]] = defaultdict(list)
    for partition, offset, event in events:
        context = event.workflow_context
        assert partition == partition_for(context.root_workflow_exec_id, settings.partitions), \
            f"event @{offset} of {context.workflow_exec_id} is in partition {partition}, not its root's"
        by_exec[context.workflow_exec_id].append(event)
    for exec_id, history in by_exec.items():
        sequences = [event.sequence for event in history]
        assert sequences == list(range(1, len(history) + 1)), \
            f"{exec_id}: sequences in log order are {sequences}, not 1..{len(history)}: " \
            f"{[(e.sequence, e.event_type.value) for e in history]}"
        # Each run starts once and is closed by its last event; a run closed by
        # CONTINUED_AS_NEW (continue-as-new, or a retried failure) is followed at once
        # by the next run's start.
        runs: dict[str, list[EventType]] = defaultdict(list)
        for event in history:
            runs[event.workflow_context.workflow_run_id].append(event.event_type)
        for number, (run_id, kinds) in enumerate(runs.items(), 1):
            last_run = number == len(runs)
            assert kinds[0] is EventType.WORKFLOW_EXECUTION_STARTED, f"{exec_id} run {run_id}: {kinds}"
            assert kinds.count(EventType.WORKFLOW_EXECUTION_STARTED) == 1, f"{exec_id} run {run_id}: {kinds}"
            closes = [kind for kind in kinds if kind in CLOSING_STATUS]
            if last_run and not closed and not closes:
                continue
            assert len(closes) == 1 and kinds[-1] in CLOSING_STATUS, \
                f"{exec_id} run {run_id} closed {len(closes)} times or not by its last event: {[k.value for k in kinds]}"
            assert (kinds[-1] is EventType.WORKFLOW_EXECUTION_CONTINUED_AS_NEW) == (not last_run), \
                f"{exec_id} run {run_id}: only a run that continues as new may be followed by another: {kinds}"
    return dict(by_exec)


async def unfinished(settings: KafkaSettings) -> str:
    """The event types of every execution whose last event does not close it (diagnostics)."""
    by_exec: dict[str, list[str]] = defaultdict(list)
    for _, _, event in await read_events(settings):
        by_exec[event.workflow_context.workflow_exec_id].append(event.event_type.value)
    return "\n".join(f"{exec_id}: {kinds}" for exec_id, kinds in by_exec.items()
                     if EventType(kinds[-1]) not in CLOSING_STATUS)


def activity_counts(history: list[Event], event_type: EventType) -> Counter[str]:
    return Counter(event.payload.activity_name for event in history if event.event_type is event_type)


# ---------------------------------------------------------------- 1. worker killed mid-activity


async def test_worker_killed_mid_activity_resumes_from_history(
        settings: KafkaSettings, client: Client, processes: Processes, workdir: Path) -> None:
    """kill -9 the worker while B runs: a new worker finishes the workflow; A (completed
    before the kill) never runs again, B runs again, each activity completes once in history."""
    processes.processor()  # no --module: every task goes through <prefix>.tasks.default
    first_worker = processes.worker()
    tag = f"kill-worker-{uuid.uuid4().hex[:6]}"
    handle = await asyncio.wait_for(
        client.start_workflow(ChainWorkflow, ChainInput(workdir=str(workdir), tag=tag, b_seconds=2.0)), 60)

    await wait_until(lambda: traces(workdir, "B-started"), 40, "activity B to start", processes.logs)
    processes.kill(first_worker)
    assert traces(workdir, "A") == [tag]
    assert traces(workdir, "B") == [], "B finished before the kill: the test did not kill it mid-activity"

    processes.worker()
    try:
        result = await asyncio.wait_for(handle.result(), 60)
    except TimeoutError:
        raise AssertionError(f"the workflow did not finish after the worker was replaced\n{processes.logs()}")
    assert result == app.chain_result(tag)

    history = await client.history(handle.execution_id)
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    names = ["durable_step_a", "durable_step_b", "durable_step_c"]
    assert activity_counts(history, EventType.ACTIVITY_TASK_COMPLETED) == Counter(names), \
        [(e.sequence, e.event_type.value) for e in history]
    assert activity_counts(history, EventType.ACTIVITY_TASK_SCHEDULED) == Counter(names)
    assert history[-1].event_type is EventType.WORKFLOW_EXECUTION_COMPLETED
    # A completed before the kill: the new worker replayed it from history, never re-ran it.
    assert traces(workdir, "A") == [tag]
    # B was cut off and ran again on the new worker; only the second run finished.
    assert len(traces(workdir, "B-started")) >= 2
    assert traces(workdir, "B") == [tag]
    assert traces(workdir, "C") == [tag]


async def test_worker_stopped_by_sigterm_finishes_its_running_activity_first(
        settings: KafkaSettings, client: Client, processes: Processes, workdir: Path) -> None:
    """SIGTERM the worker while B runs: it takes no new task, lets B finish and report,
    and exits 0; the next worker carries on from there, so B ran exactly once."""
    processes.processor()
    first_worker = processes.worker()
    tag = f"sigterm-{uuid.uuid4().hex[:6]}"
    handle = await asyncio.wait_for(
        client.start_workflow(ChainWorkflow, ChainInput(workdir=str(workdir), tag=tag, b_seconds=1.5)), 60)
    await wait_until(lambda: traces(workdir, "B-started"), 40, "activity B to start", processes.logs)
    os.killpg(first_worker.pid, signal.SIGTERM)
    exit_code = await asyncio.to_thread(first_worker.wait, 30)
    assert exit_code == 0, processes.logs()
    assert traces(workdir, "B") == [tag], "the worker exited before its running activity finished"

    processes.worker()
    assert await asyncio.wait_for(handle.result(), 60) == app.chain_result(tag)
    assert traces(workdir, "B-started") == [tag]  # finished by the first worker, never handed to the second
    history = await client.history(handle.execution_id)
    assert activity_counts(history, EventType.ACTIVITY_TASK_COMPLETED) == Counter(
        ["durable_step_a", "durable_step_b", "durable_step_c"])


# ---------------------------------------------------------------- 2. processor killed mid-stream


@pytest.mark.parametrize("hosted", [False, True], ids=["remote-worker", "hosted-activities"])
async def test_processor_killed_mid_stream_loses_and_duplicates_nothing(
        settings: KafkaSettings, client: Client, processes: Processes, workdir: Path, hosted: bool) -> None:
    """kill -9 the processor while 30 trees are in flight, start another: every
    execution completes with the right result, and the events topic holds each
    execution's history exactly once (sequences 1..n, unique ids, one close)."""
    module_args = ("--module", str(APP_FILE), "-q", "default") if hosted else ()
    first_processor = processes.processor(*module_args)
    if not hosted:
        processes.worker()
    # 20 chains (A, B sleeping 1 s, C) and 10 parent -> child trees, started 50 ms apart
    # so that the kill finds them at every stage, and some starts wait for the new processor.
    specs = []
    for i in range(30):
        if i % 3 == 2:
            data = f"tree-{i}"
            specs.append((ParentWorkflow, ParentInput(data=data), data, app.parent_result(data)))
        else:
            tag = f"chain-{i}"
            specs.append((ChainWorkflow, ChainInput(workdir=str(workdir), tag=tag, b_seconds=1.0), tag,
                          app.chain_result(tag)))

    async def start(i: int, workflow: type, params: Any, name: str) -> Any:
        await asyncio.sleep(0.05 * i)
        handle = await client.start_workflow(workflow, params, execution_id=f"{name}-{uuid.uuid4().hex[:6]}")
        return handle, await handle.result()

    running = asyncio.gather(*(start(i, *spec[:3]) for i, spec in enumerate(specs)))
    try:
        await wait_until(lambda: len(traces(workdir, "A")) >= 10, 60, "half the chains to run A",
                         processes.logs)
        processes.kill(first_processor)
        assert len(traces(workdir, "C")) < 20, "every chain finished before the kill"

        processes.processor(*module_args)
        outcomes = await asyncio.wait_for(asyncio.shield(running), 90)
    except BaseException as error:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        if isinstance(error, TimeoutError):
            raise AssertionError(f"not every execution finished after the processor restart\n"
                                 f"{await unfinished(settings)}\n{processes.logs()}")
        raise
    assert [result for _, result in outcomes] == [spec[3] for spec in specs]
    handles = [handle for handle, _ in outcomes]
    chains = [h.execution_id for h in handles if h.execution_id.startswith("chain-")]
    assert len(chains) == 20

    await settle(settings)
    by_exec = check_log(await read_events(settings), settings)
    roots = {h.execution_id for h in handles}
    children = {exec_id for exec_id, history in by_exec.items()
                if history[0].workflow_context.parent_workflow_exec_id is not None}
    assert set(by_exec) == roots | children
    assert len(children) == 10
    for exec_id, history in by_exec.items():
        assert history[-1].event_type is EventType.WORKFLOW_EXECUTION_COMPLETED, exec_id
        completed = activity_counts(history, EventType.ACTIVITY_TASK_COMPLETED)
        scheduled = activity_counts(history, EventType.ACTIVITY_TASK_SCHEDULED)
        assert completed == scheduled and set(completed.values()) <= {1}, f"{exec_id}: {completed} / {scheduled}"
        assert len(completed) == (3 if exec_id.startswith("chain-") else 1 if exec_id in children else 0), exec_id


# ---------------------------------------------------------------- in-process processor (3, 4)


@pytest.fixture
async def processor(settings: KafkaSettings, client: Client) -> AsyncIterator[Processor]:
    workflows, activities = collect([app])
    running = Processor(settings, runner=TaskRunner(workflows, activities), local_queues=QUEUES)
    await running.start()
    try:
        await running.wait_assigned(60)
        await wait_until(lambda: len(running.engines) == settings.partitions, 30, "every partition")
        yield running
    finally:
        await asyncio.wait_for(running.stop(), 30)


async def quiesce(processor: Processor, quiet: float = 0.5, timeout: float = 20.0) -> None:
    """Wait until the processor has appended nothing for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last = processor.stats.events
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet:
        if time.monotonic() > deadline:
            raise AssertionError("the processor never went quiet")
        await asyncio.sleep(0.05)
        if processor.stats.events != last:
            last, quiet_since = processor.stats.events, time.monotonic()


def state_diff(live: dict[str, Any], folded: dict[str, Any]) -> str:
    lines = []
    for exec_id in sorted(set(live) | set(folded)):
        a, b = live.get(exec_id), folded.get(exec_id)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"{exec_id}: live={a!r} folded={b!r}")
            continue
        for name in a.__dataclass_fields__:
            if getattr(a, name) != getattr(b, name) and a.__dataclass_fields__[name].compare:
                lines.append(f"{exec_id}.{name}: live={getattr(a, name)!r} folded={getattr(b, name)!r}")
    return "\n".join(lines)


# ---------------------------------------------------------------- 3. state == fold(events)


async def compare_with_fold(settings: KafkaSettings, processor: Processor) -> tuple[int, int]:
    """Assert that each partition's live state is the fold of that partition of the
    events topic; returns how many executions are (open, closed)."""
    await quiesce(processor)
    appended = processor.stats.events
    events = await read_events(settings)
    assert len(events) == appended == processor.stats.events, \
        f"the topic holds {len(events)} events, the processor appended {appended}, now {processor.stats.events}"
    check_log(events, settings, closed=False)
    open_count = closed_count = 0
    for partition in range(settings.partitions):
        live = dict(processor.engines[partition].states)
        folded = fold([event for p, _, event in events if p == partition])
        assert folded == live, f"partition {partition}: live state != fold(events)\n{state_diff(live, folded)}"
        open_count += sum(1 for s in live.values() if s.open)
        closed_count += sum(1 for s in live.values() if not s.open)
    return open_count, closed_count


async def test_live_state_equals_fold_of_events_topic(
        settings: KafkaSettings, client: Client, processor: Processor, workdir: Path) -> None:
    """DESIGN §5 invariant 1: for every partition, folding that partition of the events
    topic alone gives exactly the live processor's state: with closed executions, open
    ones waiting on timers and on children, and one whose activity is running and has
    heartbeated (state changed without an event); and again once that one finished."""
    wd = str(workdir)
    finishing = [client.start_workflow(ChainWorkflow, ChainInput(workdir=wd, tag=f"c{i}")) for i in range(6)]
    finishing += [client.start_workflow(ParentWorkflow, ParentInput(data=f"p{i}")) for i in range(4)]
    finishing += [client.start_workflow(FlakyWorkflow, TaggedInput(workdir=wd, tag=f"f{i}")) for i in range(2)]
    finishing += [client.start_workflow(app.SleeperWorkflow, 0.2)]
    staying = [client.start_workflow(app.SleeperWorkflow, 3600.0) for _ in range(3)]
    staying += [client.start_workflow(app.SleepyParentWorkflow, 3600.0) for _ in range(2)]
    done = await asyncio.wait_for(asyncio.gather(*finishing), 30)
    await asyncio.wait_for(asyncio.gather(*staying), 30)
    beating = await asyncio.wait_for(client.start_workflow(app.HeartbeatWorkflow, TaggedInput(workdir=wd, tag="hb")),
                                     30)
    results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in done)), 30)
    assert len(results) == 13
    assert len(traces(workdir, "flaky-failed")) == 2  # the retry path ran

    def live_states() -> list[Any]:
        return [s for engine in processor.engines.values() for s in engine.states.values()]

    def settled() -> bool:
        on_timer = sum(1 for s in live_states() if s.open and s.timers)
        beat = [s for s in live_states() if s.exec_id == beating.execution_id and s.heartbeats
                and all(a.started_at for a in s.activities.values())]
        return on_timer == 5 and bool(beat)

    await wait_until(settled, 20, "every open execution to wait on its timer and the heartbeats to arrive")
    # 13 finished roots + 4 children closed; 3 sleepers, 2 sleepy parents with their
    # 2 children, and the heartbeating one open.
    assert await compare_with_fold(settings, processor) == (8, 17)

    (workdir / "release-hb").touch()
    assert await asyncio.wait_for(beating.result(), 30) == "hb(hb)"
    assert await compare_with_fold(settings, processor) == (7, 18)


# ---------------------------------------------------------------- 4. garbage on the commands topic


async def test_undecodable_command_is_skipped_and_logged(
        settings: KafkaSettings, client: Client, processor: Processor, caplog: pytest.LogCaptureFixture) -> None:
    """Garbage records on <prefix>.commands are logged with their offsets, counted and
    skipped; a workflow started after them (same key, same partition) completes."""
    caplog.set_level(logging.ERROR, logger="treeflow.processor.app")
    root = f"after-garbage-{uuid.uuid4().hex[:8]}"
    partition = partition_for(root, settings.partitions)
    valid = COMMANDS.encode(Command(command_id="x", timestamp=datetime.now(timezone.utc), root_workflow_exec_id=root,
                                    workflow_exec_id=root, payload=m.SignalWorkflowExecution(signal_name="s")))
    garbage = [
        b"\x00\x01 this is not avro \xff\xfe",          # no magic
        b"",                                            # empty
        valid[:2] + b"\x00" * 8 + valid[10:],           # magic, unknown schema fingerprint
        valid[:-5],                                     # valid header, body cut short
        valid + b"\x00\x00",                            # trailing bytes
    ]
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                **settings.profile.producer_options())
    await producer.start()
    try:
        offsets = []
        for value in garbage:
            metadata = await producer.send_and_wait(settings.topics.commands, value, key=root.encode())
            assert metadata.partition == partition
            offsets.append(metadata.offset)
    finally:
        await producer.stop()

    handle = await asyncio.wait_for(client.start_workflow(ParentWorkflow, ParentInput(data="after"),
                                                          execution_id=root), 30)
    assert await asyncio.wait_for(handle.result(), 30) == app.parent_result("after")
    assert processor.stats.undecodable == len(garbage)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for offset in offsets:
        position = f"{settings.topics.commands}[{partition}]@{offset}"
        assert any("undecodable" in msg and position in msg for msg in messages), (position, messages)
    check_log(await read_events(settings), settings)


async def test_tombstone_command_is_skipped(
        settings: KafkaSettings, client: Client, processor: Processor, caplog: pytest.LogCaptureFixture) -> None:
    """A record with no value at all (a tombstone) is skipped like any undecodable one."""
    caplog.set_level(logging.ERROR, logger="treeflow.processor.app")
    root = f"after-tombstone-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                **settings.profile.producer_options())
    await producer.start()
    try:
        metadata = await producer.send_and_wait(settings.topics.commands, None, key=root.encode())
    finally:
        await producer.stop()
    handle = await asyncio.wait_for(client.start_workflow(ParentWorkflow, ParentInput(data="t"),
                                                          execution_id=root), 30)
    assert await asyncio.wait_for(handle.result(), 30) == app.parent_result("t")
    assert processor.stats.undecodable == 1
    position = f"{settings.topics.commands}[{metadata.partition}]@{metadata.offset}"
    assert any(position in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]




# ---------------------------------------------------------------- 5. command offsets


async def test_command_offsets_are_committed_once_their_events_are_in_the_log(
        settings: KafkaSettings, client: Client, processor: Processor) -> None:
    """The processor holds each command's offset until the events it caused are
    acknowledged, then lets faust commit it (every second): the group's committed
    offsets reach the end of every commands partition, so nothing is held forever and
    a restart re-reads nothing."""
    from aiokafka.admin import AIOKafkaAdminClient

    handles = [await client.start_workflow(ParentWorkflow, ParentInput(data=f"o{i}")) for i in range(8)]
    assert await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 30) == \
        [app.parent_result(f"o{i}") for i in range(8)]
    await quiesce(processor)
    commands = [TopicPartition(settings.topics.commands, p) for p in range(settings.partitions)]
    ends = await end_offsets(settings, commands)
    assert sum(ends.values()) == 8  # the starts (the in-process runner's reports skip the topic)
    expected = {tp.partition: ends[tp] for tp in commands if ends[tp]}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            committed = await admin.list_consumer_group_offsets(f"{settings.topic_prefix}-processor",
                                                                partitions=commands)
            offsets = {tp.partition: meta.offset for tp, meta in committed.items() if tp.partition in expected}
            if offsets == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await admin.close()
    assert offsets == expected


async def test_a_second_processor_group_rereading_every_command_appends_nothing(
        settings: KafkaSettings, client: Client, processor: Processor, workdir: Path) -> None:
    """A processor that reads the commands topic again from the start (here a new consumer
    group: the worst case of a lost offset commit) decides nothing twice: every event
    records up to which commands offset the log is complete, and recovery skips those
    commands. The case the core alone cannot see: a start rejected while its execution
    ran, read again after the execution closed, must not start a new run."""
    exec_id = f"rejected-{uuid.uuid4().hex[:6]}"
    handle = await client.start_workflow(app.SleeperWorkflow, 1.0, execution_id=exec_id)
    with pytest.raises(treeflow.WorkflowAlreadyStartedError):
        await client.start_workflow(app.SleeperWorkflow, 1.0, execution_id=exec_id)
    assert await asyncio.wait_for(handle.result(), 30) == "echo:before-sleep, slept 1.0"
    await quiesce(processor)
    before = await read_events(settings)
    commands = [TopicPartition(settings.topics.commands, p) for p in range(settings.partitions)]
    sent = sum((await end_offsets(settings, commands)).values())
    assert sent == 2

    workflows, activities = collect([app])
    second = Processor(settings, runner=TaskRunner(workflows, activities), local_queues=QUEUES,
                       app_id=f"{settings.topic_prefix}-second")
    await second.start()
    try:
        await second.wait_assigned(60)
        await wait_until(lambda: second.stats.redelivered + second.stats.commands >= sent, 30,
                         "the second processor to read every command")
        await quiesce(second)
        assert (second.stats.redelivered, second.stats.commands, second.stats.events) == (sent, 0, 0)
    finally:
        await asyncio.wait_for(second.stop(), 30)
    after = await read_events(settings)
    assert [e.event_id for _, _, e in after] == [e.event_id for _, _, e in before]


async def test_a_burst_of_commands_is_decided_a_fetch_at_a_time(
        settings: KafkaSettings, client: Client, processor: Processor) -> None:
    """faust hands the records of a fetch to the processor's agent one at a time; the
    processor decides a fetch's records together, in one pass (one append, one
    acknowledgement). It used to decide one command per pass while the rest of the fetch
    was handed over, so a burst that outran it queued up in the topic. Every command of
    the burst is still decided once, and its execution completes."""
    count = 300
    roots = [f"burst-{n:03d}-{uuid.uuid4().hex[:6]}" for n in range(count)]
    before = processor.stats.command_batches
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **settings.profile.producer_options())
    await producer.start()
    try:
        for root in roots:
            command = Command(command_id=f"start-{root}", timestamp=datetime.now(timezone.utc),
                              root_workflow_exec_id=root, workflow_exec_id=root,
                              payload=m.StartWorkflowExecution(workflow_name="durable_child", task_queue="default",
                                                               input_json=to_json({"value": root})))
            await producer.send(settings.topics.commands, COMMANDS.encode(command), key=root.encode())
        await producer.flush()
    finally:
        await producer.stop()
    closed = lambda: sum(not state.open for engine in processor.engines.values()  # noqa: E731
                         for state in engine.states.values())
    await wait_until(lambda: closed() >= count, 60, "the burst's executions to close",
                     lambda: f"{closed()} closed; {processor.stats}")
    await quiesce(processor)
    passes = processor.stats.command_batches - before
    assert passes <= count // 10, f"the {count} commands of the burst took {passes} passes"
    assert processor.stats.redelivered == 0 and processor.stats.undecodable == 0
    by_exec = check_log(await read_events(settings), settings)
    assert set(by_exec) == set(roots)
    for root, history in by_exec.items():
        assert history[-1].event_type is EventType.WORKFLOW_EXECUTION_COMPLETED, root
        assert history[-1].payload.result_json == to_json(f"echo:{root}"), root


# ---------------------------------------------------------------- 6. outages and redelivery (DESIGN §5 inv. 5, 6)


async def remote_processor(settings: KafkaSettings) -> Processor:
    """A processor in this process that hosts no queue: every task goes through the tasks topic."""
    running = Processor(settings)
    await running.start()
    await running.wait_assigned(60)
    await wait_until(lambda: len(running.engines) == settings.partitions and not any(
        e.recovering for e in running.engines.values()), 30, "every partition recovered")
    return running


async def in_process_worker(settings: KafkaSettings, eager_activities: bool = True) -> Worker:
    workflows, activities = collect([app])
    worker = Worker(settings, workflows, activities, QUEUES, eager_activities=eager_activities)
    await worker.start()
    return worker


def activity_tasks(records: list[Any], activity_id: str) -> list[Any]:
    return [t for t in records if isinstance(t.payload, m.ActivityTask) and t.payload.activity_id == activity_id]


async def read_tasks(settings: KafkaSettings) -> list[Any]:
    """Every record of the default queue's tasks topic, decoded."""
    topic = settings.topics.tasks("default")
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
                                fetch_max_wait_ms=settings.profile.fetch_wait_ms())
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.partitions)]
        ends = await end_offsets(settings, partitions)
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, 0)
        found = []
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining:
            for tp, records in (await consumer.getmany(*remaining, timeout_ms=500)).items():
                for record in records:
                    found.append(TASKS.decode(record.value))
                    if record.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
        return found
    finally:
        await consumer.stop()


async def test_a_report_waiting_through_a_processor_outage_times_nothing_out(
        settings: KafkaSettings, client: Client, workdir: Path) -> None:
    """The worker's CompleteWorkflowTask (scheduling an activity with one 5 s attempt)
    waits in the commands topic through a 6 s processor outage. Deadlines count from
    the decision, not the report's timestamp: the activity runs and the workflow
    completes (it used to be SCHEDULED and TIMED_OUT in the same instant, and fail)."""
    first = await remote_processor(settings)
    handle = await client.start_workflow(app.OneShotWorkflow, TaggedInput(workdir=str(workdir), tag="free-wait"))
    await wait_until(lambda: first.stats.remote_tasks >= 1, 20, "the workflow task to be dispatched")
    await asyncio.wait_for(first.stop(), 30)
    worker = await in_process_worker(settings)
    try:
        await wait_until(lambda: worker.stats.workflow_tasks >= 1, 30, "the worker to answer the workflow task")
        await asyncio.sleep(6)  # the outage outlasts the activity's start-to-close
        second = await remote_processor(settings)
        try:
            assert await asyncio.wait_for(handle.result(), 60) == "gated(free-wait)"
        finally:
            await asyncio.wait_for(second.stop(), 30)
    finally:
        await asyncio.wait_for(worker.stop(), 30)
    history = await client.history(handle.execution_id)
    kinds = [e.event_type for e in history]
    assert EventType.ACTIVITY_TASK_TIMED_OUT not in kinds, [k.value for k in kinds]
    [scheduled] = [e for e in history if e.event_type is EventType.ACTIVITY_TASK_SCHEDULED]
    completed_task = next(e for e in history if e.event_type is EventType.WORKFLOW_TASK_COMPLETED)
    assert scheduled.timestamp == completed_task.timestamp  # decided together, after the outage
    assert len(app.starts(workdir)) == 1


async def test_a_partition_recovered_with_reports_in_its_backlog_decides_them_first(
        settings: KafkaSettings, client: Client, workdir: Path) -> None:
    """The activity completes while the processor is down; its report waits in the
    commands topic past the attempt's start-to-close. The recovering processor decides
    that backlog before it re-dispatches anything or lets the clock tick: the task is
    not sent again, the activity runs once, nothing times out."""
    first = await remote_processor(settings)
    worker = await in_process_worker(settings)
    tag = "gate-backlog"
    try:
        handle = await client.start_workflow(app.OneShotWorkflow, TaggedInput(workdir=str(workdir), tag=tag))
        await wait_until(lambda: app.starts(workdir), 30, "the activity to start")
        stopped_at = time.monotonic()
        await asyncio.wait_for(first.stop(), 30)
        (workdir / f"release-{tag}").touch()  # it completes during the outage
        await asyncio.sleep(max(0.0, 6 - (time.monotonic() - stopped_at)))
        second = await remote_processor(settings)
        try:
            assert await asyncio.wait_for(handle.result(), 60) == f"gated({tag})"
            await asyncio.sleep(1)  # a re-dispatched task would be picked up by now
        finally:
            await asyncio.wait_for(second.stop(), 30)
    finally:
        await asyncio.wait_for(worker.stop(), 30)
    assert second.stats.backlog >= 1
    history = await client.history(handle.execution_id)
    kinds = [e.event_type for e in history]
    assert EventType.ACTIVITY_TASK_TIMED_OUT not in kinds, [k.value for k in kinds]
    assert kinds.count(EventType.ACTIVITY_TASK_COMPLETED) == 1
    # One task, or none: the worker ran the attempt eagerly (README "Eager activities"), and
    # the processor stopped before it sent the attempt's task copy.
    assert len(activity_tasks(await read_tasks(settings), "1")) <= 1, "the activity's task was dispatched again"
    assert len(app.starts(workdir)) == 1


async def test_a_task_redelivered_after_its_completion_does_not_run(
        settings: KafkaSettings, client: Client, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker reports the completion and goes away before committing the task's
    offset: the next worker of the group reads the task again, claims the attempt, is
    refused (the completion is recorded) and does not run it."""
    processor = await remote_processor(settings)
    try:
        # Not eager: the attempt's task goes out at once (an eager attempt's copy would
        # not, once the attempt completed within EAGER_COPY_DELAY).
        first = await in_process_worker(settings, eager_activities=False)

        async def no_commit(*_: Any) -> None:
            return None

        monkeypatch.setattr(first, "_commit", no_commit)
        handle = await client.start_workflow(app.OneShotWorkflow, TaggedInput(workdir=str(workdir),
                                                                               tag="free-redelivered"))
        assert await asyncio.wait_for(handle.result(), 60) == "gated(free-redelivered)"
        await asyncio.wait_for(first.stop(), 30)
        second = await in_process_worker(settings)
        try:
            await wait_until(lambda: second.stats.activity_tasks >= 1, 60, "the task to be read again")
            await wait_until(lambda: second.runner.closed_tasks >= 1, 20, "the claim to be refused",
                             lambda: str(second.stats))
        finally:
            await asyncio.wait_for(second.stop(), 30)
    finally:
        await asyncio.wait_for(processor.stop(), 30)
    assert len(app.starts(workdir)) == 1


async def test_copies_of_a_task_run_once(settings: KafkaSettings, client: Client, workdir: Path) -> None:
    """Two more copies of a running activity's task arrive at once: the worker running it
    drops them. A copy a recovered processor sends (not `first_dispatch`) arriving after
    the completion is recorded is claimed and refused. The attempt runs once."""
    processor = await remote_processor(settings)
    worker = await in_process_worker(settings, eager_activities=False)  # the copies of a dispatched task
    tag = "gate-copies"
    try:
        handle = await client.start_workflow(app.OneShotWorkflow, TaggedInput(workdir=str(workdir), tag=tag))
        await wait_until(lambda: app.starts(workdir), 30, "the activity to start")
        [task] = activity_tasks(await read_tasks(settings), "1")
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                    **settings.profile.producer_options())
        await producer.start()
        try:
            key = task.workflow_context.root_workflow_exec_id.encode()
            for _ in range(2):
                await producer.send_and_wait(settings.topics.tasks("default"), TASKS.encode(task), key=key)
            await wait_until(lambda: worker.runner.duplicate_tasks == 2, 20, "the copies to be dropped")
            (workdir / f"release-{tag}").touch()
            assert await asyncio.wait_for(handle.result(), 60) == f"gated({tag})"
            # As a processor re-sends it after a recovery: marked as maybe not the only copy.
            again = task.model_copy(update={"payload": task.payload.model_copy(update={"first_dispatch": False})})
            await producer.send_and_wait(settings.topics.tasks("default"), TASKS.encode(again), key=key)
            await wait_until(lambda: worker.runner.closed_tasks == 1, 20, "the late copy to be refused")
        finally:
            await producer.stop()
    finally:
        await asyncio.wait_for(worker.stop(), 30)
        await asyncio.wait_for(processor.stop(), 30)
    assert len(app.starts(workdir)) == 1
