"""The SQLite backend (the embedded default): one file, stdlib `sqlite3` in a worker thread.

The file is in WAL mode, so readers in other processes (`treeflow list`) read while
the visibility service writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from .model import ExecutionQuery, ExecutionRecord, ExecutionUpdate, VisibilityError
from .store import (
    GET_SQL,
    POSITIONS_SQL,
    SCHEMA,
    UPSERT,
    VisibilityStore,
    count_sql,
    from_millis,
    list_sql,
    record_of,
    update_params,
)

T = TypeVar("T")

OFFSET_UPSERT = """
INSERT INTO tf_visibility_offsets (topic, partition_id, next_offset, applied_at)
VALUES (:topic, :partition_id, :next_offset, :applied_at)
ON CONFLICT (topic, partition_id) DO UPDATE SET
    next_offset = MAX(tf_visibility_offsets.next_offset, excluded.next_offset),
    applied_at = excluded.applied_at
"""


def sqlite_path(url: str) -> str:
    """The file of ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or a plain path."""
    parsed = urlparse(url)
    if parsed.scheme.lower() not in ("sqlite", "file"):
        return url
    path = unquote(parsed.path)
    # SQLAlchemy's convention: sqlite:///x.db is the relative x.db, sqlite:////tmp/x.db the absolute /tmp/x.db.
    return path[1:] if path.startswith("/") else path


class SqliteStore(VisibilityStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self._connection: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if self._connection is not None:
            return
        if self.path != ":memory:":
            parent = Path(self.path).parent
            if not parent.is_dir():
                raise VisibilityError(f"cannot open the visibility store {self.url}: {parent} is not a folder")

        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("BEGIN")
            for statement in SCHEMA:
                connection.execute(statement)
            connection.execute("COMMIT")
            return connection

        try:
            self._connection = await asyncio.to_thread(connect)
        except sqlite3.Error as error:
            raise VisibilityError(f"cannot open the visibility store {self.url}: {error}") from error

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            async with self._lock:
                await asyncio.to_thread(connection.close)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._connection is None:
            await self.open()
        connection = self._connection
        assert connection is not None
        async with self._lock:
            return await asyncio.to_thread(work, connection)

    async def apply(self, updates: Sequence[ExecutionUpdate], positions: Mapping[tuple[str, int], int]) -> None:
        now = int(time.time() * 1000)

        def write(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(UPSERT, [update_params(u) for u in updates])
                connection.executemany(OFFSET_UPSERT, [
                    dict(topic=topic, partition_id=partition, next_offset=offset, applied_at=now)
                    for (topic, partition), offset in positions.items()])
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise

        await self._run(write)

    async def _select(self, sql: str, params: dict[str, Any]) -> list[Any]:
        return await self._run(lambda connection: connection.execute(sql, params).fetchall())

    async def list(self, query: ExecutionQuery) -> list[ExecutionRecord]:
        return [record_of(row) for row in await self._select(*list_sql(query))]

    async def count(self, query: ExecutionQuery) -> int:
        return int((await self._select(*count_sql(query)))[0][0])

    async def get(self, execution_id: str) -> ExecutionRecord | None:
        rows = await self._select(GET_SQL, {"execution_id": execution_id})
        return record_of(rows[0]) if rows else None

    async def positions(self, topic: str) -> tuple[dict[int, int], datetime | None]:
        rows = await self._select(POSITIONS_SQL, {"topic": topic})
        return {int(p): int(o) for p, o, _ in rows}, from_millis(max((at for *_, at in rows), default=None))
