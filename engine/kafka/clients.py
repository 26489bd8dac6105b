"""The one place treeflow builds Kafka clients: producers, consumers, admin clients, faust's credentials.

Every client built here

- connects with the settings' security (TLS: CA, client certificate and key, key
  password, hostname check; SASL: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) and the
  pass-through `settings.client_options` (each option goes to the kinds of client
  that take it);
- names itself ``treeflow-<role>-<host>-<pid>`` (`client_id`), so broker logs, quotas
  and ACLs can tell treeflow's processes apart;
- never creates a topic by accident: its Metadata requests name topics with
  ``allow_auto_topic_creation=false`` (Metadata v4+). aiokafka 0.14 always asks with
  ``true``, so on a broker with ``auto.create.topics.enable=true`` (Kafka's default) a
  consumer or producer that looks up a topic deleted meanwhile would create it again,
  with the broker's default partition count;
- starts within `settings.connect_timeout`, or raises `BrokerUnreachableError` naming
  the address; a TLS or SASL failure is `AuthenticationError`; an idempotent producer
  the broker refuses is `WrongProfileError` (the `kafka` profile against Tansu).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import socket
import ssl
from collections.abc import Mapping
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient, ConnectionGroup
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaConnectionError, KafkaError, UnknownError
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from .errors import AuthenticationError, BrokerUnreachableError, SettingsError, WrongProfileError
from . import fetch_wait
from .profile import PROFILE_ENV, BrokerProfile
from .settings import KafkaSettings

log = logging.getLogger(__name__)

_KINDS = {
    "producer": AIOKafkaProducer,
    "consumer": AIOKafkaConsumer,
    "admin": AIOKafkaAdminClient,
    "client": AIOKafkaClient,
}
_ACCEPTED = {kind: frozenset(inspect.signature(cls.__init__).parameters) - {"self", "loop", "topics"}
             for kind, cls in _KINDS.items()}


def client_id(role: str) -> str:
    """``treeflow-<role>-<host>-<pid>``."""
    return f"treeflow-{role}-{socket.gethostname()}-{os.getpid()}"


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of the settings, None for PLAINTEXT and SASL_PLAINTEXT.

    Without a CA file the system's trusted CAs verify the broker (managed clusters).
    """
    if not (settings.security_protocol or "").endswith("SSL"):
        return None
    try:
        context = create_ssl_context(cafile=settings.ssl_cafile, certfile=settings.ssl_certfile,
                                     keyfile=settings.ssl_keyfile, password=settings.ssl_password)
    except (ssl.SSLError, OSError) as error:
        raise SettingsError(f"cannot load the TLS files (CA {settings.ssl_cafile}, certificate "
                            f"{settings.ssl_certfile}, key {settings.ssl_keyfile}): {error}") from None
    context.check_hostname = settings.ssl_check_hostname
    return context


def connection_options(settings: KafkaSettings, kind: str, role: str) -> dict[str, Any]:
    """The address, security and pass-through options a client of `kind` gets."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": client_id(role),
        "security_protocol": settings.security_protocol,
    }
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.sasl_mechanism:
        options.update(sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username,
                       sasl_plain_password=settings.sasl_password)
    unknown = sorted(set(settings.client_options) - set().union(*_ACCEPTED.values()))
    if unknown:
        raise SettingsError(f"unknown Kafka client options {unknown} (TREEFLOW_KAFKA_OPTIONS): aiokafka's "
                            "AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient take none of them")
    options.update({key: value for key, value in settings.client_options.items() if key in _ACCEPTED[kind]})
    return options


class _NoAutoCreateClient(AIOKafkaClient):  # type: ignore[misc]
    """aiokafka's client, whose metadata refreshes never auto-create a topic.

    The same as `AIOKafkaClient._metadata_update` of aiokafka 0.14 except for
    ``allow_auto_topic_creation=False`` (only sent from Metadata v4 on; every broker
    treeflow supports speaks v4+).
    """

    async def _metadata_update(self, cluster_metadata: ClusterMetadata, topics: Any) -> bool:
        request = MetadataRequest(list(topics) if topics else None, allow_auto_topic_creation=False)
        nodeids: list[Any] = [b.nodeId for b in self.cluster.brokers()]
        bootstrap_id = ("bootstrap", ConnectionGroup.DEFAULT)
        if bootstrap_id in self._conns:
            nodeids.append("bootstrap")
        random.shuffle(nodeids)
        for node_id in nodeids:
            conn = await self._get_conn(node_id)
            if conn is None:
                continue
            try:
                metadata = await conn.send(request)
            except (KafkaError, asyncio.TimeoutError) as err:
                log.warning("Unable to request metadata from node with id %s: %r", node_id, err)
                continue
            if not metadata.brokers:
                return False
            cluster_metadata.update_metadata(metadata)
            if bootstrap_id in self._conns and len(self.cluster.brokers()):
                self._conns.pop(bootstrap_id).close()
            break
        else:
            log.error("Unable to update metadata from %s", nodeids)
            cluster_metadata.failed_update(None)
            return False
        return True


def forbid_auto_creation(client: AIOKafkaClient) -> None:
    """Make `client` (the AIOKafkaClient inside a producer, consumer or admin) name topics
    in Metadata requests with auto-creation disallowed."""
    if type(client) is AIOKafkaClient:
        client.__class__ = _NoAutoCreateClient


def producer(settings: KafkaSettings, role: str, **overrides: Any) -> AIOKafkaProducer:
    """A producer (not started) with the profile's options (acks=all, murmur2 key partitioner,
    idempotence where the broker has it), then `overrides`."""
    built = AIOKafkaProducer(**{**settings.profile.producer_options(),
                                **connection_options(settings, "producer", role), **overrides})
    forbid_auto_creation(built.client)
    return built


def consumer(settings: KafkaSettings, role: str, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer (not started) with the profile's options (no auto-commit, the profile's fetch
    wait and session timeout, ``auto_offset_reset="earliest"``), then `overrides`."""
    built = AIOKafkaConsumer(*topics, **{**settings.profile.consumer_options(),
                                         **connection_options(settings, "consumer", role), **overrides})
    forbid_auto_creation(built._client)
    return built


def grow_fetch_wait(consumer: AIOKafkaConsumer, profile: BrokerProfile) -> None:
    """Let a started consumer's fetch wait grow where the profile says so (`treeflow.kafka.fetch_wait`)."""
    if profile.fetch_max_wait_ceiling_ms is not None:
        fetch_wait.install(consumer, profile.fetch_wait_ms(), profile.fetch_max_wait_ceiling_ms)


def admin(settings: KafkaSettings, role: str = "admin", **overrides: Any) -> AIOKafkaAdminClient:
    """An admin client (not started)."""
    built = AIOKafkaAdminClient(**{**connection_options(settings, "admin", role), **overrides})
    forbid_auto_creation(built._client)
    return built


def bare_client(settings: KafkaSettings, role: str, **overrides: Any) -> AIOKafkaClient:
    """aiokafka's low-level client (not bootstrapped), for requests treeflow builds itself."""
    return _NoAutoCreateClient(**{**connection_options(settings, "client", role), **overrides})


Started = TypeVar("Started", AIOKafkaProducer, AIOKafkaConsumer, AIOKafkaAdminClient, AIOKafkaClient)


async def start(client: Started, settings: KafkaSettings) -> Started:
    """Start `client` within `settings.connect_timeout`, turning aiokafka's start-up errors into
    treeflow's. On failure, or when the caller is cancelled meanwhile, the client is closed
    (no "Unclosed AIOKafkaProducer")."""
    try:
        starting = asyncio.ensure_future(_start_within(client, settings.connect_timeout))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            # aiokafka's bootstrap drops the connection it is asking for metadata when
            # cancelled, unclosed: let the start finish, then close everything it opened.
            await asyncio.wait([starting])
            if not starting.cancelled():
                starting.exception()  # retrieved: the cancellation is what the caller gets
            raise
        if isinstance(client, AIOKafkaConsumer):
            grow_fetch_wait(client, settings.profile)
        return client
    except BaseException as error:
        await _close_quietly(client)
        translated = await _translate(error, settings, client)
        if translated is None:
            raise
        raise translated from error


async def _start_within(client: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        if isinstance(client, AIOKafkaClient):
            await client.bootstrap()
        else:
            await client.start()


async def stop(client: AIOKafkaProducer | AIOKafkaConsumer | AIOKafkaAdminClient | AIOKafkaClient) -> None:
    """Stop (or close) a client, even when the caller is cancelled meanwhile.

    A reader closed by cancellation (a dropped HTTP stream) can be cancelled again
    while it stops; an interrupted `stop()` leaves a connection open for good. The stop
    runs in a task of its own, which also avoids an aiokafka 0.14 race: a group-less
    consumer stopped before the loop ran its committed-offsets task once raised that
    task's CancelledError from `stop()`.
    """
    if isinstance(client, AIOKafkaAdminClient | AIOKafkaClient):
        stopping = asyncio.ensure_future(client.close())
    else:
        stopping = asyncio.ensure_future(client.stop())
    try:
        await asyncio.shield(stopping)
    except asyncio.CancelledError:
        if not stopping.done():  # the caller was cancelled: finish stopping, then go on cancelling
            await asyncio.wait([stopping])
            raise
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        # aiokafka 0.14's consumer.stop() soon after start() lets the CancelledError of a task
        # it cancels escape (seen on every broker); the consumer did stop.
        log.debug("a Kafka client's stop() raised CancelledError; it stopped all the same")


async def _close_quietly(client: Any) -> None:
    try:
        if isinstance(client, AIOKafkaAdminClient | AIOKafkaClient):
            await client.close()
        else:
            await client.stop()
    except Exception:  # a client that never connected may fail to close; nothing is left to free
        log.debug("closing a client that failed to start", exc_info=True)


async def _translate(error: BaseException, settings: KafkaSettings, client: Any) -> Exception | None:
    address = settings.bootstrap_servers
    if isinstance(error, TimeoutError):
        return BrokerUnreachableError(
            f"no Kafka broker answered at {address} within {settings.connect_timeout:g}s: check "
            "TREEFLOW_BOOTSTRAP_SERVERS and that the broker runs (TREEFLOW_CONNECT_TIMEOUT sets the wait)")
    if isinstance(error, KafkaConnectionError):
        if settings.security_protocol != "PLAINTEXT" and await _tcp_answers(address):
            return AuthenticationError(
                f"the broker at {address} accepts connections but the {settings.security_protocol} "
                f"handshake failed{' (SASL ' + str(settings.sasl_mechanism) + ')' if settings.sasl_mechanism else ''}:"
                " check the TLS CA/certificate/key and the SASL mechanism, user name and password "
                "(TREEFLOW_SSL_*, TREEFLOW_SASL_*)")
        return BrokerUnreachableError(
            f"cannot connect to Kafka at {address}: check TREEFLOW_BOOTSTRAP_SERVERS and that the broker runs")
    if isinstance(error, KeyError | ValueError) and (settings.sasl_mechanism or "").startswith("SCRAM-"):
        # aiokafka 0.14 does not parse a SCRAM error ("e=...") from the broker: it fails on the
        # missing server signature instead.
        return AuthenticationError(
            f"the broker at {address} refused the SASL {settings.sasl_mechanism} login of "
            f"{settings.sasl_username!r} (unknown user or wrong password): check TREEFLOW_SASL_USERNAME "
            "and TREEFLOW_SASL_PASSWORD")
    if isinstance(error, UnknownError) and isinstance(client, AIOKafkaProducer) and settings.profile.idempotent_producer:
        return WrongProfileError(
            f"the broker at {address} refused an idempotent producer (InitProducerId failed with "
            f"{error!r}); Apache Kafka grants one, the embedded Tansu broker does not: against "
            f"Tansu set {PROFILE_ENV}=tansu (`treeflow broker` prints the variables to export)")
    return None


async def _tcp_answers(address: str) -> bool:
    for server in address.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host or "localhost", int(port)), 2.0)
        except (OSError, ValueError, TimeoutError):
            continue
        writer.close()
        return True
    return False


def faust_options(settings: KafkaSettings, role: str = "processor") -> Mapping[str, Any]:
    """The faust App options that carry the settings' security and client id
    (`broker_credentials`, `broker_client_id`). faust hands them to every aiokafka client it builds."""
    import faust  # the processor extra; the consumer library never gets here

    context = ssl_context(settings)
    credentials: Any = None
    if settings.sasl_mechanism:
        credentials = faust.SASLCredentials(username=settings.sasl_username, password=settings.sasl_password,
                                            mechanism=settings.sasl_mechanism, ssl_context=context)
    elif context is not None:
        credentials = faust.SSLCredentials(context)
    options: dict[str, Any] = {"broker_client_id": client_id(role)}
    if credentials is not None:
        options["broker_credentials"] = credentials
    return options
