"""The faust app class of the processor: the broker profile's fetch wait, no topic auto-creation.

faust 0.15 hard-codes `fetch_max_wait_ms=1500` for its consumer. On a broker that
wakes waiting fetches (Kafka) that costs nothing; on Tansu, which does not, every
command would wait up to 1.5 s. This is the one place treeflow changes it.

faust builds its own aiokafka clients; security and client id reach them through
the App's `broker_credentials` and `broker_client_id` (`treeflow.kafka.clients.faust_options`).
Their metadata requests are made not to auto-create topics here, as every client
built by `treeflow.kafka.clients` is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import faust
from faust.transport.drivers import aiokafka as driver

from treeflow.kafka.clients import forbid_auto_creation, grow_fetch_wait
from treeflow.kafka.profile import KAFKA, BrokerProfile

# faust logs through the module of the App class: keep its rebalance chatter quiet.
logging.getLogger(__name__).setLevel(logging.ERROR)


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher.
        consumer._fetch_max_wait_ms = self.app.treeflow_profile.fetch_wait_ms()
        forbid_auto_creation(consumer._client)
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        grow_fetch_wait(self._consumer, self.app.treeflow_profile)

    async def _commit(self, offsets: Any) -> bool:
        """faust's commit, given up once the processor halted (its topics vanished): aiokafka
        retries a commit to a missing topic forever, which would hold `App.stop()` for good."""
        if self.app.treeflow_halted:
            return False
        commit = asyncio.ensure_future(super()._commit(offsets))
        while not commit.done():
            await asyncio.wait([commit], timeout=0.2)
            if self.app.treeflow_halted and not commit.done():
                commit.cancel()
                await asyncio.gather(commit, return_exceptions=True)
                return False
        return commit.result()


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        """faust's getmany, which its drain loop iterates to hand each record of a fetch
        to the agents, one by one; it keeps `ProcessorApp.treeflow_handing_over` and calls
        `ProcessorApp.treeflow_handed_over` once a fetch's records are all handed over."""
        try:
            async for item in super().getmany(timeout):
                self.app.treeflow_handing_over = True
                yield item
        finally:
            self.app.treeflow_handing_over = False
            self.app.treeflow_handed_over()


class _Producer(driver.Producer):
    def _new_producer(self, transactional_id: str | None = None) -> Any:
        producer = super()._new_producer(transactional_id)
        forbid_auto_creation(producer.client)
        return producer


class Transport(driver.Transport):
    Consumer = _Consumer
    Producer = _Producer


class ProcessorApp(faust.App):
    #: The broker profile: its fetch wait replaces faust's hard-coded 1.5 s.
    treeflow_profile: BrokerProfile = KAFKA
    #: Set by the processor when it stops because its topics vanished: commit nothing more.
    treeflow_halted: bool = False
    #: True from the first record of a fetch handed to the agents until the last one.
    treeflow_handing_over: bool = False
    #: Called when the consumer has handed every record of a fetch to the agents.
    treeflow_handed_over: Callable[[], None] = staticmethod(lambda: None)

    def _new_transport(self) -> Any:
        return Transport(self.conf.broker_consumer, self)
