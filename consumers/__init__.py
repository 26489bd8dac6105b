"""The consumer library: follow treeflow's event stream from a service. Never imports faust.

- `subscribe_tree`: one workflow tree (a root and every descendant) as one
  ordered stream, from its start, from a cursor, or live; optionally until it closed.
- `subscribe`: every tree, through a consumer group, with a handler per event:
  ordered per tree, parallel across trees, retried, dead-lettered.
- `EventReader`: the events topic, partition by partition, without a group.

The HTTP gateway (`treeflow.consumers.gateway`) and the CLI (`treeflow serve`,
`treeflow tail`) are built on these and need the `serve` extra.
"""

from .cursor import Cursor, CursorError, cursor_before
from .events import TREE_EVENT_MODELS, TreeEvent
from .filters import EventFilter
from .lookup import find_root
from .reader import ConsumedEvent, EventReader, ReaderStats
from .service import Handler, ServiceOptions, ServiceStats, ServiceSubscription, dead_letter_topic_name, subscribe
from .subscription import TreeStats, TreeSubscription, subscribe_tree
from .tree import ExecutionNode, TreeTracker

__all__ = [
    "TREE_EVENT_MODELS", "ConsumedEvent", "Cursor", "CursorError", "EventFilter", "EventReader", "ExecutionNode",
    "Handler", "ReaderStats", "ServiceOptions", "ServiceStats", "ServiceSubscription", "TreeEvent", "TreeStats",
    "TreeSubscription", "TreeTracker", "cursor_before", "dead_letter_topic_name", "find_root", "subscribe",
    "subscribe_tree",
]
