"""pytest fixtures for testing treeflow workflows. Enable them in a `conftest.py`:

    pytest_plugins = ["treeflow.pytest_plugin"]

    async def test_order(treeflow_broker):
        async with Environment(workflows=[OrderWorkflow], **treeflow_broker.options) as env:
            ...

`treeflow_broker` is one broker for the whole test session: the Kafka named by
`TREEFLOW_BOOTSTRAP_SERVERS`, else the embedded broker shared by every `Environment` of
the process (started once, about 3 s, instead of once per environment). For
time-skipping tests, `Environment(time_skipping=True, **treeflow_broker.options)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest

from treeflow.kafka import TANSU, BrokerProfile, current_profile
from treeflow.kafka.settings import BOOTSTRAP_ENV

from .testing import shared_broker


@dataclass(frozen=True)
class SessionBroker:
    bootstrap_servers: str
    profile: BrokerProfile

    @property
    def options(self) -> dict[str, Any]:
        """`Environment(...)` keyword arguments that point it at this broker."""
        return {"bootstrap_servers": self.bootstrap_servers, "profile": self.profile}


@pytest.fixture(scope="session")
def treeflow_broker() -> SessionBroker:
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        return SessionBroker(external, current_profile())
    return SessionBroker(shared_broker().bootstrap_servers, TANSU)
