"""Workflows with signals, queries, conditions, continue-as-new and cancellation, shared by
tests/unit/test_signals_queries.py (in memory) and tests/integration/test_control.py (on
the broker). `CALLS` records the activities that ran."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

import treeflow as workflows
from treeflow import workflow

CALLS: list[str] = []
#: How long `long_step` takes: long enough to be canceled while running.
LONG_STEP_SECONDS = 30.0


@workflows.activity()
async def record(value: str) -> str:
    CALLS.append(value)
    return value


@workflows.activity()
async def long_step(value: str) -> str:
    await asyncio.sleep(LONG_STEP_SECONDS)
    CALLS.append(value)
    return value


class Item(BaseModel):
    name: str
    quantity: int


@workflow.define(name="collector")
class Collector:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.done = False

    @workflow.signal(name="add")
    def add(self, item: Item) -> None:
        self.items.append(f"{item.name}x{item.quantity}")

    @workflow.signal
    async def finish(self) -> None:
        await record("finishing")  # an async handler may await activities
        self.done = True

    @workflow.query(name="items")
    def current_items(self) -> list[str]:
        return list(self.items)

    @workflow.query
    def count_of(self, prefix: str) -> int:
        return sum(item.startswith(prefix) for item in self.items)

    @workflow.query
    def broken(self) -> int:
        raise KeyError("nothing here")

    @workflow.query
    def sneaky(self) -> str:
        record("from a query")  # a query may not start an activity
        return "ran"

    @workflow.entrypoint
    async def run(self) -> list[str]:
        seen_at_start = list(self.items)
        await workflow.wait_condition(lambda: self.done)
        return [*seen_at_start, "|", *self.items]


@workflow.define(name="waiter")
class Waiter:
    def __init__(self) -> None:
        self.ready = False

    @workflow.signal
    def go(self) -> None:
        self.ready = True

    @workflow.entrypoint
    async def run(self, timeout: float | None) -> str:
        started = workflow.now()
        try:
            await workflow.wait_condition(lambda: self.ready, timeout=timeout)
        except asyncio.TimeoutError:
            return f"timed out after {(workflow.now() - started).total_seconds():.1f}s"
        return "ready"


@workflow.define(name="counter")
class Counter:
    @workflow.entrypoint
    async def run(self, count: int) -> str:
        await record(f"run {count}")
        if count < 3:
            workflow.continue_as_new(count + 1)
        return f"done at {count}"


@workflow.define(name="cleans_up")
class CleansUp:
    @workflow.entrypoint
    async def run(self, key: str) -> str:
        try:
            return await long_step(key)
        except asyncio.CancelledError:
            await record(f"cleanup {key}")
            raise


@workflow.define(name="ignores_cancel")
class IgnoresCancel:
    @workflow.entrypoint
    async def run(self) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.2)
        return "kept running"


@workflow.define(name="sleepy_child")
class SleepyChild:
    @workflow.entrypoint
    async def run(self, key: str) -> str:
        try:
            await long_step(key)
        except asyncio.CancelledError:
            await record(f"child cleanup {key}")
            raise
        return "child done"


@workflow.define(name="awaits_child")
class AwaitsChild:
    @workflow.entrypoint
    async def run(self, key: str) -> str:
        return await workflows.execute_workflow(SleepyChild, key, execution_id=f"{key}.kid")
