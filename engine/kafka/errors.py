"""The errors treeflow raises about Kafka: settings, the broker, treeflow's topics.

Each derives from `treeflow.errors.TreeflowError` and carries the `exit_code` the
CLI exits with (README, "Exit codes"): 3 configuration, 4 Kafka unreachable or a
broker error, 5 treeflow's topics missing or reset. aiokafka's own errors are
turned into these where treeflow knows what they mean; the message says what to do.
"""

from __future__ import annotations

from treeflow.errors import TreeflowError


class KafkaSetupError(TreeflowError):
    """Base of the Kafka-side errors below."""

    exit_code: int = 4


class SettingsError(KafkaSetupError, ValueError):
    """A setting is missing or malformed."""

    exit_code = 3


class TopicConflictError(KafkaSetupError, RuntimeError):
    """An existing topic disagrees with the configured layout; nothing was changed."""

    exit_code = 3


class PartitionMismatchError(TopicConflictError):
    """`TREEFLOW_PARTITIONS` (or `partitions=`) disagrees with the topics' partition count,
    or the commands and events topics disagree with each other."""


class WrongProfileError(KafkaSetupError):
    """The broker does not behave as the configured broker profile expects
    (e.g. the `kafka` profile against the embedded Tansu broker)."""

    exit_code = 3


class AuthenticationError(KafkaSetupError):
    """The broker refused the TLS handshake or the SASL credentials."""

    exit_code = 3


class BrokerUnreachableError(KafkaSetupError, ConnectionError):
    """No broker answered at the bootstrap address within the connect timeout."""

    exit_code = 4


class BrokerRequestError(KafkaSetupError):
    """The broker answered a request with an error treeflow cannot act on."""

    exit_code = 4


class TopicsMissingError(KafkaSetupError, LookupError):
    """One of treeflow's topics does not exist (never created, or deleted, or the
    embedded broker restarted, which forgets everything)."""

    exit_code = 5


class TopicsResetError(TopicsMissingError):
    """A topic changed under a running process: it disappeared, or came back with
    another partition count. The process stops instead of working on a layout that
    is no longer there."""


class OptionsError(TreeflowError, ValueError):
    """An options object was built with a value it cannot use (wrong type or range)."""

    exit_code = 2


def from_kafka_error(error: Exception, bootstrap_servers: str, profile: str | None = None) -> KafkaSetupError:
    """The treeflow error for an aiokafka error met while talking to `bootstrap_servers`
    after start-up (start-up errors are translated by `treeflow.kafka.clients.start`)."""
    from aiokafka.errors import KafkaConnectionError, UnknownError

    if isinstance(error, KafkaConnectionError):
        return BrokerUnreachableError(
            f"cannot connect to Kafka at {bootstrap_servers} ({error}): is the broker running? "
            "Check TREEFLOW_BOOTSTRAP_SERVERS or --bootstrap-servers")
    if isinstance(error, UnknownError) and profile == "kafka":
        return WrongProfileError(
            f"Kafka at {bootstrap_servers} answered {error!r}; if this is the embedded broker, set "
            "TREEFLOW_BROKER_PROFILE=tansu (it has no idempotent producer)")
    return BrokerRequestError(f"Kafka at {bootstrap_servers} answered with an error: {error!r}")
