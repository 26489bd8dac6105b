"""A fetch wait that grows where the broker needs it: the `tansu` profile's workaround.

Tansu does not wake a waiting fetch when a record arrives, so a consumer's latency is
about its fetch wait: a short wait keeps a hop short. But Tansu also finds a fetch's
offset by listing the partition's stored batches from the first, and stops when the
wait is over: on a long partition a short fetch answers no record at all, every time,
although the high watermark it returns is past the fetch offset. That answer is the
one sign of a wait too short, and the only one this module acts on:

- a fetch that brought no record while a partition it asked for has records past
  the fetch offset doubles the consumer's wait (up to the profile's ceiling);
- each fetch that brings records takes a tenth off it, down to the profile's wait.

Kafka finds an offset through its index and wakes waiting fetches, so the `kafka`
profile never installs this. aiokafka has no public hook for the wait of each fetch:
the consumer's fetcher is given this subclass after it starts (its request routine
looks `_proc_fetch_request` and `_fetch_max_wait_ms` up on every fetch).
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.fetcher import Fetcher

#: The fraction of the wait taken off by each fetch that brings records.
DECAY = 0.9


def next_wait(wait_ms: int, base_ms: int, max_ms: int, *, got_records: bool, starved: bool) -> int:
    """The wait of the next fetch, after one that brought records or not, or found a partition starved."""
    if got_records:
        return max(base_ms, int(wait_ms * DECAY))
    if starved:
        return min(max_ms, wait_ms * 2)
    return wait_ms


class GrowingWaitFetcher(Fetcher):
    """aiokafka's fetcher whose wait follows the rule of this module."""

    treeflow_base_wait_ms: int
    treeflow_max_wait_ms: int

    async def _proc_fetch_request(self, assignment: Any, node_id: int, request: Any) -> bool:
        got_records = await super()._proc_fetch_request(assignment, node_id, request)
        starved = not got_records and assignment.active and self._starved(assignment, request)
        self._fetch_max_wait_ms = next_wait(self._fetch_max_wait_ms, self.treeflow_base_wait_ms,
                                            self.treeflow_max_wait_ms, got_records=got_records, starved=starved)
        return got_records

    def _starved(self, assignment: Any, request: Any) -> bool:
        """Whether a partition of `request` has records past its position that the fetch did not bring."""
        for topic, partitions in request.topics:
            for partition, offset, _ in partitions:
                tp = TopicPartition(topic, partition)
                if tp not in assignment.tps or tp in self._records:
                    continue
                state = assignment.state_value(tp)
                if (state.has_valid_position and state.position == offset and state.highwater is not None
                        and state.highwater > offset):
                    return True
        return False


def install(consumer: AIOKafkaConsumer, base_wait_ms: int, max_wait_ms: int) -> None:
    """Make a started consumer's fetch wait grow from `base_wait_ms` up to `max_wait_ms` as above."""
    fetcher = consumer._fetcher
    if fetcher is None or type(fetcher) is not Fetcher:
        return
    fetcher.__class__ = GrowingWaitFetcher
    fetcher.treeflow_base_wait_ms = base_wait_ms
    fetcher.treeflow_max_wait_ms = max(base_wait_ms, max_wait_ms)
    fetcher._fetch_max_wait_ms = base_wait_ms
