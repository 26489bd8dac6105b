"""Kafka plumbing shared by the engine and the consumer library (no faust here)."""

from .embedded import BrokerError, EmbeddedBroker
from .offsets import end_offsets
from .partitioner import murmur2, partition_for
from .profile import KAFKA, TANSU, BrokerProfile, current_profile, profile_named
from .settings import KafkaSettings, SettingsError, TopicNames
from .topics import TopicConflictError, TopicsReport, ensure_topics

__all__ = [
    "KAFKA", "TANSU", "BrokerError", "BrokerProfile", "EmbeddedBroker", "KafkaSettings",
    "SettingsError", "TopicConflictError", "TopicNames", "TopicsReport", "current_profile",
    "end_offsets", "ensure_topics", "murmur2", "partition_for", "profile_named",
]
