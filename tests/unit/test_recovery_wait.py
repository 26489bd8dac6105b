"""Commands that wait for their partition's recovery say so, and stop waiting when the
recovery ends or the partition is taken away (a rebalance replaces its readiness)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from treeflow.kafka import KafkaSettings
from treeflow.processor import app as processor_app
from treeflow.processor.app import Processor


def waiting_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "have waited" in r.getMessage()]


async def test_a_long_recovery_wait_is_logged_and_ends_when_the_partition_is_taken_away(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processor_app, "RECOVERY_WAIT_WARNING", 0.05)
    caplog.set_level(logging.WARNING, logger="treeflow.processor.app")
    processor = Processor(KafkaSettings("127.0.0.1:1", topic_prefix="unit", partitions=2))
    processor._replace_readiness(1, asyncio.Event())
    waiting = asyncio.ensure_future(processor._recovered({0, 1}))
    await asyncio.sleep(0.18)
    assert not waiting.done()
    messages = waiting_warnings(caplog)
    assert len(messages) >= 2 and all("partition 1 " in message for message in messages), messages
    assert "waited 0 s" in messages[0]

    processor._replace_readiness(1, None)  # a rebalance took the partition
    await asyncio.wait_for(waiting, 1)


async def test_a_wait_ends_when_the_recovery_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processor_app, "RECOVERY_WAIT_WARNING", 0.05)
    processor = Processor(KafkaSettings("127.0.0.1:1", topic_prefix="unit", partitions=2))
    first, again = asyncio.Event(), asyncio.Event()
    processor._replace_readiness(0, first)
    waiting = asyncio.ensure_future(processor._recovered({0}))
    await asyncio.sleep(0.01)
    processor._replace_readiness(0, again)  # taken away and given back: it waits for the new recovery
    await asyncio.sleep(0.08)
    assert not waiting.done()
    again.set()
    await asyncio.wait_for(waiting, 1)
