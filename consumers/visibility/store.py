"""The visibility store's interface, and the SQL both backends share.

A backend keeps two tables: ``tf_executions`` (one row per execution) and
``tf_visibility_offsets`` (per events-topic partition, the offset after the last
event applied, and when). `apply` writes a batch of updates and the offsets they
reach in one transaction; an update changes a row only when its event is newer
than the row's last event (its sequence is higher), so applying an event twice, or
an older one after a newer, changes nothing. One exception: an event with sequence 1
from later in the log than the row's last event starts the row over (an execution
id used again after the processor forgot the first execution).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

from .model import ExecutionQuery, ExecutionRecord, ExecutionUpdate, VisibilityError

#: Where clients, the CLI, the gateway and the visibility service find the store.
VISIBILITY_URL_ENV = "TREEFLOW_VISIBILITY_URL"

COLUMNS = ("execution_id", "run_id", "workflow_name", "status", "parent_execution_id", "root_execution_id",
           "task_queue", "start_time", "close_time", "close_reason", "failure_json", "attempt", "last_sequence",
           "last_event_type", "last_event_time", "partition_id", "event_offset")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS tf_executions (
        execution_id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        workflow_name TEXT NOT NULL,
        status TEXT NOT NULL,
        parent_execution_id TEXT,
        root_execution_id TEXT NOT NULL,
        task_queue TEXT NOT NULL,
        start_time BIGINT NOT NULL,
        close_time BIGINT,
        close_reason TEXT,
        failure_json TEXT,
        attempt INTEGER NOT NULL,
        last_sequence BIGINT NOT NULL,
        last_event_type TEXT NOT NULL,
        last_event_time BIGINT NOT NULL,
        partition_id INTEGER NOT NULL,
        event_offset BIGINT NOT NULL)""",
    # Each filter's index ends with the list order (start_time, execution_id): a filtered,
    # limited list reads the index backwards and stops, sorting nothing.
    "CREATE INDEX IF NOT EXISTS tf_executions_status ON tf_executions (status, start_time, execution_id)",
    "CREATE INDEX IF NOT EXISTS tf_executions_name ON tf_executions (workflow_name, start_time, execution_id)",
    "CREATE INDEX IF NOT EXISTS tf_executions_root ON tf_executions (root_execution_id, start_time, execution_id)",
    "CREATE INDEX IF NOT EXISTS tf_executions_parent ON tf_executions (parent_execution_id, start_time, "
    "execution_id)",
    "CREATE INDEX IF NOT EXISTS tf_executions_start ON tf_executions (start_time, execution_id)",
    "CREATE INDEX IF NOT EXISTS tf_executions_close ON tf_executions (close_time)",
    """CREATE TABLE IF NOT EXISTS tf_visibility_offsets (
        topic TEXT NOT NULL,
        partition_id INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        applied_at BIGINT NOT NULL,
        PRIMARY KEY (topic, partition_id))""",
]

# Named parameters (:name); the PostgreSQL backend rewrites them to its own style. A parameter
# outside VALUES is CAST, as PostgreSQL cannot infer the type of a bare NULL parameter there.
UPSERT = """
INSERT INTO tf_executions (execution_id, run_id, workflow_name, status, parent_execution_id, root_execution_id,
    task_queue, start_time, close_time, close_reason, failure_json, attempt, last_sequence, last_event_type,
    last_event_time, partition_id, event_offset)
VALUES (:execution_id, :run_id, :workflow_name, COALESCE(CAST(:status AS TEXT), 'RUNNING'),
    :parent_execution_id, :root_execution_id, :task_queue, COALESCE(:start_time, :last_event_time), :close_time, :close_reason, :failure_json,
    COALESCE(CAST(:attempt AS INTEGER), 1), :last_sequence, :last_event_type, :last_event_time, :partition_id,
    :event_offset)
ON CONFLICT (execution_id) DO UPDATE SET
    run_id = excluded.run_id,
    workflow_name = excluded.workflow_name,
    status = COALESCE(CAST(:status AS TEXT), tf_executions.status),
    parent_execution_id = excluded.parent_execution_id,
    root_execution_id = excluded.root_execution_id,
    task_queue = excluded.task_queue,
    start_time = CASE WHEN CAST(:fresh_start AS INTEGER) = 1 THEN excluded.start_time
                      ELSE tf_executions.start_time END,
    close_time = CASE WHEN CAST(:status AS TEXT) IS NULL THEN tf_executions.close_time ELSE excluded.close_time END,
    close_reason = CASE WHEN CAST(:status AS TEXT) IS NULL THEN tf_executions.close_reason
                        ELSE excluded.close_reason END,
    failure_json = CASE WHEN CAST(:status AS TEXT) IS NULL THEN tf_executions.failure_json
                        ELSE excluded.failure_json END,
    attempt = COALESCE(CAST(:attempt AS INTEGER), tf_executions.attempt),
    last_sequence = excluded.last_sequence,
    last_event_type = excluded.last_event_type,
    last_event_time = excluded.last_event_time,
    partition_id = excluded.partition_id,
    event_offset = excluded.event_offset
WHERE excluded.last_sequence > tf_executions.last_sequence
   OR (excluded.last_sequence = 1 AND excluded.partition_id = tf_executions.partition_id
       AND excluded.event_offset > tf_executions.event_offset)
"""


def to_millis(value: datetime | None) -> int | None:
    if value is None:
        return None
    return int((value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp() * 1000)


def from_millis(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1000, timezone.utc)


def update_params(update: ExecutionUpdate) -> dict[str, Any]:
    return dict(
        execution_id=update.execution_id, run_id=update.run_id, workflow_name=update.workflow_name,
        status=update.status, parent_execution_id=update.parent_execution_id,
        root_execution_id=update.root_execution_id, task_queue=update.task_queue,
        start_time=to_millis(update.start_time), fresh_start=1 if update.fresh_start else 0,
        close_time=to_millis(update.close_time), close_reason=update.close_reason, failure_json=update.failure_json,
        attempt=update.attempt, last_sequence=update.last_sequence, last_event_type=update.last_event_type,
        last_event_time=to_millis(update.last_event_time), partition_id=update.partition, event_offset=update.offset)


def record_of(row: Sequence[Any]) -> ExecutionRecord:
    values = dict(zip(COLUMNS, row))
    return ExecutionRecord(
        execution_id=values["execution_id"], run_id=values["run_id"], workflow_name=values["workflow_name"],
        status=values["status"], parent_execution_id=values["parent_execution_id"],
        root_execution_id=values["root_execution_id"], task_queue=values["task_queue"],
        start_time=from_millis(values["start_time"]),  # type: ignore[arg-type]
        close_time=from_millis(values["close_time"]),
        close_reason=values["close_reason"], failure_json=values["failure_json"], attempt=values["attempt"],
        last_sequence=values["last_sequence"], last_event_type=values["last_event_type"],
        last_event_time=from_millis(values["last_event_time"]),  # type: ignore[arg-type]
        partition=values["partition_id"], offset=values["event_offset"])


def where(query: ExecutionQuery) -> tuple[str, dict[str, Any]]:
    """The WHERE clause (or "") and its named parameters for the query's filters."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if query.statuses:
        names = [f"status_{i}" for i in range(len(query.statuses))]
        clauses.append(f"status IN ({', '.join(':' + n for n in names)})")
        params.update(zip(names, query.statuses))
    for column, value in (("workflow_name", query.workflow_name), ("root_execution_id", query.root_execution_id),
                          ("parent_execution_id", query.parent_execution_id)):
        if value is not None:
            clauses.append(f"{column} = :{column}")
            params[column] = value
    if query.since is not None:
        clauses.append("start_time >= :since")
        params["since"] = to_millis(query.since)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def list_sql(query: ExecutionQuery) -> tuple[str, dict[str, Any]]:
    clause, params = where(query)
    params["limit"] = query.limit
    return (f"SELECT {', '.join(COLUMNS)} FROM tf_executions{clause} "
            "ORDER BY start_time DESC, execution_id DESC LIMIT :limit", params)


def count_sql(query: ExecutionQuery) -> tuple[str, dict[str, Any]]:
    clause, params = where(query)
    return f"SELECT COUNT(*) FROM tf_executions{clause}", params


GET_SQL = f"SELECT {', '.join(COLUMNS)} FROM tf_executions WHERE execution_id = :execution_id"
POSITIONS_SQL = "SELECT partition_id, next_offset, applied_at FROM tf_visibility_offsets WHERE topic = :topic"


class VisibilityStore(ABC):
    """Where the visibility service writes and clients read; one per database.

    Use ``async with open_store(url) as store`` (or `open()` / `close()`). Every call is
    safe to make from several tasks at once.
    """

    url: str

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the tables and indexes that are missing."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def apply(self, updates: Sequence[ExecutionUpdate], positions: Mapping[tuple[str, int], int]) -> None:
        """In one transaction: apply each update whose event is newer than its row, and raise
        the recorded position of each (topic, partition) to the offset given (never lower it)."""

    @abstractmethod
    async def list(self, query: ExecutionQuery) -> list[ExecutionRecord]:
        """Rows matching the query, newest start first, at most `query.limit`."""

    @abstractmethod
    async def count(self, query: ExecutionQuery) -> int:
        """How many rows match the query's filters."""

    @abstractmethod
    async def get(self, execution_id: str) -> ExecutionRecord | None: ...

    @abstractmethod
    async def positions(self, topic: str) -> tuple[dict[int, int], datetime | None]:
        """Per partition of `topic`, the offset after the last event applied; and when the last was."""

    async def __aenter__(self) -> VisibilityStore:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def visibility_url(url: str | None = None) -> str:
    """The URL given, else ``$TREEFLOW_VISIBILITY_URL``; raises `VisibilityError` when neither is set."""
    found = url or os.environ.get(VISIBILITY_URL_ENV)
    if not found:
        raise VisibilityError(f"no visibility store: pass --database URL or set {VISIBILITY_URL_ENV} "
                              "(sqlite:///path/to/file.db or postgresql://user@host/db); `treeflow dev` and "
                              "treeflow.testing.Environment set it for you")
    return found


def open_store(url: str | None = None) -> VisibilityStore:
    """The store at `url` (default ``$TREEFLOW_VISIBILITY_URL``), not opened yet.

    ``sqlite:///relative.db``, ``sqlite:////absolute/path.db`` or a plain file path: SQLite;
    ``postgresql://...`` (or ``postgres://``): PostgreSQL (needs the ``postgres`` extra).
    """
    url = visibility_url(url)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return PostgresStore(url)
    if scheme in ("sqlite", "", "file") or (len(scheme) == 1 and os.name == "nt"):
        from .sqlite import SqliteStore

        return SqliteStore(url)
    raise VisibilityError(f"visibility store URL {url!r}: the scheme must be sqlite:// or postgresql://")
