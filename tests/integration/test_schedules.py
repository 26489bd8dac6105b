"""Schedules across a processor crash (README "Schedules"): a schedule ticking every 2 s
fires on time, the processor is killed (-9) and another one started, and the log shows
every tick started once, no duplicate run, and exactly the documented catch-up: the most
recent tick missed during the outage fires once, the others count as `missed`.

Also: the CLI and the HTTP routes drive a schedule end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

import treeflow
from treeflow.client import Client
from treeflow.core.schedules import run_id_of
from treeflow.kafka import KafkaSettings, partition_for
from treeflow.schemas import EventType

from .test_durability import Processes, client, processes, read_events, settle  # noqa: F401

pytestmark = pytest.mark.integration

APP_FILE = Path(__file__).with_name("schedule_app.py")
REPO = Path(__file__).resolve().parents[2]
T = EventType
EVERY = timedelta(seconds=2)


async def fired_count(handle: treeflow.ScheduleHandle) -> int:
    return (await handle.describe(timeout=30)).fired


async def test_a_schedule_fires_on_time_across_a_processor_kill_without_duplicates(
        settings: KafkaSettings, client: Client, processes: Processes) -> None:
    processes.env["TREEFLOW_SNAPSHOT_INTERVAL"] = "1"  # the restart recovers the schedule from a snapshot
    module = ("--module", str(APP_FILE), "-q", "default")
    first = processes.start("processor", "-v", "processor", *module)  # -v: its recovery log lines
    schedule_id = f"every2-{uuid.uuid4().hex[:6]}"
    handle = await client.create_schedule(
        schedule_id, "scheduled_echo", {"n": 1}, spec=treeflow.ScheduleSpec.every(EVERY),
        policy=treeflow.SchedulePolicy(overlap=treeflow.ScheduleOverlapPolicy.ALLOW_ALL), timeout=60)

    async def fired_at_least(n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (count := await fired_count(handle)) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} run(s) fired, waited for {n}\n{processes.logs()}")
            await asyncio.sleep(0.2)
        return count

    before = await fired_at_least(4, 60)
    processes.kill(first)
    killed_at = time.monotonic()
    await asyncio.sleep(5)  # at least two ticks come due while no processor runs
    processes.start("processor", "-v", "processor", *module)
    await fired_at_least(before + 3, 90)
    outage = time.monotonic() - killed_at
    await handle.pause("test over")
    await settle(settings)

    partition = partition_for(schedule_id, settings.partitions)
    events = [e for _, _, e in await read_events(settings, [partition])
              if e.workflow_context.root_workflow_exec_id == schedule_id]
    fired = [e for e in events if e.event_type is T.SCHEDULE_FIRED]
    starts = [e.workflow_context.workflow_exec_id for e in events if e.event_type is T.WORKFLOW_EXECUTION_STARTED]
    runs = [e.payload.workflow_exec_id for e in fired]
    nominals = [e.payload.nominal_time for e in fired]
    print(f"\n{len(fired)} ticks fired; outage {outage:.1f} s; missed per tick {[e.payload.missed for e in fired]}; "
          f"lateness (s) {[round((e.timestamp - e.payload.nominal_time).total_seconds(), 3) for e in fired]}")

    # No duplicate: every tick fired once, every run started once, its id derived from the tick.
    assert len(set(nominals)) == len(nominals) and sorted(nominals) == nominals
    assert sorted(starts) == sorted(runs) and len(set(starts)) == len(starts)
    assert runs == [run_id_of(schedule_id, nominal) for nominal in nominals]
    # No tick lost beyond the catch-up rule: between two fired ticks, only the `missed` ones.
    for previous, current in zip(fired, fired[1:]):
        gap = current.payload.nominal_time - previous.payload.nominal_time
        assert gap == EVERY * (1 + current.payload.missed), (previous.payload, current.payload)
    catch_up = [e for e in fired if e.payload.missed]
    assert len(catch_up) == 1, "exactly one tick (the first after the restart) catches up"
    [late] = catch_up
    assert late.payload.missed >= 1
    # ...and it is the most recent tick due when the new processor decided it.
    assert late.payload.nominal_time <= late.timestamp < late.payload.nominal_time + EVERY
    # On time: every other tick fired within a second of its time (it fires at its time + jitter, 0 here).
    assert all(e.timestamp - e.payload.nominal_time < timedelta(seconds=1) for e in fired if e is not late)
    # Every run completed.
    completed = {e.workflow_context.workflow_exec_id for e in events if e.event_type is T.WORKFLOW_EXECUTION_COMPLETED}
    assert set(runs) <= completed | {runs[-1]}
    restarted_log = processes.running[-1][2].read_text(errors="replace")
    assert f"partition {partition} recovered from snapshot" in restarted_log


def cli(settings: KafkaSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREEFLOW_")}
    env.update({"TREEFLOW_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "TREEFLOW_TOPIC_PREFIX": settings.topic_prefix,
                "TREEFLOW_PARTITIONS": str(settings.partitions), "TREEFLOW_BROKER_PROFILE": settings.profile.name})
    return subprocess.run([sys.executable, "-m", "treeflow.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


async def test_cli_and_http_routes(settings: KafkaSettings, client: Client, processes: Processes) -> None:
    from treeflow.consumers.gateway import create_app

    processes.processor("--module", str(APP_FILE), "-q", "default")
    out = await asyncio.to_thread(cli, settings, "schedule", "create", "nightly", "scheduled_echo", "--cron",
                                  "0 3 * * *", "--time-zone", "Europe/Paris", "--input", '{"n": 2}', "--timeout", "60")
    assert out.returncode == 0, out.stderr
    listed = await asyncio.to_thread(cli, settings, "schedule", "list", "--json")
    assert [json.loads(line)["schedule_id"] for line in listed.stdout.splitlines()] == ["nightly"]
    triggered = await asyncio.to_thread(cli, settings, "schedule", "trigger", "nightly")
    run = triggered.stdout.strip()
    assert triggered.returncode == 0 and run.startswith("nightly."), triggered
    assert (await client.get_handle(run).result(timeout=30))["echo"] == {"n": 2}
    missing = await asyncio.to_thread(cli, settings, "schedule", "pause", "nope")
    assert missing.returncode == 7 and missing.stderr.startswith("error: schedule nope not found")
    bad = await asyncio.to_thread(cli, settings, "schedule", "create", "x", "wf", "--cron", "nope")
    assert bad.returncode == 2 and "invalid cron" in bad.stderr

    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as http:
        created = await http.post("/v1/workflows/schedules", json={
            "workflow_identifier": "scheduled_echo", "schedule_id": "hourly",
            "schedule": {"input": {"n": 3}, "intervals": [{"every": "3600s"}], "policy": {"overlap": 1}}})
        assert created.status_code == 201 and created.json() == {"schedule_id": "hourly"}, created.text
        got = (await http.get("/v1/workflows/schedules/hourly")).json()
        assert got["intervals"] == [{"every": "3600s", "offset": None}] and got["policy"]["overlap"] == 1
        assert len(got["future_executions"]) == 5 and got["paused"] is False
        assert (await http.post("/v1/workflows/schedules/hourly/pause", json={"note": "n"})).status_code == 204
        paused = (await http.get("/v1/workflows/schedules", params={"status": "paused"})).json()["schedules"]
        assert [s["schedule_id"] for s in paused] == ["hourly"] and paused[0]["note"] == "n"
        assert (await http.post("/v1/workflows/schedules/hourly/trigger", json={})).status_code == 204
        assert (await http.post("/v1/workflows/schedules/hourly/resume")).status_code == 204
        recent = (await http.get("/v1/workflows/schedules/hourly")).json()["recent_executions"]
        assert len(recent) == 1 and recent[0]["execution_id"].startswith("hourly.")
        assert (await http.delete("/v1/workflows/schedules/hourly")).status_code == 204
        assert (await http.get("/v1/workflows/schedules/hourly")).status_code == 404
        bad = await http.post("/v1/workflows/schedules", json={"workflow_identifier": "w", "schedule": {
            "cron_expressions": ["0 3 * * *"], "policy": {"overlap": 4}}})
        assert bad.status_code == 422 and "not supported" in bad.json()["detail"]
        names = [s["schedule_id"] for s in (await http.get("/v1/workflows/schedules")).json()["schedules"]]
        assert names == ["nightly"]


async def test_the_mistralai_client_drives_the_schedule_routes(settings: KafkaSettings, client: Client,
                                                               processes: Processes) -> None:
    """Mistral's own client (`mistralai`, when installed) against `treeflow serve`'s schedule routes."""
    mistral = pytest.importorskip("mistralai.client")
    from treeflow.consumers.gateway import GatewayServer, create_app

    processes.processor("--module", str(APP_FILE), "-q", "default")
    server = GatewayServer(create_app(settings), port=0)
    await server.start()
    try:
        schedules = mistral.Mistral(server_url=server.url, api_key="unused").workflows.schedules
        models = mistral.models
        created = await schedules.schedule_workflow_async(
            workflow_identifier="scheduled_echo", schedule_id="m1", schedule=models.ScheduleDefinition(
                input={"a": 1}, intervals=[models.ScheduleInterval(every="3600s")],
                policy=models.SchedulePolicy(overlap=6)), timeout_ms=60_000)
        assert created.schedule_id == "m1"
        await schedules.pause_schedule_async(schedule_id="m1", note="hold")
        listed = await schedules.get_schedules_async(status="paused")
        assert [s.schedule_id for s in listed.result.schedules] == ["m1"] and listed.result.schedules[0].note == "hold"
        await schedules.trigger_schedule_async(schedule_id="m1")
        await schedules.resume_schedule_async(schedule_id="m1")
        got = await schedules.get_schedule_async(schedule_id="m1")
        assert got.paused is False and got.policy.overlap == 6 and got.intervals[0].every == "3600s"
        [run] = [e.execution_id for e in got.recent_executions]
        assert (await client.get_handle(run).result(timeout=30))["echo"] == {"a": 1}
        await schedules.unschedule_workflow_async(schedule_id="m1")
        with pytest.raises(Exception, match="404"):
            await schedules.get_schedule_async(schedule_id="m1")
    finally:
        await server.stop()
