"""`python -m treeflow.bench` on the broker under test: both modes measured, the split /
in-process ratios printed, and each mode's topics deleted afterwards (`--keep-topics` keeps them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from treeflow.kafka import KafkaSettings, clients
from treeflow.kafka.profile import PROFILE_ENV
from treeflow.kafka.settings import BOOTSTRAP_ENV

pytestmark = pytest.mark.integration

SMALL = ["--workload", "flat", "--latency-runs", "3", "--warmup", "1", "--throughput-runs", "6", "--in-flight", "3",
         "--partitions", "2", "--json"]


def bench(settings: KafkaSettings, *args: str) -> dict:
    env = {**os.environ, BOOTSTRAP_ENV: settings.bootstrap_servers, PROFILE_ENV: settings.profile.name}
    done = subprocess.run([sys.executable, "-m", "treeflow.bench", *args], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


async def topics_named(settings: KafkaSettings, prefixes: list[str]) -> list[str]:
    admin = await clients.start(clients.admin(settings, "test"), settings)
    try:
        return sorted(name for name in await admin.list_topics() if name.split(".")[0] in prefixes)
    finally:
        await clients.stop(admin)


async def test_both_modes_are_measured_and_their_topics_deleted_after_each(settings: KafkaSettings) -> None:
    report = bench(settings, "--mode", "both", *SMALL)
    assert report["errors"] == []
    modes = {mode["mode"]: mode for mode in report["modes"]}
    assert set(modes) == {"in-process", "split"}
    for mode in modes.values():
        latency = mode["workloads"]["flat"]["latency"]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"], latency
        assert mode["workloads"]["flat"]["throughput"]["per_s"] > 0
    assert report["split_ratios"]["flat"]["p50_ms"] > 0
    assert await topics_named(settings, [mode["topic_prefix"] for mode in modes.values()]) == []


async def test_keep_topics_keeps_them(settings: KafkaSettings) -> None:
    report = bench(settings, "--mode", "in-process", "--keep-topics", *SMALL)
    prefix = report["modes"][0]["topic_prefix"]
    assert await topics_named(settings, [prefix]) == sorted(
        f"{prefix}.{name}" for name in ("commands", "events", "replies", "snapshots", "tasks.default"))
