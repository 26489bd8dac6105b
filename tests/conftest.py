"""The broker under test: external if TREEFLOW_BOOTSTRAP_SERVERS is set, testcontainers'
Kafka if a Docker engine answers, the embedded broker otherwise. Each test gets its
own topic prefix, so tests never see each other's data."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from treeflow.kafka import KAFKA, TANSU, BrokerProfile, EmbeddedBroker, KafkaSettings, current_profile
from treeflow.kafka.settings import BOOTSTRAP_ENV


@dataclass(frozen=True)
class BrokerUnderTest:
    kind: str  # external, testcontainers or embedded
    bootstrap_servers: str
    profile: BrokerProfile


def docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerUnderTest]:
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        yield BrokerUnderTest("external", external, current_profile())
    elif docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield BrokerUnderTest("testcontainers", container.get_bootstrap_server(), KAFKA)
    else:
        with EmbeddedBroker() as embedded:
            yield BrokerUnderTest("embedded", embedded.bootstrap_servers, TANSU)


@pytest.fixture
def settings(broker: BrokerUnderTest) -> KafkaSettings:
    """Settings with a topic prefix of this test's own."""
    return KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic_prefix=f"t{uuid.uuid4().hex[:10]}",
                         partitions=4, profile=broker.profile)


def pytest_report_header() -> str:
    if os.environ.get(BOOTSTRAP_ENV):
        return f"broker: external ({os.environ[BOOTSTRAP_ENV]})"
    return "broker: testcontainers Kafka if a Docker engine answers, else the embedded Tansu broker"
