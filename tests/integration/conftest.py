"""Fixtures of the consumer library's integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from treeflow.testing import Environment
from tests.integration import tree_app


@pytest_asyncio.fixture(scope="module")
async def tree_env(broker) -> AsyncIterator[Environment]:
    """The engine hosting `tree_app`'s workflows, on topics of this test module's own."""
    async with Environment(workflows=tree_app.WORKFLOWS, activities=tree_app.ACTIVITIES,
                           bootstrap_servers=broker.bootstrap_servers, profile=broker.profile) as environment:
        yield environment
