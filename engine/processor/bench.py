"""Benchmark: processor recovery time and memory against history (DESIGN.md §5 invariant 7).

    python -m treeflow.processor.bench [--closed 0,10000,100000] [--open 0,10000] [--partitions 2]
                                       [--modes before,after] [--prime auto|processor|bench] [--throughput-runs N]

For each scenario it writes a synthetic events log (made by the real core, so it is
what a processor would have appended) of `closed` flat executions that closed a day
ago (workflow -> one activity, 7 events each) and `open` ones waiting on a day-long
timer, to fresh topics on the embedded broker (or TREEFLOW_BOOTSTRAP_SERVERS). Then it
runs a processor subprocess hosting `treeflow.bench`'s workflows, in two modes:

- `before`: no snapshots and closed executions kept forever (TREEFLOW_SNAPSHOT_INTERVAL=0,
  a retention of 30 years): what the processor did before snapshots and retention;
- `after`: the defaults; the measured run recovers from snapshots, taken either by a
  first processor run that folds the whole log and is stopped (`--prime processor`),
  or by the bench, which folds the log it writes with the processor's `PartitionEngine`
  and writes each partition's snapshot with its `SnapshotStore` (`--prime bench`, the
  default on the embedded broker, whose fetches of a long partition are slow).

and prints, per run: the recovery (seconds the processor spent reading and folding its
partitions: snapshot + tail), the time from the process start until a new execution
started then completed, the processor's RSS after that, the executions it holds, and
the throughput of `--throughput-runs` flat executions after it (50 in flight).
Goal: recovery and RSS flat in the number of closed executions (< 0.15 s and < 3 MB
more per 10,000 closed). Also `--soak SECONDS`: a steady load at `--rate` executions/s
against one processor, printing its RSS, heap (malloc in use, Python's blocks; the
traced heap with TREEFLOW_HEAP_PROBE) and throughput every 10 s, and for each figure
its slope over the first half of the run against the last half (a plateau check);
`--client-fetch RUNS`: the bytes a client fetches per awaited result, with one
client and with four running at once (RUNS executions each); and `--heap-soak N`: the
engine alone fed N flat executions in simulated time, its heap printed as it goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

EPOCH_AGO = timedelta(days=1)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- the synthetic log


def flat_events(exec_id: str, at: datetime, close: bool) -> list[Any]:
    """The events the core appends for one flat execution (or one left on a timer)."""
    from treeflow.schemas import Command
    from treeflow.schemas import models as m

    from .engine import PartitionEngine

    engine = PartitionEngine(0)
    events: list[Any] = []
    n = 0

    def send(payload: Any) -> None:
        nonlocal n
        n += 1
        command = Command(command_id=f"{exec_id}-{n}", timestamp=at + timedelta(milliseconds=n),
                          root_workflow_exec_id=exec_id, workflow_exec_id=exec_id, payload=payload)
        events.extend(engine.handle(command, command.timestamp).events)

    def task() -> dict[str, Any]:
        state = engine.states[exec_id]
        return {"task_id": state.workflow_task.task_id, "workflow_run_id": state.context.workflow_run_id,  # type: ignore[union-attr]
                "history_length": state.last_sequence}

    send(m.StartWorkflowExecution(workflow_name="bench_flat", task_queue="default", input_json='{"value": "x"}'))
    if not close:
        send(m.CompleteWorkflowTask(**task(), decisions=[m.StartTimer(timer_id="t", duration_ms=2 * 86_400_000)]))
        return events
    send(m.CompleteWorkflowTask(**task(), decisions=[m.ScheduleActivityTask(
        activity_id="1", activity_name="bench_activity", task_queue="default", input_json='["x"]')]))
    run = engine.states[exec_id].context.workflow_run_id
    send(m.CompleteActivityTask(activity_id="1", workflow_run_id=run, attempt=1, result_json='"processed:x"'))
    send(m.CompleteWorkflowTask(**task(), decisions=[m.CompleteWorkflowExecution(result_json='"processed:x"')]))
    return events


ID_LENGTH = 20


async def write_log(settings: Any, closed: int, opened: int,
                    fold: dict[int, Any] | None = None) -> tuple[int, dict[int, int]]:
    """Append the synthetic executions to the events topic; returns the event count and
    each partition's end offset.

    Each kind's events are made once by the core for a placeholder id and encoded; every
    execution gets a copy with its own id (of the same length) in place of it. With
    `fold` (a `PartitionEngine` per partition) each event is also folded there, as the
    processor that appended them would have (closed executions evicted as it goes)."""
    from treeflow.kafka import clients, partition_for
    from treeflow.schemas import EVENTS

    placeholder = "T" * ID_LENGTH
    templates = {}
    for kind, age in ((True, EPOCH_AGO), (False, timedelta(hours=1))):
        events = flat_events(placeholder, datetime.now(timezone.utc) - age, kind)
        templates[kind] = [(EVENTS.encode(e), e.event_type.value.encode()) for e in events]
    producer = await clients.start(clients.producer(settings, "bench", linger_ms=5, max_batch_size=512 * 1024),
                                   settings)
    count = 0
    token = placeholder.encode()
    ends: dict[int, int] = {p: 0 for p in range(settings.partitions)}
    unfolded: dict[int, list[Any]] = {p: [] for p in range(settings.partitions)}
    now = datetime.now(timezone.utc)

    def fold_pending(partition: int) -> None:
        if fold is not None and unfolded[partition]:
            fold[partition].replay(unfolded[partition], now)
            unfolded[partition] = []

    async def settle(pending: list[Any]) -> None:
        for sent in await asyncio.gather(*pending):
            ends[sent.partition] = max(ends[sent.partition], sent.offset + 1)
        pending.clear()

    try:
        pending: list[Any] = []
        for i in range(closed + opened):
            is_closed = i < closed
            exec_id = f"{'c' if is_closed else 'o'}{i:011d}-{uuid.uuid4().hex[:7]}"
            assert len(exec_id) == ID_LENGTH
            key = exec_id.encode()
            partition = partition_for(exec_id, settings.partitions)
            for template, event_type in templates[is_closed]:
                value = template.replace(token, key)
                pending.append(await producer.send(
                    settings.topics.events, value, key=key, partition=partition,
                    headers=[("tf.type", event_type), ("tf.exec", key), ("tf.durable", b"-1")]))
                if fold is not None:
                    unfolded[partition].append(EVENTS.decode(value))
                count += 1
            if len(unfolded[partition]) > 50_000:
                fold_pending(partition)
            if len(pending) > 20_000:
                await settle(pending)
        await settle(pending)
        for partition in unfolded:
            fold_pending(partition)
    finally:
        await producer.stop()
    return count, ends


async def seed_snapshots(settings: Any, engines: dict[int, Any], ends: dict[int, int]) -> None:
    """Write each partition's snapshot at its end, as the processor that appended the
    log would have (its `SnapshotStore`, the image of its `PartitionEngine`)."""
    from treeflow.kafka import clients

    from .snapshots import SnapshotOptions, SnapshotStore

    producer = await clients.start(clients.producer(settings, "bench"), settings)
    try:
        store = SnapshotStore(settings, producer, SnapshotOptions.from_env())
        for partition, engine in engines.items():
            await store.write(partition, engine.export(), events_offset=ends[partition], durable_offset=-1,
                              taken_at=datetime.now(timezone.utc))
    finally:
        await producer.stop()


# ---------------------------------------------------------------- the processor subprocess


def serve(app_id: str) -> None:
    """Run a processor hosting treeflow.bench (for the parent); print one RECOVERED line."""
    import signal

    from treeflow import bench
    from treeflow.definitions import collect
    from treeflow.kafka import KafkaSettings
    from treeflow.worker.runner import TaskRunner

    from .app import Processor

    began = time.perf_counter()

    async def run() -> None:
        settings = KafkaSettings.resolve()
        workflows, activities = collect([bench])
        processor = Processor(settings, runner=TaskRunner(workflows, activities), local_queues=("default",),
                              app_id=app_id)
        await processor.start()
        await processor.wait_assigned(120)
        while len(processor.engines) < settings.partitions:
            await asyncio.sleep(0.01)
        stats = processor.stats
        print("RECOVERED " + json.dumps({
            "ready_s": time.perf_counter() - began, "recovery_s": stats.recovery_seconds,
            "events": stats.recovered_events, "from_snapshot": stats.recovered_from_snapshot,
            "executions": sum(len(e.states) for e in processor.engines.values())}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1)
            except asyncio.TimeoutError:
                pass
            print("STATS " + json.dumps({**allocator_figures(), "tasks": len(asyncio.all_tasks()),
                                         "snapshots": processor.stats.snapshots_written,
                                         "unsnapshotted": sum(log.snapshotted != log.appended
                                                              for log in processor._logs.values()),
                                         "evicted": processor.stats.evicted,
                                         "executions": sum(len(e.states) for e in processor.engines.values())}),
                  flush=True)
        await processor.stop()

    asyncio.run(run())


def allocator_figures() -> dict[str, float]:
    """Cheap figures of this process's heap: the blocks Python's allocator holds and,
    on glibc, the bytes malloc has in use (the heap without RSS's free and mapped pages)."""
    from treeflow.observability.heap import malloc_figures

    return {"py_blocks": sys.getallocatedblocks(), **(malloc_figures() or {})}


class ProcessorRun:
    def __init__(self, env: dict[str, str], log: Path, app_id: str) -> None:
        from treeflow.bench import Child

        self.log = log
        self.child = Child("processor", [sys.executable, "-m", "treeflow.processor.bench", "--serve", app_id], log)
        self.began = time.perf_counter()
        self.child.start(env)

    def lines(self, prefix: str) -> list[dict[str, Any]]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [json.loads(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)]

    async def recovered(self, timeout: float = 2400) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not (found := self.lines("RECOVERED ")):
            if not self.child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the processor did not recover:\n{self.child.log_tail()}")
            await asyncio.sleep(0.05)
        return found[0]

    def stop(self) -> None:
        self.child.stop(30)


async def one_execution(settings: Any) -> float:
    """Seconds to start and complete a new flat execution."""
    from treeflow.bench import BenchFlat, BenchFlatInput
    from treeflow.client import Client

    client = Client(settings)
    await client.start()
    try:
        began = time.perf_counter()
        await asyncio.wait_for(client.execute_workflow(BenchFlat, BenchFlatInput(value="x")), 120)
        return time.perf_counter() - began
    finally:
        await client.close()


async def throughput(settings: Any, runs: int, in_flight: int = 50) -> float:
    """Flat executions per second, `runs` of them with `in_flight` at a time."""
    from treeflow.bench import BenchFlat, BenchFlatInput
    from treeflow.client import Client

    client = Client(settings)
    await client.start()
    gate = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with gate:
            await client.execute_workflow(BenchFlat, BenchFlatInput(value="x"))

    try:
        began = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(runs))), 600)
        return runs / (time.perf_counter() - began)
    finally:
        await client.close()


async def scenario(bootstrap: str, profile: Any, partitions: int, closed: int, opened: int,
                   log_dir: Path, modes: list[str], prime: str, throughput_runs: int) -> list[dict[str, Any]]:
    from treeflow.kafka import KafkaSettings, ensure_topics
    from treeflow.kafka.profile import PROFILE_ENV
    from treeflow.kafka.settings import BOOTSTRAP_ENV, PARTITIONS_ENV, PREFIX_ENV

    from .engine import PartitionEngine

    prefix = f"recovery-{uuid.uuid4().hex[:6]}"
    settings = KafkaSettings.resolve(bootstrap, topic_prefix=prefix, partitions=partitions, profile=profile)
    await ensure_topics(settings)
    began = time.perf_counter()
    engines = ({p: PartitionEngine(p) for p in range(partitions)}
               if prime == "bench" and "after" in modes else None)
    events, ends = await write_log(settings, closed, opened, engines)
    print(f"  log: {closed:,} closed + {opened:,} open executions = {events:,} events "
          f"(written{' and folded' if engines else ''} in {time.perf_counter() - began:.1f} s)",
          file=sys.stderr, flush=True)
    base = {**os.environ, BOOTSTRAP_ENV: bootstrap, PREFIX_ENV: prefix, PARTITIONS_ENV: str(partitions),
            PROFILE_ENV: profile.name, "PYTHONUNBUFFERED": "1"}
    settings_of = {"before": {"TREEFLOW_SNAPSHOT_INTERVAL": "0",
                              "TREEFLOW_CLOSED_RETENTION": str(30 * 365 * 86400)},
                   "after": {"TREEFLOW_SNAPSHOT_INTERVAL": "1"}}
    results = []
    for mode in modes:
        extra = settings_of[mode]
        env = {**base, **extra}
        if mode == "after" and engines is not None:
            await seed_snapshots(settings, engines, ends)
        elif mode == "after":
            # A first run takes the snapshots (after folding the whole log once).
            first_run = ProcessorRun(env, log_dir / f"{prefix}-prime.log", f"{prefix}-prime")
            await first_run.recovered()
            await one_execution(settings)
            deadline, stable_since, last = time.monotonic() + 600, time.monotonic(), -1
            while time.monotonic() - stable_since < 3:
                stats = first_run.lines("STATS ")[-1:]
                seen = stats[0]["snapshots"] if stats else 0
                if seen != last or seen == 0 or stats[0]["unsnapshotted"]:
                    stable_since, last = time.monotonic(), seen
                if time.monotonic() > deadline:
                    raise RuntimeError("no snapshots were written")
                await asyncio.sleep(0.2)
            first_run.stop()
        run = ProcessorRun(env, log_dir / f"{prefix}-{mode}.log", f"{prefix}-{mode}")
        try:
            recovered = await run.recovered()
            first = await one_execution(settings)
            ready = time.perf_counter() - run.began
            await asyncio.sleep(1)
            rss = rss_mb(run.child.pid)  # type: ignore[arg-type]
            rate = await throughput(settings, throughput_runs) if throughput_runs else float("nan")
        finally:
            run.stop()
        results.append({"mode": mode, "closed": closed, "open": opened, "log_events": events, **recovered,
                        "start_to_completed_s": ready, "first_execution_s": first, "rss_mb": rss,
                        "throughput_per_s": rate})
        r = results[-1]
        print(f"  {mode:6}: recovery {r['recovery_s']:.3f} s ({r['events']:,} events folded, "
              f"{r['from_snapshot']} partitions from snapshots), start -> a new execution completed "
              f"{r['start_to_completed_s']:.2f} s, RSS {rss:.1f} MB, {r['executions']:,} executions in memory, "
              f"then {rate:.0f} executions/s", flush=True)
    return results


def heap_soak(executions: int, rate: float, retention: float) -> None:
    """The processor's `PartitionEngine` alone, fed flat executions at `rate` per second
    of simulated time (no broker, no wall clock): its traced heap every tenth of the
    run. Flat once the retention has passed: what a long run
    costs in memory does not grow with the executions it has seen."""
    import gc
    import tracemalloc

    from treeflow.schemas import Command
    from treeflow.schemas import models as m

    from .engine import PartitionEngine

    engine = PartitionEngine(0, timedelta(seconds=retention))
    began = datetime(2026, 1, 1, tzinfo=timezone.utc)
    sent = 0

    def send(exec_id: str, payload: Any, at: datetime) -> None:
        nonlocal sent
        sent += 1
        engine.handle(Command(command_id=f"c{sent}", timestamp=at, root_workflow_exec_id=exec_id,
                              workflow_exec_id=exec_id, payload=payload, reply_partition=0), at)

    def task(exec_id: str) -> dict[str, Any]:
        state = engine.states[exec_id]
        return {"task_id": state.workflow_task.task_id, "workflow_run_id": state.context.workflow_run_id,  # type: ignore[union-attr]
                "history_length": state.last_sequence}

    tracemalloc.start()
    samples = []
    for i in range(executions + 1):
        at = began + timedelta(seconds=i / rate)
        if i % max(1, executions // 10) == 0:
            gc.collect()
            heap = tracemalloc.get_traced_memory()[0] / 1e6
            samples.append(heap)
            print(f"  {i:9,} executions ({i / rate:7.0f} s simulated): heap {heap:6.1f} MB, "
                  f"{len(engine.states):,} executions in memory", flush=True)
        exec_id = f"e{i}"
        send(exec_id, m.StartWorkflowExecution(workflow_name="bench_flat", task_queue="default",
                                               input_json='{"value": "x"}'), at)
        send(exec_id, m.CompleteWorkflowTask(**task(exec_id), decisions=[m.ScheduleActivityTask(
            activity_id="1", activity_name="bench_activity", task_queue="default", input_json='["x"]')]), at)
        run = engine.states[exec_id].context.workflow_run_id
        send(exec_id, m.CompleteActivityTask(activity_id="1", workflow_run_id=run, attempt=1,
                                             result_json='"processed:x"'), at)
        send(exec_id, m.CompleteWorkflowTask(**task(exec_id), decisions=[m.CompleteWorkflowExecution(
            result_json='"processed:x"')]), at)
        if i % max(1, int(rate)) == 0:  # the processor's housekeeping and clock, once a simulated second
            engine.evict_closed(at)
            engine.tick(at, f"tick-{i}")
    settled = samples[len(samples) // 2:]
    print(f"heap soak: {executions:,} executions at {rate:g}/s, retention {retention:g} s: heap over the second "
          f"half {min(settled):.1f}-{max(settled):.1f} MB")


async def distinct_clients(settings: Any, count: int) -> list[Any]:
    """`count` started clients, each on its own replies partition (when there are enough)."""
    from treeflow.client import Client

    clients: list[Any] = []
    while len(clients) < count:
        client = Client(settings)
        await client.start()  # picks the replies partition
        taken = {c.reply_partition for c in clients}
        if client.reply_partition in taken and len(taken) < settings.partitions:
            await client.close()
            continue
        clients.append(client)
    return clients


async def soak(bootstrap: str, profile: Any, partitions: int, seconds: float, rate: float, log_dir: Path,
               client_count: int = 4) -> None:
    """A steady load against one processor from `client_count` clients: RSS, heap figures
    and throughput every 10 s, then each figure's first-half and last-half slopes."""
    from treeflow.bench import BenchFlat, BenchFlatInput
    from treeflow.client import Client
    from treeflow.deadlines import processor_group
    from treeflow.kafka import KafkaSettings, ensure_topics
    from treeflow.kafka.profile import PROFILE_ENV
    from treeflow.kafka.settings import BOOTSTRAP_ENV, PARTITIONS_ENV, PREFIX_ENV

    from treeflow.kafka.profile import FETCH_WAIT_ENV

    if not profile.exact_list_offsets and FETCH_WAIT_ENV not in os.environ:
        # The embedded broker lists a partition's batches on each fetch within the wait:
        # over ten minutes the partitions outgrow what it lists in the default 10 ms.
        os.environ[FETCH_WAIT_ENV] = "100"
        print(f"soak: {FETCH_WAIT_ENV}=100 for the embedded broker (set it to choose)", flush=True)
    prefix = f"soak-{uuid.uuid4().hex[:6]}"
    settings = KafkaSettings.resolve(bootstrap, topic_prefix=prefix, partitions=partitions, profile=profile)
    await ensure_topics(settings)
    env = {**os.environ, BOOTSTRAP_ENV: bootstrap, PREFIX_ENV: prefix, PARTITIONS_ENV: str(partitions),
           PROFILE_ENV: profile.name, "PYTHONUNBUFFERED": "1"}
    # The group clients look at when a command goes unanswered (their timeout explains itself).
    run = ProcessorRun(env, log_dir / f"{prefix}.log", processor_group(settings))
    clients = await distinct_clients(settings, client_count)
    done = 0
    #: Executions that raised (a command timeout during a stall, say), by error type.
    failed: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    try:
        await run.recovered()
        began = time.perf_counter()
        in_flight: set[asyncio.Task[Any]] = set()

        async def one(client: Client) -> None:
            nonlocal done
            try:
                await client.execute_workflow(BenchFlat, BenchFlatInput(value="x"))
            except Exception as exc:  # noqa: BLE001 - counted and reported, the load goes on
                failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1
                return
            done += 1

        next_sample, last_done = began + 10, 0
        sent = 0
        while (now := time.perf_counter()) - began < seconds:
            while sent < (now - began) * rate and len(in_flight) < 200:  # no backlog past 200
                task = asyncio.ensure_future(one(clients[sent % len(clients)]))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
            if now >= next_sample:
                sample = soak_sample(run, now - began)
                samples.append(sample)
                print(f"  t={sample['t']:5.0f} s  RSS {sample['rss']:6.1f} MB  {heap_text(sample)}  completed "
                      f"{done:7,} ({(done - last_done) / 10:.0f}/s)  in memory {sample.get('executions', '?')}  "
                      f"evicted {sample.get('evicted', '?')}{f'  failed {failed}' if failed else ''}", flush=True)
                next_sample, last_done = next_sample + 10, done
            await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.gather(*in_flight), 120)
    finally:
        for client in clients:
            await client.close()
        run.stop()
    print(f"soak: {done:,} executions in {seconds:.0f} s ({done / seconds:.0f}/s)"
          f"{f'; failed: {failed}' if failed else ''}")
    for key, name in (("rss", "RSS"), ("malloc_used_mb", "malloc in use"), ("traced_mb", "Python heap (traced)")):
        if verdict := plateau(samples, key, name):
            print(verdict)


def soak_sample(run: ProcessorRun, t: float) -> dict[str, Any]:
    """The processor's RSS, its latest STATS line and, with TREEFLOW_HEAP_PROBE, its latest HEAP line."""
    stats = run.lines("STATS ")[-1:]
    probe = [json.loads(line[5:]) for line in run.log.read_text(errors="replace").splitlines()
             if line.startswith("HEAP ")][-1:]
    sample = {"t": t, "rss": rss_mb(run.child.pid), **(stats[0] if stats else {})}  # type: ignore[arg-type]
    if probe:
        sample["traced_mb"] = probe[0]["traced_mb"]
    return sample


def heap_text(sample: dict[str, Any]) -> str:
    parts = []
    if "malloc_used_mb" in sample:
        parts.append(f"malloc in use {sample['malloc_used_mb']:5.1f} MB")
    if "py_blocks" in sample:
        parts.append(f"Python blocks {sample['py_blocks'] / 1000:5.0f} k  tasks {sample.get('tasks', '?'):>4}")
    if "traced_mb" in sample:
        parts.append(f"traced {sample['traced_mb']:5.1f} MB")
    return "  ".join(parts)


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of (seconds, MB) points, in MB per minute."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)


def plateau(samples: list[dict[str, Any]], key: str, name: str) -> str | None:
    """Whether `key` levels off: its slope over the first half of the run against the last half."""
    points = [(s["t"], s[key]) for s in samples if key in s]
    if len(points) < 6:
        return None
    first, last = points[:len(points) // 2], points[len(points) // 2:]
    early, late = slope_per_minute(first), slope_per_minute(last)
    if late <= 0.1:
        verdict = "flat over the last half"
    elif late < early / 3:
        verdict = "levelling off, not flat yet (run longer)"
    else:
        verdict = "still rising: not shown bounded"
    return (f"soak: {name}: first half {early:+.2f} MB/min ({first[0][1]:.1f} -> {first[-1][1]:.1f} MB), last half "
            f"{late:+.2f} MB/min ({last[0][1]:.1f} -> {last[-1][1]:.1f} MB, range {min(y for _, y in last):.1f}-"
            f"{max(y for _, y in last):.1f}): {verdict}")


async def client_fetch(bootstrap: str, profile: Any, partitions: int, runs: int, log_dir: Path) -> None:
    """Bytes each client fetches per awaited result, with one client and with several."""
    from treeflow.bench import BenchFlat, BenchFlatInput
    from treeflow.client import Client
    from treeflow.deadlines import processor_group
    from treeflow.kafka import KafkaSettings, ensure_topics
    from treeflow.kafka.profile import PROFILE_ENV
    from treeflow.kafka.settings import BOOTSTRAP_ENV, PARTITIONS_ENV, PREFIX_ENV

    prefix = f"fetch-{uuid.uuid4().hex[:6]}"
    settings = KafkaSettings.resolve(bootstrap, topic_prefix=prefix, partitions=partitions, profile=profile)
    await ensure_topics(settings)
    env = {**os.environ, BOOTSTRAP_ENV: bootstrap, PREFIX_ENV: prefix, PARTITIONS_ENV: str(partitions),
           PROFILE_ENV: profile.name, "PYTHONUNBUFFERED": "1"}
    run = ProcessorRun(env, log_dir / f"{prefix}.log", processor_group(settings))
    try:
        await run.recovered()
        for count in (1, 4):
            clients = [Client(settings, identity=f"bench-client-{count}-{i}") for i in range(count)]
            for client in clients:
                await client.start()
            try:
                async def drive(client: Client) -> None:
                    lanes = asyncio.Semaphore(20)

                    async def one(i: int) -> None:
                        async with lanes:
                            await client.execute_workflow(BenchFlat, BenchFlatInput(value=f"v{i}"))
                    await asyncio.gather(*(one(i) for i in range(runs)))

                await asyncio.gather(*(drive(client) for client in clients))
                await asyncio.sleep(0.5)
                per = [c.stats.fetched_bytes / runs for c in clients]
                shared = len(clients) - len({c.reply_partition for c in clients})
                print(f"  {count} client(s), {runs} executions each: fetched per awaited result "
                      f"{sum(per) / len(per):,.0f} B on average (min {min(per):,.0f}, max {max(per):,.0f}); "
                      f"{shared} client(s) share a replies partition with another", flush=True)
            finally:
                for client in clients:
                    await client.close()
        # What a client that reads every partition (before) fetched: the whole topics.
        from treeflow.consumers import EventReader

        reader = EventReader(settings)
        async for _ in reader:
            pass
        total = 5 * runs
        print(f"  for comparison, a client reading every partition of the events topic (as before) fetched "
              f"{reader.stats.fetched_bytes / total:,.0f} B of events per execution of anyone's, so "
              f"{reader.stats.fetched_bytes / total:,.0f} B per awaited result with one client and "
              f"{4 * reader.stats.fetched_bytes / total:,.0f} B with four (plus the replies)", flush=True)
    finally:
        run.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treeflow.processor.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--closed", default="0,10000,100000", help="closed executions per scenario, comma-separated")
    parser.add_argument("--open", default="0", help="open executions per scenario, comma-separated")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--modes", default="before,after", help="before, after or both (comma-separated)")
    parser.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="run the soak instead")
    parser.add_argument("--rate", type=float, default=150, help="soak: executions started per second")
    parser.add_argument("--clients", type=int, default=4,
                        help="soak: clients sharing the load, each on its own replies partition (on the embedded "
                             "broker a partition's fetches slow down as it grows: spread it)")
    parser.add_argument("--client-fetch", type=int, default=0, metavar="RUNS",
                        help="measure the bytes clients fetch per awaited result instead (RUNS executions each)")
    parser.add_argument("--prime", choices=["auto", "processor", "bench"], default="auto",
                        help="who takes the first snapshots of the `after` mode: a first processor run that folds "
                             "the whole log, or the bench folding the log it writes (auto: the bench on the "
                             "embedded broker, which serves long partitions slowly; the processor otherwise)")
    parser.add_argument("--throughput-runs", type=int, default=300, metavar="N",
                        help="after each recovery, N flat executions with 50 in flight (0: skip)")
    parser.add_argument("--heap-soak", type=int, default=0, metavar="EXECUTIONS",
                        help="feed EXECUTIONS flat executions to one PartitionEngine at --rate per simulated second "
                             "(retention TREEFLOW_CLOSED_RETENTION) and print its heap, instead")
    parser.add_argument("--serve", metavar="APP_ID", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.heap_soak:
        from .snapshots import SnapshotOptions

        heap_soak(args.heap_soak, args.rate, SnapshotOptions.from_env().closed_retention.total_seconds())
        return 0
    from treeflow.kafka import TANSU, EmbeddedBroker, current_profile
    from treeflow.kafka.settings import BOOTSTRAP_ENV

    log_dir = Path(tempfile.mkdtemp(prefix="treeflow-recovery-bench-"))
    broker = None
    bootstrap = os.environ.get(BOOTSTRAP_ENV)
    profile = current_profile()
    if not bootstrap:
        broker = EmbeddedBroker(log_path=log_dir / "broker.log").start()
        bootstrap, profile = broker.bootstrap_servers, TANSU
    try:
        if args.client_fetch:
            print(f"client fetch: {args.partitions} partitions, broker {bootstrap} ({profile.name})", flush=True)
            asyncio.run(client_fetch(bootstrap, profile, args.partitions, args.client_fetch, log_dir))
            return 0
        if args.soak:
            print(f"soak: {args.soak:.0f} s at {args.rate:.0f} executions/s from {args.clients} clients, "
                  f"{args.partitions} partitions, "
                  f"broker {bootstrap} ({profile.name})", flush=True)
            asyncio.run(soak(bootstrap, profile, args.partitions, args.soak, args.rate, log_dir, args.clients))
            return 0
        prime = args.prime if args.prime != "auto" else ("bench" if broker is not None else "processor")
        print(f"recovery benchmark: {args.partitions} partitions, broker {bootstrap} ({profile.name}); first "
              f"snapshots taken by the {prime}; logs in {log_dir}", flush=True)
        results = []
        for opened in (int(x) for x in args.open.split(",")):
            for closed in (int(x) for x in args.closed.split(",")):
                print(f"scenario: {closed:,} closed, {opened:,} open", flush=True)
                results += asyncio.run(scenario(bootstrap, profile, args.partitions, closed, opened, log_dir,
                                                args.modes.split(","), prime, args.throughput_runs))
        for mode in ("before", "after"):
            rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: (r["open"], r["closed"]))
            for opened in sorted({r["open"] for r in rows}):
                line = [r for r in rows if r["open"] == opened]
                if len(line) >= 2 and line[-1]["closed"] > line[0]["closed"]:
                    per = 10_000 / (line[-1]["closed"] - line[0]["closed"])
                    print(f"{mode}: per 10,000 closed executions ({opened:,} open): recovery "
                          f"{(line[-1]['recovery_s'] - line[0]['recovery_s']) * per:+.3f} s, start -> completed "
                          f"{(line[-1]['start_to_completed_s'] - line[0]['start_to_completed_s']) * per:+.3f} s, "
                          f"RSS {(line[-1]['rss_mb'] - line[0]['rss_mb']) * per:+.2f} MB "
                          "(goal: < 0.15 s and < 3 MB); throughput "
                          f"{line[0]['throughput_per_s']:.0f}/s -> {line[-1]['throughput_per_s']:.0f}/s "
                          f"({line[-1]['throughput_per_s'] / line[0]['throughput_per_s']:.2f}x)")
        print("JSON " + json.dumps(results))
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
