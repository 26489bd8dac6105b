"""Follow one workflow tree: its root and every descendant, as one ordered stream.

Every record of a tree is keyed by its root id, so the whole tree sits in the one
partition that Kafka's partitioner picks for that id. A tree subscription reads
that partition alone (assigned by hand, no consumer group), skips other trees'
records before decoding them, and yields the tree's events in log order.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import aclosing
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiokafka import TopicPartition

from treeflow.kafka import KafkaSettings, end_offsets, partition_for
from .cursor import Cursor, CursorError
from .events import TreeEvent
from .filters import EventFilter, EventTypes
from .reader import ConsumedEvent, EventReader, ReaderStats, partition_count, resolve_settings
from .tree import TreeTracker

log = logging.getLogger(__name__)

#: Event ids remembered to drop a record delivered twice (about 100 bytes each).
DEFAULT_DEDUPE_WINDOW = 100_000


@dataclass
class TreeStats:
    """What a tree subscription read and yielded."""

    #: The events topic's partition that holds the tree (set once the subscription started).
    partition: int | None = None
    yielded: int = 0
    #: Events of the tree not yielded because a filter rejected them (or they precede the start).
    filtered: int = 0
    #: Records with an event id already seen, dropped.
    duplicates: int = 0
    readers: list[ReaderStats] = field(default_factory=list, repr=False)

    @property
    def undecodable(self) -> int:
        """Records of the tree's partition that could not be decoded (logged and skipped)."""
        return sum(reader.undecodable for reader in self.readers)

    @property
    def fetched_records(self) -> int:
        """Records received from the broker, all of them from `partition`."""
        return sum(reader.fetched_records for reader in self.readers)

    @property
    def fetched_bytes(self) -> int:
        """Key and value bytes of the records received from the broker."""
        return sum(reader.fetched_bytes for reader in self.readers)


class TreeSubscription:
    """An async iterator of one tree's `TreeEvent`s; see `subscribe_tree` for what it guarantees.

    Use it in ``async for``; leaving the loop early should close it (``await
    subscription.aclose()`` or ``async with``), which stops its Kafka client.
    `tree` is the state of the tree's executions as read so far; `stats` counts
    what was read. `track_tree=True` reads the tree's history before the start
    position (without yielding it) so that `tree` is complete from the first event;
    `until_closed=True` implies it.
    """

    def __init__(self, root_workflow_exec_id: str, *, settings: KafkaSettings, cursor: Cursor | str | int | None = None,
                 from_beginning: bool = True, event_filter: EventFilter | None = None, until_closed: bool = False,
                 track_tree: bool = False, dedupe_window: int = DEFAULT_DEDUPE_WINDOW) -> None:
        self.root_workflow_exec_id = root_workflow_exec_id
        self.settings = settings
        self.cursor = None if cursor is None else Cursor.parse(cursor)
        self.from_beginning = from_beginning
        self.filter = event_filter or EventFilter()
        self.until_closed = until_closed
        self.track_tree = track_tree or until_closed
        self.dedupe_window = dedupe_window
        self.tree = TreeTracker(root_workflow_exec_id)
        self.stats = TreeStats()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._events: AsyncIterator[TreeEvent[Any]] | None = None
        self._start: int | None = None

    def __aiter__(self) -> TreeSubscription:
        return self

    async def __anext__(self) -> TreeEvent[Any]:
        if self._events is None:
            await self.start()
            self._events = self._stream()
        return await self._events.__anext__()

    async def start(self) -> None:
        """Find the tree's partition and where to start; the first iteration does it too.

        A live subscription (`from_beginning=False`) yields every event appended after
        `start()` returned. Raises `CursorError` for a cursor of another tree or past the end.
        """
        if self._start is None:
            partition = partition_for(self.root_workflow_exec_id, await partition_count(self.settings))
            self._start = await self._start_offset(partition)
            self.stats.partition = partition

    async def aclose(self) -> None:
        """Stop reading: closes the Kafka client. Safe to call more than once."""
        if self._events is not None:
            await self._events.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> TreeSubscription:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _stream(self) -> AsyncIterator[TreeEvent[Any]]:
        root = self.root_workflow_exec_id
        partition, start = self.stats.partition, self._start
        assert partition is not None and start is not None
        if self.track_tree and start > 0:
            history = EventReader(self.settings, [partition], key=root, stop_offsets={partition: start})
            self.stats.readers.append(history.stats)
            async with aclosing(history.__aiter__()) as items:
                async for item in items:
                    if item.event.workflow_context.root_workflow_exec_id == root and self._take(item):
                        self.stats.filtered += 1  # before the start: known, not yielded
            if self.until_closed and self.tree.closed:
                return
        reader = EventReader(self.settings, [partition], key=root, follow=True, start_offsets={partition: start})
        self.stats.readers.append(reader.stats)
        async with aclosing(reader.__aiter__()) as items:
            async for item in items:
                event = item.event
                if event.workflow_context.root_workflow_exec_id != root:
                    continue  # a record without a key, of another tree
                if self._take(item):
                    self.stats.yielded += 1
                    yield TreeEvent.of(event, Cursor(item.partition, item.offset))
                if self.until_closed and self.tree.closed:
                    return

    def _take(self, item: ConsumedEvent) -> bool:
        """Record an event of the tree; True when it is new and passes the filter."""
        event = item.event
        if event.event_id in self._seen:
            self.stats.duplicates += 1
            log.warning("dropped a second delivery of event %s (at %s[%d]@%d)", event.event_id,
                        self.settings.topics.events, item.partition, item.offset)
            return False
        self._seen[event.event_id] = None
        if len(self._seen) > self.dedupe_window:
            self._seen.popitem(last=False)
        if self.track_tree:
            self.tree.observe(event)
        if not self.filter.matches(event):
            self.stats.filtered += 1
            return False
        return True

    async def _start_offset(self, partition: int) -> int:
        """The first offset to yield from."""
        if self.cursor is None and self.from_beginning:
            return 0
        tp = TopicPartition(self.settings.topics.events, partition)
        # The true end: on Tansu, ListOffsets can be too low (the profile says so and
        # `end_offsets` then reads the fetch high watermark instead).
        end = (await end_offsets(self.settings, [tp]))[tp]
        if self.cursor is None:
            return end
        if self.cursor.partition != partition:
            raise CursorError(f"cursor {self.cursor} is a position in partition {self.cursor.partition}, but the "
                              f"tree of {self.root_workflow_exec_id} is in partition {partition}: it belongs to "
                              "another tree")
        if self.cursor.offset >= end:
            raise CursorError(f"cursor {self.cursor} is past the end of partition {partition} (next offset {end}): "
                              "it comes from another topic, or from a broker that lost its data")
        return self.cursor.offset + 1


def subscribe_tree(root_workflow_exec_id: str, *, bootstrap_servers: str | None = None,
                   cursor: Cursor | str | int | None = None, from_beginning: bool = True,
                   event_types: EventTypes = None, workflow_names: str | Iterable[str] | None = None,
                   until_closed: bool = False, settings: KafkaSettings | None = None) -> TreeSubscription:
    """Subscribe to a workflow tree: its root and every descendant, abandoned ones included.

    Guarantees:

    - Reads only the partition of the events topic that holds the root (computed
      with Kafka's partitioner from the root id and the topic's partition count),
      with no consumer group; other trees' records in it are skipped undecoded.
    - Yields the tree's events in log order (a parent's child-started after the
      child's started, and so on), each as a typed `TreeEvent` carrying a `cursor`.
    - Where it starts: after `cursor` when one is given (**exclusive**: the event
      that carried it is not yielded again); else from the tree's first event
      (`from_beginning=True`, the default), or live: only events appended after
      ``await subscription.start()`` returned (the first iteration starts it too;
      `from_beginning=False`; the true end of the partition is looked up, also on
      brokers whose ListOffsets answers too low).
      A cursor of another partition, or past the partition's end, raises `CursorError`.
    - An event id is yielded at most once (duplicate deliveries are dropped, within a
      window of the last 100,000 ids); a record that cannot be decoded is logged,
      counted in `stats.undecodable` and skipped.
    - `event_types` / `workflow_names` keep only matching events (names or
      `EventType` members; any of them matches).
    - `until_closed=True` ends the iteration right after the event that leaves the
      root and every descendant closed (WORKFLOW_EXECUTION_CONTINUED_AS_NEW does
      not close an execution; its next run follows). When the stream starts later
      than the tree's first event, the earlier events are read, not yielded, to
      know which executions are open. A tree closed before a live start ends at once.
    - Memory is bounded: the client's fetch buffers, the dedupe window and one small
      record per execution of the tree, whatever the size of the topic.

    `bootstrap_servers` defaults to `TREEFLOW_BOOTSTRAP_SERVERS`; pass `settings`
    for another topic prefix.
    """
    return TreeSubscription(
        root_workflow_exec_id, settings=resolve_settings(bootstrap_servers, settings), cursor=cursor,
        from_beginning=from_beginning, event_filter=EventFilter.of(event_types=event_types,
                                                                   workflow_names=workflow_names),
        until_closed=until_closed)

