"""`Environment(time_skipping=True)`: durable timers and timeouts jump to their due time when
nothing is runnable, with the histories real time gives; `env.sleep()` moves time by hand;
a running activity is not skipped past."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
import pytest_asyncio

import treeflow as workflows
from treeflow import workflow
from treeflow.activities import activity
from treeflow.schemas import Event, EventType
from treeflow.testing import Environment

pytestmark = pytest.mark.integration

pytest_plugins = ["treeflow.pytest_plugin"]

#: Workflows default to a 1-hour execution timeout (Mistral's): these set longer ones.
HOUR = 3600.0
DAY = 86_400.0


@activity()
async def stamp(label: str) -> str:
    return f"{label}!"


@workflow.define(name="napper", execution_timeout=timedelta(days=2))
class Napper:
    @workflow.entrypoint
    async def run(self, seconds: float) -> float:
        await stamp("before")
        began = workflow.now()
        await workflow.sleep(seconds)
        slept = (workflow.now() - began).total_seconds()
        await stamp("after")
        return slept


@workflow.define(name="patient", execution_timeout=timedelta(days=2))
class Patient:
    def __init__(self) -> None:
        self.message: str | None = None

    @workflow.signal
    async def deliver(self, message: str) -> None:
        self.message = message

    @workflow.entrypoint
    async def run(self, days: float) -> str:
        try:
            await workflow.wait_condition(lambda: self.message is not None, timeout=timedelta(days=days))
        except asyncio.TimeoutError:
            return "timed out"
        return f"got {self.message}"


@workflow.define(name="listener", execution_timeout=None)
class Listener:
    """Waits for a signal with no timeout at all: nothing for time skipping to skip to."""

    def __init__(self) -> None:
        self.message: str | None = None

    @workflow.signal
    async def deliver(self, message: str) -> None:
        self.message = message

    @workflow.entrypoint
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self.message is not None)
        return f"got {self.message}"


@workflow.define(name="two_naps")
class TwoNaps:
    def __init__(self) -> None:
        self.naps = 0

    @workflow.query
    def naps_taken(self) -> int:
        return self.naps

    @workflow.entrypoint
    async def run(self) -> int:
        for _ in range(2):
            await workflow.sleep(timedelta(minutes=20))
            self.naps += 1
        return self.naps


@activity(start_to_close_timeout=timedelta(seconds=1), retry_policy_max_attempts=1)
async def dawdle(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


@workflow.define(name="dawdler")
class Dawdler:
    @workflow.entrypoint
    async def run(self, seconds: float) -> str:
        # A timer that would be due while the activity runs: it must not fire early.
        waiter = asyncio.ensure_future(workflow.sleep(HOUR))
        try:
            return await dawdle(seconds)
        except workflows.ActivityError as exc:
            return f"failed: {type(exc.__cause__).__name__ if exc.__cause__ else exc}"
        finally:
            waiter.cancel()


@activity(retry_policy=workflows.RetryPolicy(initial_interval=timedelta(minutes=10), maximum_attempts=3))
async def flaky() -> int:
    attempt = activity.info().attempt
    if attempt < 3:
        raise RuntimeError(f"attempt {attempt} fails")
    return attempt


@workflow.define(name="persistent")
class Persistent:
    @workflow.entrypoint
    async def run(self) -> int:
        return await flaky()


@workflow.define(name="reminder", execution_timeout=timedelta(days=2))  # README's example
class Reminder:
    def __init__(self) -> None:
        self.sent = False

    @workflow.query
    def was_sent(self) -> bool:
        return self.sent

    @workflow.entrypoint
    async def run(self, what: str) -> str:
        await workflow.sleep(timedelta(days=1))
        self.sent = True
        return f"reminded: {what}"


WORKFLOWS = [Napper, Patient, Listener, TwoNaps, Dawdler, Persistent, Reminder]
ACTIVITIES = [stamp, dawdle, flaky]


@pytest_asyncio.fixture(scope="module")
async def env(treeflow_broker):
    """One time-skipping environment for the tests below: each leaves no execution open
    (time is global to an environment)."""
    async with Environment(workflows=WORKFLOWS, activities=ACTIVITIES, time_skipping=True, visibility=False,
                           **treeflow_broker.options) as environment:
        yield environment


def _shape(history: list[Event]) -> list[tuple[EventType, float]]:
    """Each event's type with the seconds since the previous event."""
    shape, previous = [], history[0].timestamp
    for event in history:
        shape.append((event.event_type, (event.timestamp - previous).total_seconds()))
        previous = event.timestamp
    return shape


async def test_an_hour_sleep_takes_seconds_and_records_the_history_of_real_time(
        treeflow_broker, env: Environment) -> None:
    async with Environment(workflows=WORKFLOWS, activities=ACTIVITIES, visibility=False,
                           **treeflow_broker.options) as real_env:
        real = await real_env.client.start_workflow(Napper, 1.0)
        assert await real.result() >= 1.0
        real_shape = _shape(await real.history())
        # Without time skipping, env.sleep is asyncio.sleep and env.now the system's clock.
        began, virtual_began = time.monotonic(), real_env.now()
        await real_env.sleep(0.2)
        assert time.monotonic() - began >= 0.2
        assert abs((real_env.now() - virtual_began).total_seconds() - (time.monotonic() - began)) < 0.1
    began, virtual_began = time.monotonic(), env.now()
    skipped = await env.client.start_workflow(Napper, HOUR)
    assert await skipped.result() >= HOUR
    took = time.monotonic() - began
    skipped_shape = _shape(await skipped.history())
    assert env.now() - virtual_began >= timedelta(seconds=HOUR)
    print(f"an hour-long sleep took {took:.2f}s of real time")
    assert took < 30
    assert [t for t, _ in skipped_shape] == [t for t, _ in real_shape]
    for (kind, real_gap), (_, skipped_gap) in zip(real_shape, skipped_shape):
        if kind is EventType.TIMER_FIRED:
            # The sleep, scaled: the timer fires at its due time, the clock loop's delay after.
            assert 1.0 <= real_gap < 1.5 and HOUR <= skipped_gap < HOUR + 0.5
        else:
            assert real_gap < 1.0 and skipped_gap < 1.0, (kind, real_gap, skipped_gap)


async def test_a_day_long_wait_for_a_signal_times_out_in_seconds(env: Environment) -> None:
    began, virtual_began = time.monotonic(), env.now()
    # The top-level treeflow.execute_workflow waits through the environment's client too.
    assert await workflows.execute_workflow(Patient, params=1.0) == "timed out"
    assert time.monotonic() - began < 30
    assert env.now() - virtual_began >= timedelta(days=1)


async def test_a_signal_before_the_timeout_wins(env: Environment) -> None:
    virtual_began = env.now()
    handle = await env.client.start_workflow(Patient, 1.0)
    await handle.signal(Patient.deliver, "hello")
    assert await handle.result() == "got hello"
    kinds = [e.event_type for e in await handle.history()]
    assert EventType.WORKFLOW_EXECUTION_SIGNALED in kinds and EventType.TIMER_FIRED not in kinds
    # The canceled timer's wakeup is forgotten: waiting on another execution does not
    # skip to it (nothing is due, so time flows as on the system's clock).
    other = await env.client.start_workflow(Listener)

    async def deliver_later() -> None:
        await asyncio.sleep(0.5)
        await other.signal(Listener.deliver, "later")

    later = asyncio.ensure_future(deliver_later())
    assert await other.result() == "got later"
    await later
    assert env.now() - virtual_began < timedelta(hours=1)


async def test_retry_backoffs_are_skipped(env: Environment) -> None:
    began = time.monotonic()
    handle = await env.client.start_workflow(Persistent)
    assert await handle.result() == 3
    assert time.monotonic() - began < 30
    retries = [e.timestamp for e in await handle.history() if e.event_type is EventType.ACTIVITY_TASK_RETRYING]
    starts = [e.timestamp for e in await handle.history() if e.event_type is EventType.ACTIVITY_TASK_STARTED]
    assert len(retries) == 2 and len(starts) == 3
    # 10 then 20 minutes of backoff (coefficient 2), in virtual time.
    assert timedelta(minutes=10) <= starts[1] - retries[0] < timedelta(minutes=10, seconds=1)
    assert timedelta(minutes=20) <= starts[2] - retries[1] < timedelta(minutes=20, seconds=1)


async def test_env_sleep_fires_the_timers_due_within_it(env: Environment) -> None:
    handle = await env.client.start_workflow(TwoNaps)
    await asyncio.sleep(0.5)  # time is not skipped while no result is awaited
    assert await handle.query(TwoNaps.naps_taken) == 0
    virtual_began = env.now()
    await env.sleep(timedelta(minutes=30))
    assert env.now() - virtual_began >= timedelta(minutes=30)
    assert await handle.query(TwoNaps.naps_taken) == 1
    await env.sleep(timedelta(minutes=15))  # the second nap ends within it: the execution completes
    assert (await handle.describe()).status.value == "COMPLETED"
    assert await handle.result() == 2
    fired = [e.timestamp for e in await handle.history() if e.event_type is EventType.TIMER_FIRED]
    assert timedelta(minutes=20) <= fired[1] - fired[0] < timedelta(minutes=20, seconds=1)


async def test_the_readmes_example(env: Environment) -> None:
    handle = await env.client.start_workflow(Reminder, "pay rent")
    await env.sleep(timedelta(hours=23))                  # by hand: not due yet
    assert await handle.query(Reminder.was_sent) is False
    assert await handle.result() == "reminded: pay rent"  # skips the last hour at once


async def test_time_does_not_skip_past_a_running_activity(env: Environment) -> None:
    """The rule: while an activity attempt runs, time flows as on the system's clock, so
    its start-to-close timeout is measured in real time and a timer due meanwhile waits."""
    virtual_began = env.now()
    assert await env.execute_workflow(Dawdler, 0.3) == "done"
    assert env.now() - virtual_began < timedelta(minutes=1)
    # An attempt that outlives its 1 s bound times out after 1 s of real time, not at once.
    began = time.monotonic()
    result = await env.execute_workflow(Dawdler, 3.0)
    assert result.startswith("failed"), result
    assert 0.9 <= time.monotonic() - began < 3.0
    assert env.now() - virtual_began < timedelta(minutes=1)


async def test_a_signal_sent_while_a_result_is_awaited_is_decided_before_time_skips(env: Environment) -> None:
    """The skip race: time may skip only once the processor has decided every command sent
    (this client's commands in flight, the commands topic read to its end)."""
    results = []
    for round in range(20):
        handle = await env.client.start_workflow(Patient, 1.0)
        result, _ = await asyncio.gather(handle.result(), handle.signal(Patient.deliver, f"r{round}"))
        results.append(result)
    assert results == [f"got r{round}" for round in range(20)]

    # A broker slow to take the signal: time does not skip while it is in flight.
    handle = await env.client.start_workflow(Patient, 1.0)
    producer = env.client._producer
    send_and_wait = producer.send_and_wait

    async def slow_send_and_wait(*args, **kwargs):
        await asyncio.sleep(0.5)
        return await send_and_wait(*args, **kwargs)

    producer.send_and_wait = slow_send_and_wait
    try:
        result, _ = await asyncio.gather(handle.result(), handle.signal(Patient.deliver, "slow"))
    finally:
        producer.send_and_wait = send_and_wait
    assert result == "got slow"
