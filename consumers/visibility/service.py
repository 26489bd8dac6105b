"""The visibility service: keeps a `VisibilityStore` from the events topic, through a consumer group.

It is a `treeflow.consumers.subscribe` handler: at least once, ordered per tree. Each
event becomes an `ExecutionUpdate`; updates waiting at the same moment are written in
one transaction (group commit) together with the offsets they reach, and a handler
call returns only once its update is committed, so the consumer group commits an
offset only after the store has it. A redelivered event (after a crash or a
rebalance) is applied again and changes nothing: a row takes an event only if it is
newer than the row's last one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any

from treeflow.kafka import KafkaSettings, end_offsets
from treeflow.schemas import SCHEDULE_EVENTS

from ..events import TreeEvent
from ..reader import resolve_settings
from ..service import ServiceOptions, ServiceSubscription, subscribe
from .model import ExecutionUpdate, Freshness
from .store import VisibilityStore, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _UntilStored(ServiceOptions):
    def backoff(self, attempt: int) -> float:
        return super().backoff(min(attempt, 64))  # the exponent stays finite however long the outage


#: The service's subscription options: an event whose write fails is retried with backoff (up to 30 s
#: apart) until the store takes it. A store outage stalls the service; it never parks an event on
#: the dead-letter topic (only undecodable records go there), so no row misses an event.
DEFAULT_OPTIONS: ServiceOptions = _UntilStored(max_attempts=2**62, max_backoff=timedelta(seconds=30))


def default_group_id(settings: KafkaSettings) -> str:
    """``<prefix>.visibility``: instances with the same group share the partitions."""
    return f"{settings.topic_prefix}.visibility"


@dataclass
class VisibilityStats:
    #: Events applied (the row may have been newer already).
    applied: int = 0
    #: Transactions written.
    batches: int = 0
    #: Transactions that failed (their events are retried by the subscription).
    failures: int = 0
    largest_batch: int = 0


@dataclass
class _Pending:
    update: ExecutionUpdate
    topic: str
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class VisibilityService:
    """Materializes the events topic into `store`. `async with` it, or `await run()` until `stop()`.

    `store` is opened by `start()` and closed by `stop()` when this service opened it
    from a URL; a store object passed in stays open.
    """

    def __init__(self, store: VisibilityStore | str | None = None, *, settings: KafkaSettings | None = None,
                 bootstrap_servers: str | None = None, group_id: str | None = None,
                 options: ServiceOptions | None = None, max_batch: int = 2_000) -> None:
        self.settings = resolve_settings(bootstrap_servers, settings)
        self._owns_store = not isinstance(store, VisibilityStore)
        self.store = store if isinstance(store, VisibilityStore) else open_store(store)
        self.group_id = group_id or default_group_id(self.settings)
        self.max_batch = max_batch
        self.stats = VisibilityStats()
        self.subscription: ServiceSubscription = subscribe(self._handle, group_id=self.group_id,
                                                           settings=self.settings,
                                                           options=options or DEFAULT_OPTIONS)
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the store, then join the group and apply events as they come (returns at once)."""
        await self.store.open()
        self._writer = asyncio.ensure_future(self._write())
        await self.subscription.start()

    async def wait_assigned(self, timeout: float = 30.0) -> None:
        await self.subscription.wait_assigned(timeout)

    async def stop(self) -> None:
        """Apply what was read (see `ServiceSubscription.stop`), commit, leave the group, close."""
        try:
            await self.subscription.stop()
        finally:
            if self._writer is not None:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
            if self._owns_store:
                await self.store.close()

    async def run(self) -> None:
        """Start, then apply events until `stop()` or cancellation."""
        await self.store.open()
        self._writer = asyncio.ensure_future(self._write())
        try:
            await self.subscription.run()
        finally:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            if self._owns_store:
                await self.store.close()

    async def __aenter__(self) -> VisibilityService:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def freshness(self) -> Freshness:
        return await freshness(self.store, self.settings)

    async def _handle(self, event: TreeEvent[Any]) -> None:
        position = event.position
        pending = _Pending(ExecutionUpdate.of(event, position.partition, position.offset),  # type: ignore[arg-type]
                           self.settings.topics.events)
        self._pending.append(pending)
        self._wake.set()
        await pending.done

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                positions: dict[tuple[str, int], int] = {}
                for item in batch:
                    key = (item.topic, item.update.partition)
                    positions[key] = max(positions.get(key, 0), item.update.offset + 1)
                try:
                    # A schedule's events move the position only: a schedule is not an execution
                    # (its runs are rows like any execution's).
                    await self.store.apply([item.update for item in batch
                                            if item.update.last_event_type not in _SCHEDULE_TYPES], positions)
                except asyncio.CancelledError:
                    for item in batch:
                        item.done.cancel()
                    raise
                except Exception as error:  # the subscription retries each event with backoff
                    self.stats.failures += 1
                    log.warning("visibility store write of %d update(s) failed: %r", len(batch), error)
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(error)
                    continue
                self.stats.batches += 1
                self.stats.applied += len(batch)
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
                for item in batch:
                    if not item.done.done():
                        item.done.set_result(None)


_SCHEDULE_TYPES = frozenset(t.value for t in SCHEDULE_EVENTS)


async def freshness(store: VisibilityStore, settings: KafkaSettings, *, ask_kafka: bool = True,
                    timeout: float = 10.0) -> Freshness:
    """How far behind the events topic `store` is: its applied offsets against the true end of
    each partition (`treeflow.kafka.end_offsets`). Kafka unreachable: `lag` is None."""
    from aiokafka import TopicPartition

    topic = settings.topics.events
    applied, applied_at = await store.positions(topic)
    end: dict[int, int] | None = None
    if ask_kafka:
        try:
            async with asyncio.timeout(timeout):
                ends = await end_offsets(settings, [TopicPartition(topic, p) for p in range(settings.partitions)])
            end = {tp.partition: offset for tp, offset in ends.items()}
        except Exception as error:  # noqa: BLE001 - freshness is reported as unknown, the answer still stands
            log.info("cannot read the end of %s for the visibility lag: %r", topic, error)
    return Freshness(applied=applied, end=end, applied_at=applied_at)
