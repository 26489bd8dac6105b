import dataclasses

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from click.testing import CliRunner

from treeflow.cli import main
from treeflow.kafka import KafkaSettings, TopicConflictError, ensure_topics

pytestmark = pytest.mark.integration


async def partition_counts(settings: KafkaSettings) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(None)
                if t["topic"].startswith(settings.topic_prefix + ".")}
    finally:
        await admin.close()


async def test_creates_the_topics_once_with_equal_partition_counts(settings: KafkaSettings) -> None:
    first = await ensure_topics(settings)
    assert sorted(first.created) == sorted([settings.topics.commands, settings.topics.events,
                                            settings.topics.replies, settings.topics.snapshots,
                                            settings.topics.tasks("default")])
    second = await ensure_topics(settings)
    assert second.created == []
    assert second.existing == sorted(first.created)
    assert await partition_counts(settings) == {name: 4 for name in first.created}


async def test_the_event_log_is_kept_forever(settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, settings.topics.events)])
        configs = {entry[0]: entry[1] for entry in response.resources[0][4]}
    finally:
        await admin.close()
    assert configs["retention.ms"] == "-1"
    assert configs["retention.bytes"] == "-1"
    assert configs["cleanup.policy"] == "delete"


async def test_refuses_a_different_partition_count_and_changes_nothing(settings: KafkaSettings) -> None:
    await ensure_topics(settings)
    before = await partition_counts(settings)
    conflicting = dataclasses.replace(settings, partitions=6, partitions_explicit=True)
    with pytest.raises(TopicConflictError, match=r"\.events has 4 partitions, 6 are configured.*migrat"):
        await ensure_topics(conflicting, task_queues=("default", "other"))
    assert await partition_counts(settings) == before  # tasks.other was not created either


def test_cli_create_is_idempotent_and_refuses_a_conflict(settings: KafkaSettings) -> None:
    env = {"TREEFLOW_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
           "TREEFLOW_BROKER_PROFILE": settings.profile.name, "TREEFLOW_TOPIC_PREFIX": settings.topic_prefix}
    runner = CliRunner()
    first = runner.invoke(main, ["topics", "create", "--partitions", "4", "--task-queue", "gpu"], env=env)
    assert first.exit_code == 0, first.output
    assert first.output.count("created") == 5
    assert f"{settings.topic_prefix}.tasks.gpu" in first.output
    second = runner.invoke(main, ["topics", "create", "--partitions", "4", "--task-queue", "gpu"], env=env)
    assert second.exit_code == 0, second.output
    assert second.output.count("exists") == 5
    conflict = runner.invoke(main, ["topics", "create", "--partitions", "8"], env=env)
    assert conflict.exit_code == 3  # configuration
    assert "has 4 partitions, 8 are configured" in conflict.output
