"""The faust app class of the processor, with the broker profile's fetch wait.

faust 0.15 hard-codes `fetch_max_wait_ms=1500` for its consumer. On a broker that
wakes waiting fetches (Kafka) that costs nothing; on Tansu, which does not, every
command would wait up to 1.5 s. This is the one place treeflow changes it.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from faust.transport.drivers import aiokafka as driver

# faust logs through the module of the App class: keep its rebalance chatter quiet.
logging.getLogger(__name__).setLevel(logging.ERROR)


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher.
        consumer._fetch_max_wait_ms = self.app.treeflow_fetch_max_wait_ms
        return consumer


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = _Consumer


class ProcessorApp(faust.App):
    treeflow_fetch_max_wait_ms: int = 500

    def _new_transport(self) -> Any:
        return Transport(self.conf.broker_consumer, self)
