"""Commands taken up before a rebalance are left for the partition's owner to read again:
neither decided nor acknowledged here, nor counted as decided (`tf.durable`); a partition
given back is read once this processor's appends in flight are acknowledged."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition

from treeflow.kafka import KafkaSettings
from treeflow.processor import app as processor_app
from treeflow.processor.app import Processor


@dataclass
class Message:
    partition: int
    offset: int
    generation_id: int
    acks: list[int] = field(default_factory=list)

    def ack(self, consumer: Any) -> None:
        self.acks.append(self.offset)


def processor(generation: int, owned: tuple[int, ...]) -> Processor:
    made = Processor(KafkaSettings("127.0.0.1:1", topic_prefix="unit", partitions=3))
    made._app.consumer_generation_id = generation
    for partition in owned:
        made.engines[partition] = object()  # type: ignore[assignment]
        made._durable[partition] = -1
    return made


async def decide(made: Processor, messages: list[Message]) -> list[tuple[list[tuple[int, int, bytes]],
                                                                         Callable[[], None]]]:
    """Run the decision loop over `messages`; what `_handle` was given."""
    handled: list[tuple[list[tuple[int, int, bytes]], Callable[[], None]]] = []

    async def handle(records: list[tuple[int, int, bytes]], on_durable: Callable[[], None]) -> None:
        handled.append((records, on_durable))

    made._handle = handle  # type: ignore[method-assign]
    made._taken = [(message, b"") for message in messages]
    made._arrived.set()
    loop = asyncio.ensure_future(made._decide_taken())
    await asyncio.sleep(0.05)
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
    return handled


async def test_commands_of_an_earlier_generation_or_another_owner_are_neither_decided_nor_acknowledged() -> None:
    made = processor(generation=5, owned=(0, 1))
    before_rebalance = Message(0, 7, generation_id=4)
    given_away = Message(2, 3, generation_id=5)
    current = Message(1, 9, generation_id=5)
    handled = await decide(made, [before_rebalance, given_away, current])

    assert [records for records, _ in handled] == [[(1, 9, b"")]]
    assert made.stats.reassigned == 2
    handled[0][1]()  # its events are in the log
    assert current.acks == [9] and made._durable[1] == 9
    assert before_rebalance.acks == [] and given_away.acks == [] and made._durable[0] == -1


async def test_a_command_whose_partition_changed_owner_while_it_was_decided_is_not_acknowledged() -> None:
    made = processor(generation=5, owned=(0, 1))
    moved, stayed = Message(0, 4, generation_id=5), Message(1, 6, generation_id=5)
    handled = await decide(made, [moved, stayed])
    assert len(handled) == 1 and len(handled[0][0]) == 2

    made.engines[0] = object()  # type: ignore[assignment]  # partition 0 taken away and given back meanwhile
    made._durable[0] = -1
    handled[0][1]()
    assert moved.acks == [] and made._durable[0] == -1
    assert stayed.acks == [6] and made._durable[1] == 6


async def test_a_partition_given_back_is_read_once_the_appends_in_flight_are_acknowledged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made = processor(generation=5, owned=())
    order: list[str] = []
    acknowledged = asyncio.get_running_loop().create_future()

    async def in_flight() -> None:  # a decision of before the rebalance, still being appended
        await acknowledged
        order.append("appended")

    async def ends(settings: KafkaSettings, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        order.append("read back")
        return {tp: 0 for tp in partitions}

    async def committed(partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in partitions}

    async def recover(tp: TopicPartition, end: int, committed_offset: int) -> None:
        made._ready[tp.partition].set()

    monkeypatch.setattr(processor_app, "end_offsets", ends)
    made._committed = committed  # type: ignore[method-assign]
    made._recover = recover  # type: ignore[method-assign]
    made._last_publish = asyncio.ensure_future(in_flight())
    assigning = asyncio.ensure_future(made._on_assigned(None, {TopicPartition(made.settings.topics.commands, 0)}))
    await asyncio.sleep(0.05)
    assert order == [] and not assigning.done()
    acknowledged.set_result(None)
    await asyncio.wait_for(assigning, 1)
    assert order == ["appended", "read back"]
