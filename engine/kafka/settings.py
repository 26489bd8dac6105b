"""Where treeflow's clients find Kafka and its topics: explicit values, then the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .profile import BrokerProfile, current_profile

BOOTSTRAP_ENV = "TREEFLOW_BOOTSTRAP_SERVERS"
PREFIX_ENV = "TREEFLOW_TOPIC_PREFIX"
PARTITIONS_ENV = "TREEFLOW_PARTITIONS"
REPLICATION_ENV = "TREEFLOW_REPLICATION_FACTOR"

DEFAULT_PREFIX = "treeflow"
DEFAULT_PARTITIONS = 12


class SettingsError(ValueError):
    """A setting is missing or malformed."""


@dataclass(frozen=True)
class TopicNames:
    """The names of treeflow's topics under one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def commands(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def replies(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def snapshots(self) -> str:
        """The processor's checkpoints of each partition (compacted; see treeflow.processor.snapshots)."""
        return f"{self.prefix}.snapshots"

    def tasks(self, task_queue: str) -> str:
        return f"{self.prefix}.tasks.{task_queue}"


@dataclass(frozen=True)
class KafkaSettings:
    """How to reach Kafka and which topics to use."""

    bootstrap_servers: str
    topic_prefix: str = DEFAULT_PREFIX
    #: Partitions of the commands, events and tasks topics, fixed when they are created.
    partitions: int = DEFAULT_PARTITIONS
    #: None means 3, or the number of brokers when the cluster has fewer.
    replication_factor: int | None = None
    profile: BrokerProfile = field(default_factory=current_profile)

    @property
    def topics(self) -> TopicNames:
        return TopicNames(self.topic_prefix)

    @classmethod
    def resolve(
        cls,
        bootstrap_servers: str | None = None,
        *,
        topic_prefix: str | None = None,
        partitions: int | None = None,
        replication_factor: int | None = None,
        profile: BrokerProfile | None = None,
    ) -> KafkaSettings:
        """Settings from the arguments given, the rest from `TREEFLOW_*` variables or defaults."""
        bootstrap = bootstrap_servers or os.environ.get(BOOTSTRAP_ENV)
        if not bootstrap:
            raise SettingsError(
                f"no Kafka bootstrap servers: pass bootstrap_servers=..., set {BOOTSTRAP_ENV}, "
                "or run under `treeflow dev`, which starts the embedded broker"
            )
        return cls(
            bootstrap_servers=bootstrap,
            topic_prefix=topic_prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX,
            partitions=partitions or _int_env(PARTITIONS_ENV) or DEFAULT_PARTITIONS,
            replication_factor=replication_factor or _int_env(REPLICATION_ENV),
            profile=profile or current_profile(),
        )


def _int_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise SettingsError(f"{name}={raw!r} must be at least 1")
    return value
