from hypothesis import given
from hypothesis import strategies as st
from aiokafka.partitioner import DefaultPartitioner

from treeflow.kafka import murmur2, partition_for
from treeflow.kafka.partitioner import key_partitioner

# The vectors of Kafka's own UtilsTest.testMurmur2 (clients/src/test/.../UtilsTest.java).
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    bytes([ord("a"), ord("b"), ord("c")]): 479470107,
}


def test_murmur2_matches_kafkas_test_vectors() -> None:
    assert {key: murmur2(key) for key in KAFKA_VECTORS} == KAFKA_VECTORS


def test_partition_is_the_positive_hash_modulo_the_count() -> None:
    # Java: Utils.toPositive(murmur2(key)) % numPartitions
    assert partition_for(b"foobar", 12) == (-790332482 & 0x7FFFFFFF) % 12 == 6
    assert partition_for("foobar", 12) == partition_for(b"foobar", 12)


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=200))
def test_agrees_with_aiokafkas_default_partitioner(key: bytes, partitions: int) -> None:
    everything = list(range(partitions))
    assert partition_for(key, partitions) == DefaultPartitioner()(key, everything, everything)
    assert key_partitioner(key, everything, everything) == partition_for(key, partitions)


def test_rejects_an_empty_topic_and_an_unkeyed_record() -> None:
    import pytest

    with pytest.raises(ValueError, match="at least one partition"):
        partition_for("k", 0)
    with pytest.raises(ValueError, match="keyed"):
        key_partitioner(None, [0], [0])


def test_remembers_only_recent_keys() -> None:
    # A processor that runs for months sees every execution id once: the cache must not
    # keep them all (each entry keeps its id alive).
    partition_for.cache_clear()
    for i in range(20_000):
        partition_for(f"execution-{i:08d}-0123456789abcdef", 12)
    assert partition_for.cache_info().currsize <= 4096
    assert partition_for("execution-00019999-0123456789abcdef", 12) == partition_for(
        b"execution-00019999-0123456789abcdef", 12)
