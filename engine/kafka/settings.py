"""Where treeflow's clients find Kafka and its topics: explicit values, then the environment."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SettingsError
from .profile import BrokerProfile, current_profile

BOOTSTRAP_ENV = "TREEFLOW_BOOTSTRAP_SERVERS"
PREFIX_ENV = "TREEFLOW_TOPIC_PREFIX"
PARTITIONS_ENV = "TREEFLOW_PARTITIONS"
REPLICATION_ENV = "TREEFLOW_REPLICATION_FACTOR"
CONNECT_TIMEOUT_ENV = "TREEFLOW_CONNECT_TIMEOUT"
SECURITY_PROTOCOL_ENV = "TREEFLOW_SECURITY_PROTOCOL"
SSL_CAFILE_ENV = "TREEFLOW_SSL_CAFILE"
SSL_CERTFILE_ENV = "TREEFLOW_SSL_CERTFILE"
SSL_KEYFILE_ENV = "TREEFLOW_SSL_KEYFILE"
SSL_PASSWORD_ENV = "TREEFLOW_SSL_PASSWORD"
SSL_CHECK_HOSTNAME_ENV = "TREEFLOW_SSL_CHECK_HOSTNAME"
SASL_MECHANISM_ENV = "TREEFLOW_SASL_MECHANISM"
SASL_USERNAME_ENV = "TREEFLOW_SASL_USERNAME"
SASL_PASSWORD_ENV = "TREEFLOW_SASL_PASSWORD"
KAFKA_OPTIONS_ENV = "TREEFLOW_KAFKA_OPTIONS"

DEFAULT_PREFIX = "treeflow"
DEFAULT_PARTITIONS = 12
DEFAULT_CONNECT_TIMEOUT = 10.0

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: Set by treeflow from the settings above; `client_options` may not override them.
_OWNED_OPTIONS = frozenset({
    "bootstrap_servers", "security_protocol", "ssl_context", "sasl_mechanism", "sasl_plain_username",
    "sasl_plain_password", "group_id", "enable_auto_commit", "enable_idempotence", "partitioner",
})


__all__ = ["KafkaSettings", "SettingsError", "TopicNames"]


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
    """How to reach Kafka (address, TLS, SASL, client options) and which topics to use.

    Security settings apply to every connection treeflow opens (client, processor,
    workers, consumers, gateway, admin), through `treeflow.kafka.clients`.
    """

    bootstrap_servers: str
    topic_prefix: str = DEFAULT_PREFIX
    #: Partitions of the commands, events and tasks topics, fixed when they are created.
    #: Running parts take the count from the broker (`treeflow.kafka.topics.adopt_partitions`).
    partitions: int = DEFAULT_PARTITIONS
    #: None means 3, or the number of brokers when the cluster has fewer.
    replication_factor: int | None = None
    profile: BrokerProfile = field(default_factory=current_profile)
    #: True when `partitions` was chosen by the user (argument or TREEFLOW_PARTITIONS):
    #: then topics with another count are an error; otherwise the broker's count is adopted.
    partitions_explicit: bool = False
    #: How long connecting to the bootstrap servers may take before `BrokerUnreachableError`.
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL; None infers it: SASL_SSL with a SASL
    #: mechanism, SSL with a TLS file, PLAINTEXT otherwise.
    security_protocol: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    ssl_check_hostname: bool = True
    #: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    #: Other aiokafka client options, passed to every producer, consumer and admin client
    #: (e.g. {"request_timeout_ms": 60000, "metadata_max_age_ms": 60000}).
    client_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.security_protocol is None:
            object.__setattr__(self, "security_protocol", self._inferred_protocol())
        protocol = self.security_protocol
        if protocol not in SECURITY_PROTOCOLS:
            raise SettingsError(f"security protocol {protocol!r} is not one of {', '.join(SECURITY_PROTOCOLS)} "
                                f"({SECURITY_PROTOCOL_ENV})")
        uses_sasl = protocol.startswith("SASL_")
        if uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise SettingsError(f"{protocol} needs a SASL mechanism, one of {', '.join(SASL_MECHANISMS)} "
                                    f"({SASL_MECHANISM_ENV}); got {self.sasl_mechanism!r}")
            if not self.sasl_username or self.sasl_password is None:
                raise SettingsError(f"SASL {self.sasl_mechanism} needs a user name and a password "
                                    f"({SASL_USERNAME_ENV}, {SASL_PASSWORD_ENV})")
        elif self.sasl_mechanism:
            raise SettingsError(f"a SASL mechanism is set but the security protocol is {protocol}: "
                                f"use SASL_SSL or SASL_PLAINTEXT ({SECURITY_PROTOCOL_ENV})")
        if not protocol.endswith("SSL") and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            raise SettingsError(f"TLS files are set but the security protocol is {protocol}: "
                                f"use SSL or SASL_SSL ({SECURITY_PROTOCOL_ENV})")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise SettingsError(f"a client key needs its certificate ({SSL_CERTFILE_ENV})")
        for name, path in (("CA file", self.ssl_cafile), ("certificate", self.ssl_certfile),
                           ("key", self.ssl_keyfile)):
            if path and not os.path.isfile(path):
                raise SettingsError(f"TLS {name} {path!r} does not exist or is not a file")
        owned = sorted(_OWNED_OPTIONS & set(self.client_options))
        if owned:
            raise SettingsError(f"client options {owned} are set by treeflow itself; use the dedicated settings")
        if self.connect_timeout <= 0:
            raise SettingsError(f"the connect timeout must be positive ({CONNECT_TIMEOUT_ENV})")

    def _inferred_protocol(self) -> str:
        tls = bool(self.ssl_cafile or self.ssl_certfile)
        if self.sasl_mechanism:
            return "SASL_SSL"
        return "SSL" if tls else "PLAINTEXT"

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
        connect_timeout: float | None = None,
        security_protocol: str | None = None,
        ssl_cafile: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_password: str | None = None,
        ssl_check_hostname: bool | None = None,
        sasl_mechanism: str | None = None,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
        client_options: Mapping[str, Any] | None = None,
    ) -> KafkaSettings:
        """Settings from the arguments given, the rest from `TREEFLOW_*` variables or defaults."""
        bootstrap = bootstrap_servers or os.environ.get(BOOTSTRAP_ENV)
        if not bootstrap:
            raise SettingsError(
                f"no Kafka bootstrap servers: pass bootstrap_servers=..., set {BOOTSTRAP_ENV}, "
                "or run under `treeflow dev`, which starts the embedded broker"
            )
        chosen_partitions = partitions or _int_env(PARTITIONS_ENV)
        protocol = security_protocol or os.environ.get(SECURITY_PROTOCOL_ENV) or None
        return cls(
            bootstrap_servers=bootstrap,
            topic_prefix=topic_prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX,
            partitions=chosen_partitions or DEFAULT_PARTITIONS,
            partitions_explicit=chosen_partitions is not None,
            replication_factor=replication_factor or _int_env(REPLICATION_ENV),
            profile=profile or current_profile(),
            connect_timeout=connect_timeout or seconds_env(CONNECT_TIMEOUT_ENV) or DEFAULT_CONNECT_TIMEOUT,
            security_protocol=protocol.upper() if protocol else None,
            ssl_cafile=ssl_cafile or _str_env(SSL_CAFILE_ENV),
            ssl_certfile=ssl_certfile or _str_env(SSL_CERTFILE_ENV),
            ssl_keyfile=ssl_keyfile or _str_env(SSL_KEYFILE_ENV),
            ssl_password=ssl_password if ssl_password is not None else _str_env(SSL_PASSWORD_ENV),
            ssl_check_hostname=(ssl_check_hostname if ssl_check_hostname is not None
                                else _bool_env(SSL_CHECK_HOSTNAME_ENV, True)),
            sasl_mechanism=(sasl_mechanism or _str_env(SASL_MECHANISM_ENV) or "").upper() or None,
            sasl_username=sasl_username or _str_env(SASL_USERNAME_ENV),
            sasl_password=sasl_password if sasl_password is not None else os.environ.get(SASL_PASSWORD_ENV),
            client_options=dict(client_options) if client_options is not None else _json_env(KAFKA_OPTIONS_ENV),
        )


def _str_env(name: str) -> str | None:
    return os.environ.get(name) or None


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


def seconds_env(name: str, *, allow_zero: bool = False) -> float | None:
    """The number of seconds in variable `name` (None when unset); `SettingsError` when it is
    not a number, negative, or zero where `allow_zero` is false. `inf` is a number."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds") from None
    if not (value >= 0 if allow_zero else value > 0):  # also refuses NaN
        raise SettingsError(f"{name}={raw!r} must be {'at least 0' if allow_zero else 'more than 0'}")
    return value


def _bool_env(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not true or false")


def _json_env(name: str) -> dict[str, Any]:
    raw = os.environ.get(name)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as error:
        raise SettingsError(f"{name} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise SettingsError(f"{name} must be a JSON object of aiokafka options, e.g. "
                            '{"request_timeout_ms": 60000}')
    return value
