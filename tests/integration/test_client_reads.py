"""Clients read only their own (issue 10): replies and close notices on the client's
own replies partition; events only of the trees it waits on without having started them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import treeflow as workflows
from treeflow import client as client_module
from treeflow.client import Client
from treeflow.kafka import partition_for
from treeflow.testing import Environment

pytestmark = pytest.mark.integration


@workflows.workflow.define(name="reads_echo")
class Echo:
    @workflows.workflow.entrypoint
    async def run(self, value: str) -> str:
        return value


async def client_not_on(env: Environment, partition: int) -> Client:
    """A started client whose replies partition is not `partition` (`start` picks it)."""
    while True:
        client = Client(env.settings)
        await client.start()
        if client.reply_partition != partition:
            return client
        await client.close()


async def test_a_clients_fetched_bytes_do_not_grow_with_other_clients_traffic(broker) -> None:
    async with Environment(workflows=[Echo], bootstrap_servers=broker.bootstrap_servers,
                           profile=broker.profile) as env:
        busy = env.client
        quiet = await client_not_on(env, busy.reply_partition)
        try:
            assert await quiet.execute_workflow(Echo, "mine") == "mine"
            own = quiet.stats.fetched_bytes
            assert own > 0 and quiet.stats.followed_event_partitions == 0
            results = await asyncio.gather(*(busy.execute_workflow(Echo, f"x{i}") for i in range(60)))
            assert len(results) == 60
            await asyncio.sleep(0.5)
            assert busy.stats.fetched_bytes > 20 * own  # the busy one got its 120 replies and notices
            assert quiet.stats.fetched_bytes == own, "the quiet client fetched the other's traffic"
            # Waiting on an execution it did not start: it follows that tree's partition only.
            handle = await busy.start_workflow(Echo, "theirs")
            assert await quiet.get_handle(handle.execution_id, root_execution_id=handle.execution_id).result() \
                == "theirs"
            assert quiet.stats.followed_event_partitions == 1
        finally:
            await quiet.close()


async def test_lost_close_notices_are_found_in_the_log_by_one_read_per_partition(
        broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Close notices lost (as with a processor that died after appending the close): each
    waiting result is found in the log, by one shared read of each partition from an
    offset read before the starts, not one read of the whole partition per waiter."""
    monkeypatch.setattr(client_module, "CLOSE_NOTICE_CHECK", 1.0)
    monkeypatch.setattr(client_module, "FLOOR_REFRESH", 0.0)
    async with Environment(workflows=[Echo], bootstrap_servers=broker.bootstrap_servers,
                           profile=broker.profile) as env:
        client = Client(env.settings)
        await client.start()
        try:
            for _ in range(2):  # events in every partition, then starts that read their ends
                warm = 8 * env.settings.partitions
                assert len(await asyncio.gather(*(client.execute_workflow(Echo, "w") for _ in range(warm)))) == warm
                await asyncio.sleep(0.5)  # the background reads of the partitions' ends are done
            on_reply = client._on_reply
            monkeypatch.setattr(client, "_on_reply", lambda record, headers, tp: None if "tf.closed" in headers
                                else on_reply(record, headers, tp))
            handles = [await client.start_workflow(Echo, f"lost-{i}") for i in range(30)]
            floors = [client._started_here[h.execution_id] for h in handles]
            assert all(floor is not None and floor > 0 for floor in floors), floors
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
            assert results == [f"lost-{i}" for i in range(30)]
            assert 1 <= client.stats.log_checks <= 3 * env.settings.partitions, client.stats.log_checks
        finally:
            await client.close()


@workflows.workflow.define(name="reads_parked")
class Parked:
    def __init__(self) -> None:
        self.go = False

    @workflows.workflow.signal
    def release(self) -> None:
        self.go = True

    @workflows.workflow.entrypoint
    async def run(self) -> str:
        await workflows.workflow.wait_condition(lambda: self.go)
        return "released"


class _CountedReader(client_module.EventReader):
    made = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).made += 1
        super().__init__(*args, **kwargs)


async def test_overdue_close_notices_cost_one_read_per_partition_not_one_per_wait(broker, monkeypatch) -> None:
    """Under load a wait may outlast CLOSE_NOTICE_CHECK; the look in the log for a lost
    notice must not read the partition once per waiting execution (200 waits doing so made
    the bench's throughput collapse until results timed out)."""
    monkeypatch.setattr(client_module, "CLOSE_NOTICE_CHECK", 0.25)
    monkeypatch.setattr(client_module, "EventReader", _CountedReader)
    async with Environment(workflows=[Parked], bootstrap_servers=broker.bootstrap_servers,
                           profile=broker.profile, visibility=False) as env:
        partitions = env.settings.partitions
        ids = [i for i in (f"parked-{n}" for n in range(2000)) if partition_for(i, partitions) == 0][:30]
        handles = [await env.client.start_workflow(Parked, execution_id=i) for i in ids]
        waits = [asyncio.ensure_future(handle.result()) for handle in handles]
        _CountedReader.made = 0
        await asyncio.sleep(1.5)  # about six sweeps
        reads = _CountedReader.made
        assert 1 <= reads <= 10, f"{reads} reads of the events partition for {len(ids)} waits in 1.5 s"
        assert env.client.stats.log_checks >= 1
        for handle in handles:
            await handle.signal("release")
        assert await asyncio.gather(*waits) == ["released"] * len(ids)
