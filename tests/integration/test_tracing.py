"""OpenTelemetry: one trace per tree, carried across processes in record headers (W3C traceparent)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from treeflow.client import Client
from treeflow.consumers import EventReader
from treeflow.definitions import collect
from treeflow.kafka import KafkaSettings, ensure_topics
from treeflow.observability import tracing
from treeflow.processor.app import Processor
from treeflow.worker.worker import Worker
from tests.integration import tree_app
from tests.polling import eventually

pytestmark = pytest.mark.integration

trace = pytest.importorskip("opentelemetry.trace", reason="needs the `tracing` extra")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.util._once import Once  # noqa: E402


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The SDK with an in-memory exporter as the global provider, for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        # Unset the global provider (as opentelemetry's own test utilities do), so that
        # the rest of the session runs untraced.
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace._TRACER_PROVIDER = None
        assert not tracing.enabled()


def traceparent_trace_id(value: bytes) -> int:
    return int(value.decode().split("-")[1], 16)


async def test_a_tree_is_one_trace_across_client_processor_worker_and_a_recovery(
        settings: KafkaSettings, spans: InMemorySpanExporter) -> None:
    assert tracing.enabled()
    await ensure_topics(settings, ["default"])
    workflows, activities = collect([tree_app])
    first = Processor(settings)
    worker = Worker(settings, workflows, activities)
    client = Client(settings)
    await first.start()
    await worker.start()
    await client.start()
    second = None
    try:
        await first.wait_assigned()
        root = f"traced-{uuid.uuid4().hex[:8]}"
        handle = await client.start_workflow(tree_app.Root, tree_app.TreeInput(value="t", straggler_seconds=4.0),
                                             execution_id=root)
        assert await handle.result(timeout=60) == "root(child(leaf:t))"
        # The abandoned straggler is asleep: its processor goes away and another recovers the partition.
        await first.stop()
        second = Processor(settings)
        await second.start()
        await second.wait_assigned()

        def activity_spans() -> list:
            return [s for s in spans.get_finished_spans() if s.name == "RunActivity:leaf_step"]

        await eventually(lambda: asyncio.sleep(0, activity_spans()), lambda found: len(found) == 2, 60)
    finally:
        await client.close()
        await worker.stop(grace=5)
        for processor in (first, second):
            if processor is not None:
                await processor.stop()

    finished = spans.get_finished_spans()
    (start,) = [s for s in finished if s.name == "StartWorkflow:tree_root"]
    trace_id = start.context.trace_id
    assert {s.context.trace_id for s in finished} == {trace_id}, "every span of the tree is in one trace"
    runs = {s.attributes["treeflow.workflow_name"]: s for s in finished if s.name.startswith("RunWorkflow:")}
    # The straggler's run span was open in the processor that stopped: lost (documented), the rest is here.
    assert set(runs) == {"tree_root", "tree_child", "tree_grandchild"}
    assert runs["tree_root"].parent.span_id == start.context.span_id
    assert runs["tree_child"].parent.span_id == runs["tree_root"].context.span_id
    assert runs["tree_grandchild"].parent.span_id == runs["tree_child"].context.span_id
    assert all(run.attributes["treeflow.status"] == "COMPLETED" for run in runs.values())
    assert runs["tree_root"].start_time < runs["tree_child"].start_time < runs["tree_child"].end_time \
        <= runs["tree_root"].end_time
    by_exec = {s.attributes["treeflow.workflow_exec_id"]: s for s in activity_spans()}
    grandchild_run = runs["tree_grandchild"]
    assert by_exec[grandchild_run.attributes["treeflow.workflow_exec_id"]].parent.span_id == \
        grandchild_run.context.span_id
    # The straggler's activity ran after the recovery: the new processor found the straggler's
    # context in the events' headers and handed it to the worker with the task.
    (straggler_activity,) = [s for e, s in by_exec.items() if e != grandchild_run.attributes["treeflow.workflow_exec_id"]]
    assert straggler_activity.context.trace_id == trace_id
    assert straggler_activity.attributes["treeflow.attempt"] == 1

    # Every event of the tree carries the trace in its headers, for any consumer to follow.
    records = [item async for item in EventReader(settings, accept=lambda record: bool(
        traceparent_trace_id(tracing.traceparent_of(record.headers) or b"00-0-0-00") == trace_id))]
    everything = [item async for item in EventReader(settings)]
    assert len(records) == len(everything) > 0
