"""treeflow's topics: create them idempotently, read their partition count, watch that they stay.

Every Metadata request here names its topics with ``allow_auto_topic_creation=false``:
on a broker with ``auto.create.topics.enable=true`` (Kafka's default) naming a missing
topic would otherwise create it with the broker's default partition count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from aiokafka.admin import NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import TopicAlreadyExistsError, for_code
from aiokafka.protocol.metadata import MetadataRequest

from . import clients
from .errors import (
    BrokerRequestError,
    PartitionMismatchError,
    TopicConflictError,
    TopicsMissingError,
    TopicsResetError,
)
from .settings import PARTITIONS_ENV, KafkaSettings

log = logging.getLogger(__name__)

UNKNOWN_TOPIC_OR_PARTITION = 3
LEADER_NOT_AVAILABLE = 5
#: How often a running process checks that its topics are still there.
WATCH_INTERVAL = 5.0

DAY_MS = 24 * 3600 * 1000
WEEK_MS = 7 * DAY_MS
#: Workflow tasks carry their run's history: allow records well above Kafka's 1 MiB default.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_TASK_QUEUES = ("default",)


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

    Safe to run any number of times. Without an explicit partition count
    (`settings.partitions_explicit`), the events topic's count is used when it exists.
    Raises `TopicConflictError`, before creating anything, when an existing topic has
    another partition count than configured:
    a tree's records are routed by murmur2(root id) mod partitions, so changing the
    count would silently move trees; it is a migration, not a setting.
    """
    admin = await clients.start(clients.admin(settings, "admin"), settings)
    try:
        brokers = len((await admin.describe_cluster())["brokers"])
        replication = settings.replication_factor or min(3, brokers)
        if replication < 3 and settings.profile.name != "tansu":
            log.warning("topics get replication factor %d (the cluster has %d broker(s)); "
                        "production needs 3", replication, brokers)
        if not settings.partitions_explicit:  # new topics (a new task queue) get the existing count
            current = await _partition_counts(admin._client, [settings.topics.events])
            if settings.topics.events in current:
                settings = replace(settings, partitions=current[settings.topics.events])
        specs = topic_specs(settings, replication, task_queues)
        existing = await _partition_counts(admin._client, [s.name for s in specs])
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
                    raise BrokerRequestError(f"cannot create topic {name}: {message}")
        # Whoever created them, the counts must now agree (a concurrent creator may differ).
        final = await _partition_counts(admin._client, [s.name for s in specs])
        wrong = [s.name for s in specs if final.get(s.name) != s.partitions]
        if wrong:
            raise TopicConflictError(f"topics {wrong} do not have {settings.partitions} partitions: {final}")
        return TopicsReport(created=created, existing=sorted(existing), specs=specs)
    finally:
        await admin.close()


async def partition_counts(settings: KafkaSettings, names: Iterable[str], role: str = "admin") -> dict[str, int]:
    """The partition count of each named topic that exists (missing ones are left out).

    Never creates a topic (see the module's docstring).
    """
    client = await clients.start(clients.bare_client(settings, role), settings)
    try:
        return await _partition_counts(client, list(names))
    finally:
        await client.close()


async def _partition_counts(client: AIOKafkaClient, names: list[str]) -> dict[str, int]:
    node = client.get_random_node()
    response = await client.send("bootstrap" if node is None else node,
                                 MetadataRequest(names, allow_auto_topic_creation=False))
    counts = {}
    for topic in response.to_object()["topics"]:
        code, name = topic["error_code"], topic["topic"]
        if code == UNKNOWN_TOPIC_OR_PARTITION or name not in names:
            continue
        if code not in (0, LEADER_NOT_AVAILABLE):
            raise BrokerRequestError(f"the broker cannot describe topic {name}: {for_code(code).__name__} "
                                     "(if the cluster uses ACLs, treeflow's user needs Describe on its topics)")
        if topic["partitions"]:
            counts[name] = len(topic["partitions"])
    return counts


async def adopt_partitions(settings: KafkaSettings, role: str) -> KafkaSettings:
    """`settings` with the partition count the commands, events and replies topics have on the broker.

    Raises `TopicsMissingError` when one of them does not exist, and
    `PartitionMismatchError` when they disagree with each other, or with a count the
    user set (`partitions_explicit`): records are routed by murmur2(root id) mod the
    count, so every part must use the topics' own.
    """
    names = settings.topics
    wanted = [names.commands, names.events, names.replies]
    counts = await partition_counts(settings, wanted, role)
    missing = [name for name in wanted if name not in counts]
    if missing:
        raise TopicsMissingError(
            f"treeflow's topic{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"{'do' if len(missing) > 1 else 'does'} not exist on {settings.bootstrap_servers}: "
            "create them with `treeflow topics create` (or check TREEFLOW_TOPIC_PREFIX)")
    count = counts[names.events]
    if any(counts[name] != count for name in wanted):
        raise PartitionMismatchError(
            "treeflow's topics disagree on the partition count ("
            + ", ".join(f"{name}: {counts[name]}" for name in wanted)
            + "): they must agree (a tree's commands, events and replies share a partition number); "
            "recreate them under another prefix")
    if settings.partitions_explicit and settings.partitions != count:
        raise PartitionMismatchError(
            f"{PARTITIONS_ENV} (or --partitions) is {settings.partitions} but {names.events} has {count} "
            f"partitions: unset it (running parts take the count from the broker) or set it to {count}")
    return settings if settings.partitions == count else replace(settings, partitions=count)


async def watch_topics(settings: KafkaSettings, names: Iterable[str], role: str,
                       interval: float | None = None) -> None:
    """Return never; raise `TopicsResetError` once one of `names` is gone or has another
    partition count than when the watch started (a broker restarted under a running
    process, a topic deleted or recreated). Connection errors are left to the clients
    that do the work; the watch tries again at its next interval (`WATCH_INTERVAL`
    seconds unless given).
    """
    wanted = list(dict.fromkeys(names))
    client = await clients.start(clients.bare_client(settings, role), settings)
    try:
        first = await _partition_counts(client, wanted)
        while True:
            await asyncio.sleep(WATCH_INTERVAL if interval is None else interval)
            try:
                now = await _partition_counts(client, wanted)
            except (OSError, asyncio.TimeoutError, BrokerRequestError) as error:
                log.warning("could not check treeflow's topics: %r", error)
                continue
            except Exception as error:  # aiokafka's connection errors
                log.warning("could not check treeflow's topics: %r", error)
                continue
            gone = [name for name in wanted if name in first and name not in now]
            changed = [f"{name} ({first[name]} -> {now[name]} partitions)" for name in wanted
                       if name in first and name in now and now[name] != first[name]]
            if gone or changed:
                raise TopicsResetError(
                    "treeflow's topics changed under this process"
                    + (f"; gone: {', '.join(gone)}" if gone else "")
                    + (f"; recreated: {', '.join(changed)}" if changed else "")
                    + f" (on {settings.bootstrap_servers}; an embedded broker forgets everything when it "
                    "restarts): stopping. Recreate the topics with `treeflow topics create` and restart; "
                    "what the lost topics held is gone")
    finally:
        await client.close()
