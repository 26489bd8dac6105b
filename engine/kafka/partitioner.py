"""Kafka's default partitioner, bit for bit as the Java client computes it.

Every record of a tree is keyed by its `root_workflow_exec_id`; commands and events
have the same partition count, so a tree's commands and events share a partition
number and anyone can compute it from the root id alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2`: the 32-bit murmur2 hash as a signed Java int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    tail = length % 4
    if tail == 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


#: Keys whose partition is remembered: the roots in use now (a command, its events and
#: reply come within moments), not every id seen. Each entry keeps its key alive
#: (~250 B with the id), so 65,536 of them held ~16 MB of finished executions' ids.
PARTITION_CACHE = 4096


@functools.lru_cache(maxsize=PARTITION_CACHE)
def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for `key` among `partitions`."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, got {partitions}")
    data = key.encode("utf-8") if isinstance(key, str) else key
    return (murmur2(data) & 0x7FFFFFFF) % partitions


def key_partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """aiokafka's partitioner hook, so that our producers route with `partition_for`."""
    if key is None:
        raise ValueError("treeflow records are always keyed by their root execution id")
    return all_partitions[partition_for(key, len(all_partitions))]
