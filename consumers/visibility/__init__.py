"""Visibility: every execution as a row of a database, kept from the events topic; list and count them.

- `VisibilityService`: the consumer-group service that keeps the store (``treeflow visibility``).
- `open_store(url)`: a `VisibilityStore` on SQLite (``sqlite:///file.db``, the embedded default)
  or PostgreSQL (``postgresql://...``, the ``postgres`` extra); ``$TREEFLOW_VISIBILITY_URL`` by default.
- `ExecutionQuery` / `ExecutionRecord`: the filters and the rows; `Freshness`: how far behind the
  events topic the answers are (`freshness(store, settings)`).
"""

from .model import (
    OPEN_STATUSES,
    STATUSES,
    ExecutionQuery,
    ExecutionRecord,
    ExecutionUpdate,
    Freshness,
    QueryError,
    VisibilityError,
    parse_since,
)
from .service import VisibilityService, VisibilityStats, default_group_id, freshness
from .store import VISIBILITY_URL_ENV, VisibilityStore, open_store, visibility_url

__all__ = [
    "OPEN_STATUSES", "STATUSES", "VISIBILITY_URL_ENV", "ExecutionQuery", "ExecutionRecord", "ExecutionUpdate",
    "Freshness", "QueryError", "VisibilityError", "VisibilityService", "VisibilityStats", "VisibilityStore",
    "default_group_id", "freshness", "open_store", "parse_since", "visibility_url",
]
