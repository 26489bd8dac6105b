"""The same round trip on Apache Kafka in a container, when a Docker engine answers."""

import pytest

from treeflow.consumers import EventReader
from treeflow.kafka import KAFKA, KafkaSettings, ensure_topics, partition_for
from tests.conftest import docker_answers
from tests.samples import write_events
from tests.integration.test_event_stream import tree

pytestmark = [pytest.mark.integration, pytest.mark.docker,
              pytest.mark.skipif(not docker_answers(), reason="no Docker engine answers")]


async def test_round_trip_on_apache_kafka() -> None:
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer() as container:
        settings = KafkaSettings(container.get_bootstrap_server(), topic_prefix="tc", partitions=6, profile=KAFKA)
        report = await ensure_topics(settings)
        assert len(report.created) == 4
        events = tree("root-tc")
        await write_events(settings, events)
        consumed = [item async for item in EventReader(settings)]
        assert [item.event for item in consumed] == events
        assert {item.partition for item in consumed} == {partition_for("root-tc", 6)}
