"""Create treeflow's topics, idempotently, and refuse a partition count that disagrees."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from .settings import KafkaSettings

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
WEEK_MS = 7 * DAY_MS
#: Workflow tasks carry their run's history: allow records well above Kafka's 1 MiB default.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_TASK_QUEUES = ("default",)


class TopicConflictError(RuntimeError):
    """An existing topic disagrees with the configured layout; nothing was changed."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicsReport:
    """What `ensure_topics` found and did."""

    created: list[str]
    existing: list[str]
    specs: list[TopicSpec]


def topic_specs(settings: KafkaSettings, replication_factor: int, task_queues: Iterable[str]) -> list[TopicSpec]:
    """The topics treeflow needs, with the configs a production cluster needs.

    The events topic is the source of truth: it is never deleted by retention.
    Commands and tasks are transient requests, kept a week for diagnosis; replies
    only matter to a waiting client, kept a day. Snapshots are compacted: only the
    latest record of each key (a partition's latest manifest, its chunks) is needed.
    """
    min_isr = str(min(2, replication_factor))
    keep_forever = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1",
                    "min.insync.replicas": min_isr}
    keep_a_week = {"cleanup.policy": "delete", "retention.ms": str(WEEK_MS), "min.insync.replicas": min_isr}
    keep_a_day = {"cleanup.policy": "delete", "retention.ms": str(DAY_MS), "min.insync.replicas": min_isr}
    tasks = {**keep_a_week, "max.message.bytes": str(MAX_MESSAGE_BYTES)}
    compacted = {"cleanup.policy": "compact", "min.insync.replicas": min_isr,
                 "max.message.bytes": str(MAX_MESSAGE_BYTES)}
    names = settings.topics

    def spec(name: str, configs: dict[str, str]) -> TopicSpec:
        return TopicSpec(name, settings.partitions, replication_factor, configs)

    return [
        spec(names.commands, keep_a_week),
        spec(names.events, keep_forever),
        spec(names.replies, keep_a_day),
        spec(names.snapshots, compacted),
        *(spec(names.tasks(queue), tasks) for queue in dict.fromkeys(task_queues)),
    ]


async def ensure_topics(
    settings: KafkaSettings, task_queues: Iterable[str] = DEFAULT_TASK_QUEUES
) -> TopicsReport:
    """Create the commands, events and tasks topics that are missing.

    Safe to run any number of times. Raises `TopicConflictError`, before creating
    anything, when an existing topic has another partition count than configured:
    a tree's records are routed by murmur2(root id) mod partitions, so changing the
    count would silently move trees; it is a migration, not a setting.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, client_id="treeflow-admin")
    await admin.start()
    try:
        brokers = len((await admin.describe_cluster())["brokers"])
        replication = settings.replication_factor or min(3, brokers)
        if replication < 3 and settings.profile.name != "tansu":
            log.warning("topics get replication factor %d (the cluster has %d broker(s)); "
                        "production needs 3", replication, brokers)
        specs = topic_specs(settings, replication, task_queues)
        existing = await _partition_counts(admin, [s.name for s in specs])
        conflicts = [
            f"{s.name} has {existing[s.name]} partitions, {s.partitions} are configured"
            for s in specs
            if s.name in existing and existing[s.name] != s.partitions
        ]
        if conflicts:
            raise TopicConflictError(
                "existing topics disagree with the configured partition count: "
                + "; ".join(conflicts)
                + ". Records are routed by murmur2(root id) mod partitions, so changing the count "
                "moves trees between partitions: migrate to new topics (another prefix) instead, "
                "or set TREEFLOW_PARTITIONS / --partitions to the existing count."
            )
        missing = [s for s in specs if s.name not in existing]
        created = []
        if missing:
            response = await admin.create_topics(
                [NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=s.configs) for s in missing]
            )
            for name, code, *rest in response.topic_errors:
                error = for_code(code)
                if code == 0:
                    created.append(name)
                elif error is TopicAlreadyExistsError:
                    log.info("topic %s was created concurrently", name)
                else:
                    message = rest[0] if rest and rest[0] else error.__name__
                    raise RuntimeError(f"cannot create topic {name}: {message}")
        # Whoever created them, the counts must now agree (a concurrent creator may differ).
        final = await _partition_counts(admin, [s.name for s in specs])
        wrong = [s.name for s in specs if final.get(s.name) != s.partitions]
        if wrong:
            raise TopicConflictError(f"topics {wrong} do not have {settings.partitions} partitions: {final}")
        return TopicsReport(created=created, existing=sorted(existing), specs=specs)
    finally:
        await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partition count of each named topic that exists.

    Asks for the metadata of all topics: a Metadata request that names a missing
    topic creates it on a broker that auto-creates topics (Tansu always does,
    Kafka by default), with the broker's default partition count.
    """
    counts = {}
    for topic in await admin.describe_topics(None):
        if topic["topic"] in names and topic["error_code"] == 0 and topic["partitions"]:
            counts[topic["topic"]] = len(topic["partitions"])
    return counts
