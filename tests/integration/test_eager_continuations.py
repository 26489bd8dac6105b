"""Eager continuations (issue 11): a worker that ran an eager attempt sends its completion
with the decisions of the workflow task the completion causes, made on the history it
predicts; the processor takes them only when that is the run's history."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections import Counter

import pytest

import treeflow as workflows
from treeflow.client import Client
from treeflow.definitions import collect
from treeflow.kafka import KafkaSettings, ensure_topics
from treeflow.processor.app import Processor
from treeflow.replay import Replayer
from treeflow.schemas import EventType
from treeflow.worker.worker import Worker

pytestmark = pytest.mark.integration

CALLS: Counter[str] = Counter()
#: Activities of `Interrupted` wait here until the test has signalled their run.
RELEASE: dict[str, asyncio.Event] = {}


@workflows.activity(name="continued_step")
async def continued_step(value: str) -> str:
    CALLS[value] += 1
    if value in RELEASE:
        await RELEASE[value].wait()
    return f"done:{value}"


@workflows.workflow.define(name="continued_child")
class ContinuedChild:
    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        return await continued_step(value)


@workflows.workflow.define(name="continued_parent")
class ContinuedParent:
    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        return await workflows.execute_workflow(ContinuedChild, params=value)


@workflows.workflow.define(name="continued_two_steps")
class TwoSteps:
    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        first = await continued_step(value + "-a")
        return first + "|" + await continued_step(value + "-b")


@workflows.workflow.define(name="continued_reads_the_time")
class ReadsTheTime:
    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        result = await continued_step(value)
        return f"{result}@{workflows.workflow.now().year}"


@workflows.workflow.define(name="continued_interrupted")
class Interrupted:
    def __init__(self) -> None:
        self.heard: list[str] = []

    @workflows.workflow.signal
    def note(self, text: str) -> None:
        self.heard.append(text)

    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        result = await continued_step(value)
        return f"{result} heard {self.heard}"


@workflows.workflow.define(name="continued_interrupted_parent")
class InterruptedParent:
    def __init__(self) -> None:
        self.heard: list[str] = []

    @workflows.workflow.signal
    def note(self, text: str) -> None:
        self.heard.append(text)

    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        result = await workflows.execute_workflow(ContinuedChild, params=value)
        return f"{result} heard {self.heard}"


async def child_started(handle: object) -> None:
    """Until the parent's history holds its child's start (its code awaits only the
    result: the start asks it for no task)."""
    async def started() -> None:
        while not any(e.event_type is EventType.CHILD_WORKFLOW_EXECUTION_STARTED
                      for e in await handle.history()):  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)

    await asyncio.wait_for(started(), 60)


class Deployment:
    def __init__(self, settings: KafkaSettings, continuations: bool) -> None:
        workflow_defs, activity_defs = collect([sys.modules[__name__]])
        self.settings = settings
        self.processor = Processor(settings)
        self.worker = Worker(settings, workflow_defs, activity_defs, eager_continuations=continuations)
        self.client = Client(settings)

    async def __aenter__(self) -> Deployment:
        await ensure_topics(self.settings, ["default"])
        await self.processor.start()
        await self.worker.start()
        await self.client.start()
        await self.processor.wait_assigned()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.client.close()
        await self.worker.stop(grace=5)
        await self.processor.stop()


CAUSES = (EventType.ACTIVITY_TASK_COMPLETED, EventType.CHILD_WORKFLOW_EXECUTION_COMPLETED,
          EventType.WORKFLOW_EXECUTION_STARTED)


def continued_tasks(history: list) -> list[int]:
    """The sequences of the events (an activity's or a child's completion, a child's start)
    recorded with the completion of the workflow task they caused: by the same command
    (event ids are `<command id>:<n>`)."""
    def command_of(event: object) -> str:
        return event.event_id.rsplit(":", 1)[0]  # type: ignore[attr-defined]

    return [before.sequence for before, after in zip(history, history[1:])
            if before.event_type in CAUSES and after.event_type is EventType.WORKFLOW_TASK_COMPLETED
            and after.payload.history_length == before.sequence and command_of(after) == command_of(before)]


def tasks_completed(history: list) -> int:
    return sum(1 for event in history if event.event_type is EventType.WORKFLOW_TASK_COMPLETED)


@pytest.mark.parametrize("continuations", [True, False])
async def test_a_continued_tree_needs_one_workflow_task_fewer_and_replays_the_same(
        settings: KafkaSettings, continuations: bool) -> None:
    async with Deployment(settings, continuations) as deployment:
        values = [f"v{uuid.uuid4().hex[:8]}" for _ in range(5)]
        handles = []
        for value in values:
            handle = await deployment.client.start_workflow(ContinuedParent, value)
            assert await handle.result(timeout=60) == f"done:{value}"
            handles.append(handle)
        two = await deployment.client.start_workflow(TwoSteps, values[0])
        assert await two.result(timeout=60) == f"done:{values[0]}-a|done:{values[0]}-b"
        stats = deployment.worker.stats
        parents = [await handle.history() for handle in handles]
        child_histories = []
        for handle in handles:
            events = await handle.history()
            started = next(e for e in events if e.event_type is EventType.CHILD_WORKFLOW_EXECUTION_STARTED)
            child_histories.append(await deployment.client.history(started.payload.child_workflow_exec_id,
                                                                   root_execution_id=handle.execution_id))
        two_history = await two.history()
        histories = [*parents, *child_histories, two_history]
        continued = sum(len(continued_tasks(history)) for history in histories)
        # Every task completed is one the worker was sent, or one it sent ahead that the
        # processor took (it may also have been sent a task it had continued: its report is stale).
        assert stats.workflow_tasks >= sum(map(tasks_completed, histories)) - continued
        sent = stats.continuations + deployment.worker.runner.parent_continuations + stats.eager_children
        assert continued == (sent if continuations else 0)
        assert stats.eager_children == (len(values) if continuations else 0)
    assert [CALLS[value] for value in values] == [1] * len(values), "an attempt ran twice"
    for history in child_histories:  # its first task (started with it) and the activity's continuation
        assert (tasks_completed(history), len(continued_tasks(history))) == ((2, 2) if continuations else (2, 0))
        assert history[-1].event_type is EventType.WORKFLOW_EXECUTION_COMPLETED
    assert len(continued_tasks(two_history)) == (2 if continuations else 0)
    # A worker without the cache (a fresh replay of the log) makes the same decisions.
    replayer = Replayer(modules=[sys.modules[__name__]])
    for history in histories:
        assert all(result.ok for result in replayer.replay(history, raise_on_failure=False))


async def test_a_parent_continues_with_its_childs_completion(settings: KafkaSettings) -> None:
    """The worker that completes a child, with the parent's run cached, sends the parent's
    next decisions with the child's completion: the parent's result comes without another
    workflow task (and its child's start asked for none: the code awaits the result only)."""
    value = f"v{uuid.uuid4().hex[:8]}"
    RELEASE[value] = asyncio.Event()
    async with Deployment(settings, continuations=True) as deployment:
        handle = await deployment.client.start_workflow(ContinuedParent, value)
        await child_started(handle)
        RELEASE[value].set()
        assert await handle.result(timeout=60) == f"done:{value}"
        history = await handle.history()
    completed = next(e for e in history if e.event_type is EventType.CHILD_WORKFLOW_EXECUTION_COMPLETED)
    assert continued_tasks(history) == [completed.sequence]
    assert [e.event_type for e in history[-3:]] == [
        EventType.CHILD_WORKFLOW_EXECUTION_COMPLETED, EventType.WORKFLOW_TASK_COMPLETED,
        EventType.WORKFLOW_EXECUTION_COMPLETED]
    assert all(result.ok for result in Replayer(modules=[sys.modules[__name__]]).replay(
        history, raise_on_failure=False))


async def test_a_signal_heard_while_an_eager_attempt_runs_comes_before_its_continuation(
        settings: KafkaSettings) -> None:
    """The worker runs the signal's workflow task while the attempt runs: its cached run
    has moved on, so the attempt's completion goes without a continuation."""
    value = f"v{uuid.uuid4().hex[:8]}"
    RELEASE[value] = asyncio.Event()
    async with Deployment(settings, continuations=True) as deployment:
        handle = await deployment.client.start_workflow(Interrupted, value)
        while CALLS[value] == 0:  # the eager attempt runs
            await asyncio.sleep(0.05)
        await handle.signal(Interrupted.note, "hello")
        while deployment.worker.stats.workflow_tasks < 2:  # the signal's task ran
            await asyncio.sleep(0.05)
        RELEASE[value].set()
        assert await handle.result(timeout=60) == f"done:{value} heard ['hello']"
        assert deployment.worker.stats.continuations == 0
        history = await handle.history()
    assert continued_tasks(history) == []


async def test_a_continuation_is_refused_when_the_run_heard_more_than_the_worker_predicted(
        settings: KafkaSettings) -> None:
    """A signal the processor records between the workflow task that scheduled the eager
    attempt and the attempt's completion, which the worker never saw: the worker's
    decisions, made without it, are not taken (they would lose the signal)."""
    value = f"v{uuid.uuid4().hex[:8]}"
    RELEASE[value] = asyncio.Event()
    async with Deployment(settings, continuations=True) as deployment:
        handle = await deployment.client.start_workflow(Interrupted, value)
        while CALLS[value] == 0:  # the eager attempt runs
            await asyncio.sleep(0.05)
        # With the processor away, the signal and then the completion (with the worker's
        # continuation) queue up in the commands partition, in that order.
        await deployment.processor.stop()
        signal = asyncio.ensure_future(handle.signal(Interrupted.note, "hello"))
        await asyncio.sleep(1.0)
        RELEASE[value].set()
        while deployment.worker.stats.continuations == 0:
            await asyncio.sleep(0.05)
        deployment.processor = Processor(settings)
        await deployment.processor.start()
        await signal
        assert await handle.result(timeout=60) == f"done:{value} heard ['hello']"
        history = await handle.history()
    assert continued_tasks(history) == []
    signalled = next(e for e in history if e.event_type is EventType.WORKFLOW_EXECUTION_SIGNALED)
    completed = next(e for e in history if e.event_type is EventType.ACTIVITY_TASK_COMPLETED)
    assert signalled.sequence < completed.sequence
    assert CALLS[value] == 1
    assert all(result.ok for result in Replayer(modules=[sys.modules[__name__]]).replay(
        history, raise_on_failure=False))


async def test_no_continuation_is_made_when_the_code_reads_the_time(settings: KafkaSettings) -> None:
    value = f"v{uuid.uuid4().hex[:8]}"
    async with Deployment(settings, continuations=True) as deployment:
        handle = await deployment.client.start_workflow(ReadsTheTime, value)
        result = await handle.result(timeout=60)
        assert deployment.worker.stats.continuations == 0
        history = await handle.history()
    assert result == f"done:{value}@{history[-1].timestamp.year}"
    assert continued_tasks(history) == []


async def test_a_parent_continuation_is_refused_when_the_parent_heard_more(settings: KafkaSettings) -> None:
    """A signal to the parent, recorded before the child's completion and never seen by the
    worker: the parent's decisions, made without it, are not taken."""
    value = f"v{uuid.uuid4().hex[:8]}"
    RELEASE[value] = asyncio.Event()
    async with Deployment(settings, continuations=True) as deployment:
        handle = await deployment.client.start_workflow(InterruptedParent, value)
        await child_started(handle)
        await deployment.processor.stop()
        signal = asyncio.ensure_future(handle.signal(InterruptedParent.note, "hello"))
        await asyncio.sleep(1.0)
        RELEASE[value].set()
        while deployment.worker.runner.parent_continuations == 0:
            await asyncio.sleep(0.05)
        deployment.processor = Processor(settings)
        await deployment.processor.start()
        await signal
        assert await handle.result(timeout=60) == f"done:{value} heard ['hello']"
        history = await handle.history()
    assert continued_tasks(history) == []
    assert all(result.ok for result in Replayer(modules=[sys.modules[__name__]]).replay(
        history, raise_on_failure=False))


async def test_a_report_and_its_eager_attempts_completion_are_decided_in_one_pass(
        settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker holds a workflow task's report until the attempt it took eagerly reports
    (`REPORT_HOLD`), and queues the two back to back: the processor takes the records of
    that fetch together and decides them in one pass (one append, one acknowledgement)."""
    async with Deployment(settings, continuations=True) as deployment:
        batches: list[list[str]] = []
        decide = deployment.processor._decide

        async def recording(commands: list, on_durable: object = None) -> None:
            batches.append([type(command.payload).__name__ for _, command in commands])
            await decide(commands, on_durable)  # type: ignore[arg-type]

        monkeypatch.setattr(deployment.processor, "_decide", recording)
        for _ in range(5):
            value = f"v{uuid.uuid4().hex[:8]}"
            handle = await deployment.client.start_workflow(ContinuedParent, value)
            assert await handle.result(timeout=60) == f"done:{value}"
    together = [batch for batch in batches if batch == ["CompleteWorkflowTask", "CompleteActivityTask"]]
    alone = [batch for batch in batches if batch == ["CompleteActivityTask"]]
    assert together and len(together) >= len(alone), batches
