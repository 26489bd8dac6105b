"""Workflows and activities for the fault tests (tests/integration/test_durability.py).

Loaded by `treeflow worker --module tests/integration/durable_app.py` and
`treeflow processor --module ...` subprocesses, and imported by the tests for
in-process processors. Every activity leaves a trace in `<workdir>/<name>.log`
(one line per run, appended with O_APPEND so concurrent runs never interleave a
line), which is how the tests count how often an activity body really ran.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel

import treeflow as workflows
from treeflow import workflow


def trace(workdir: str, name: str, tag: str) -> None:
    """Append `tag` as one line to `<workdir>/<name>.log`."""
    path = Path(workdir) / f"{name}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{tag}\n".encode())
    finally:
        os.close(fd)


def traces(workdir: str | Path, name: str) -> list[str]:
    """The lines `trace` wrote to `<workdir>/<name>.log` (none when it does not exist)."""
    path = Path(workdir) / f"{name}.log"
    return path.read_text().splitlines() if path.exists() else []


# ---------------------------------------------------------------- activities


@workflows.activity()
async def durable_step_a(workdir: str, tag: str) -> str:
    trace(workdir, "A", tag)
    return f"A({tag})"


@workflows.activity()
async def durable_step_b(workdir: str, tag: str, seconds: float) -> str:
    trace(workdir, "B-started", tag)  # the marker the kill test waits for
    await asyncio.sleep(seconds)
    trace(workdir, "B", tag)
    return f"B({tag})"


@workflows.activity()
async def durable_step_c(workdir: str, tag: str, previous: str) -> str:
    trace(workdir, "C", tag)
    return f"C({previous})"


@workflows.activity(retry_policy=workflows.RetryPolicy(initial_interval=timedelta(milliseconds=50)))
async def durable_flaky(workdir: str, tag: str) -> str:
    """Fails its first attempt, succeeds on the second."""
    if workflows.activity.info().attempt == 1:
        trace(workdir, "flaky-failed", tag)
        raise RuntimeError(f"first attempt of {tag} fails on purpose")
    trace(workdir, "flaky", tag)
    return f"flaky({tag})"


@workflows.activity()
async def durable_echo(value: str) -> str:
    return f"echo:{value}"


@workflows.activity(heartbeat_timeout=timedelta(seconds=60))
async def durable_heartbeater(workdir: str, tag: str) -> str:
    """Heartbeats, then runs until the file `<workdir>/release-<tag>` appears."""
    await asyncio.sleep(0.2)  # long enough for the runner to report the start
    for beat in range(3):
        await workflows.activity.heartbeat({"beat": beat})
    release = Path(workdir) / f"release-{tag}"
    while not release.exists():
        await asyncio.sleep(0.02)
    trace(workdir, "heartbeater", tag)
    return f"hb({tag})"


# ---------------------------------------------------------------- workflows


class ChainInput(BaseModel):
    workdir: str
    tag: str
    b_seconds: float = 0.0


def chain_result(tag: str) -> str:
    """What `ChainWorkflow` returns for `tag`."""
    return f"A({tag})+C(B({tag}))"


@workflows.workflow.define(name="durable_chain")
class ChainWorkflow:
    """A, then B (which may sleep), then C; returns `chain_result(tag)`."""

    @workflows.workflow.entrypoint
    async def run(self, params: ChainInput) -> str:
        a = await durable_step_a(params.workdir, params.tag)
        b = await durable_step_b(params.workdir, params.tag, params.b_seconds)
        c = await durable_step_c(params.workdir, params.tag, b)
        return f"{a}+{c}"


class ChildInput(BaseModel):
    value: str


@workflows.workflow.define(name="durable_child")
class ChildWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, params: ChildInput) -> str:
        return await durable_echo(params.value)


class ParentInput(BaseModel):
    data: str


def parent_result(data: str) -> str:
    return f"Parent got: echo:{data}"


@workflows.workflow.define(name="durable_parent")
class ParentWorkflow:
    """The seed's parent -> child -> activity tree."""

    @workflows.workflow.entrypoint
    async def run(self, params: ParentInput) -> str:
        child = await workflows.execute_workflow(ChildWorkflow, params=ChildInput(value=params.data))
        return f"Parent got: {child}"


class TaggedInput(BaseModel):
    workdir: str
    tag: str


@workflows.workflow.define(name="durable_flaky_workflow")
class FlakyWorkflow:
    """An activity that is retried once."""

    @workflows.workflow.entrypoint
    async def run(self, params: TaggedInput) -> str:
        return await durable_flaky(params.workdir, params.tag)


@workflows.workflow.define(name="durable_heartbeat_workflow")
class HeartbeatWorkflow:
    """An activity that heartbeats and stays running until the test releases it."""

    @workflows.workflow.entrypoint
    async def run(self, params: TaggedInput) -> str:
        return await durable_heartbeater(params.workdir, params.tag)


@workflows.workflow.define(name="durable_sleeper")
class SleeperWorkflow:
    """Runs an activity, then waits on a durable timer of `seconds` (stays open for the tests)."""

    @workflows.workflow.entrypoint
    async def run(self, seconds: float) -> str:
        first = await durable_echo("before-sleep")
        await workflow.sleep(seconds)
        return f"{first}, slept {seconds}"


@workflows.workflow.define(name="durable_sleepy_parent")
class SleepyParentWorkflow:
    """Starts a child that stays open on a long timer (an open tree of two executions)."""

    @workflows.workflow.entrypoint
    async def run(self, seconds: float) -> str:
        return await workflows.execute_workflow(SleeperWorkflow, params=seconds)


# ---------------------------------------------------------------- crash and outage tests (issue 9)


def trace_start(workdir: str) -> None:
    """One line per real start of an activity attempt, in `<workdir>/starts.log`:
    execution id, activity id, attempt, wall-clock time (what the fault test checks)."""
    info = workflows.activity.info()
    trace(workdir, "starts", f"{info.workflow_exec_id} {info.activity_id} {info.attempt} {time.time():.6f}")


def starts(workdir: str | Path) -> list[tuple[str, str, int, float]]:
    """The lines `trace_start` wrote: (execution, activity id, attempt, time)."""
    found = []
    for line in traces(workdir, "starts"):
        exec_id, activity_id, attempt, at = line.split()
        found.append((exec_id, activity_id, int(attempt), float(at)))
    return found


@workflows.activity(start_to_close_timeout=timedelta(seconds=5),
                    retry_policy=workflows.RetryPolicy(maximum_attempts=1))
async def durable_gated(workdir: str, tag: str) -> str:
    """One attempt of at most 5 s; runs until `<workdir>/release-<tag>` appears (at once
    when `tag` starts with "free")."""
    trace_start(workdir)
    release = Path(workdir) / f"release-{tag}"
    while not tag.startswith("free") and not release.exists():
        await asyncio.sleep(0.02)
    return f"gated({tag})"


@workflows.workflow.define(name="durable_one_shot")
class OneShotWorkflow:
    """One activity with a single 5 s attempt: any timeout fails the workflow."""

    @workflows.workflow.entrypoint
    async def run(self, params: TaggedInput) -> str:
        return await durable_gated(params.workdir, params.tag)


@workflows.activity(start_to_close_timeout=timedelta(seconds=20))
async def fault_step(workdir: str, value: str, seconds: float) -> str:
    trace_start(workdir)
    await asyncio.sleep(seconds)
    return f"{value}!"


class FaultInput(BaseModel):
    workdir: str
    tag: str
    seconds: float = 0.2


def fault_result(tag: str) -> str:
    return f"{tag}-a!+{tag}-b!+{tag}-c!+child:{tag}-d!"


@workflows.workflow.define(name="durable_fault_child")
class FaultChildWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, params: FaultInput) -> str:
        return "child:" + await fault_step(params.workdir, f"{params.tag}-d", params.seconds)


@workflows.workflow.define(name="durable_fault_tree")
class FaultTreeWorkflow:
    """An activity, two in parallel, then a child with its own activity."""

    @workflows.workflow.entrypoint
    async def run(self, params: FaultInput) -> str:
        a = await fault_step(params.workdir, f"{params.tag}-a", params.seconds)
        b, c = await asyncio.gather(fault_step(params.workdir, f"{params.tag}-b", params.seconds),
                                    fault_step(params.workdir, f"{params.tag}-c", params.seconds))
        child = await workflows.execute_workflow(FaultChildWorkflow, params=params)
        return f"{a}+{b}+{c}+{child}"
