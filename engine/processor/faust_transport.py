"""faust's aiokafka transport with the broker profile's fetch wait.

faust 0.15 hard-codes `fetch_max_wait_ms=1500` for its consumer. On a broker that
wakes waiting fetches (Kafka) that costs nothing; on Tansu, which does not, every
command would wait up to 1.5 s. This is the one place treeflow changes it.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as driver


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
