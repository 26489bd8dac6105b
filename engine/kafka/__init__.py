"""Kafka plumbing shared by the engine and the consumer library (no faust here)."""

from . import clients
from .embedded import BrokerError, EmbeddedBroker
from .errors import (
    AuthenticationError,
    BrokerRequestError,
    BrokerUnreachableError,
    KafkaSetupError,
    PartitionMismatchError,
    SettingsError,
    TopicConflictError,
    TopicsMissingError,
    TopicsResetError,
    WrongProfileError,
)
from .offsets import end_offsets
from .partitioner import murmur2, partition_for
from .profile import KAFKA, TANSU, BrokerProfile, current_profile, profile_named
from .settings import KafkaSettings, TopicNames
from .topics import TopicsReport, adopt_partitions, ensure_topics, partition_counts, watch_topics

__all__ = [
    "KAFKA", "TANSU", "AuthenticationError", "BrokerError", "BrokerProfile", "BrokerRequestError",
    "BrokerUnreachableError", "EmbeddedBroker", "KafkaSettings", "KafkaSetupError", "PartitionMismatchError",
    "SettingsError", "TopicConflictError", "TopicNames", "TopicsMissingError", "TopicsReport", "TopicsResetError",
    "WrongProfileError", "adopt_partitions", "clients", "current_profile", "end_offsets", "ensure_topics",
    "murmur2", "partition_counts", "partition_for", "profile_named", "watch_topics",
]
