"""The consumer library: read treeflow's event stream from a service. Never imports faust."""

from .reader import ConsumedEvent, EventReader, ReaderStats

__all__ = ["ConsumedEvent", "EventReader", "ReaderStats"]
