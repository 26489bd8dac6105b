"""The PostgreSQL backend: psycopg 3 (the ``postgres`` extra), one async connection.

Several visibility service instances may share one database: each applies the
partitions the consumer group gave it, and the conditional upsert keeps a row from
going back in time during a rebalance.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

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

try:
    import psycopg
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise VisibilityError("a postgresql:// visibility store needs psycopg: pip install 'treeflow[postgres]'") \
        from error

OFFSET_UPSERT = """
INSERT INTO tf_visibility_offsets (topic, partition_id, next_offset, applied_at)
VALUES (:topic, :partition_id, :next_offset, :applied_at)
ON CONFLICT (topic, partition_id) DO UPDATE SET
    next_offset = GREATEST(tf_visibility_offsets.next_offset, excluded.next_offset),
    applied_at = excluded.applied_at
"""

_NAMED = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


def pyformat(sql: str) -> str:
    """``:name`` parameters as psycopg's ``%(name)s``."""
    return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))


_UPSERT = pyformat(UPSERT)
_OFFSET_UPSERT = pyformat(OFFSET_UPSERT)
_GET = pyformat(GET_SQL)
_POSITIONS = pyformat(POSITIONS_SQL)


class PostgresStore(VisibilityStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if self._connection is not None:
            return
        try:
            self._connection = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            async with self._connection.transaction():
                # One creator at a time: CREATE ... IF NOT EXISTS races between instances otherwise.
                await self._connection.execute("SELECT pg_advisory_xact_lock(7407001)")
                for statement in SCHEMA:
                    await self._connection.execute(statement)  # type: ignore[arg-type]
        except psycopg.Error as error:
            raise VisibilityError(f"cannot open the visibility store {_redacted(self.url)}: "
                                  f"{str(error).strip().splitlines()[0]}") from error

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            async with self._lock:
                await connection.close()

    async def _conn(self) -> psycopg.AsyncConnection[Any]:
        if self._connection is not None and (self._connection.closed or self._connection.broken):
            # The server went away (restart, failover): connect again; the caller's retry goes on.
            self._connection = None
        if self._connection is None:
            await self.open()
        assert self._connection is not None
        return self._connection

    async def apply(self, updates: Sequence[ExecutionUpdate], positions: Mapping[tuple[str, int], int]) -> None:
        now = int(time.time() * 1000)
        connection = await self._conn()
        async with self._lock, connection.transaction(), connection.cursor() as cursor:
            if updates:
                await cursor.executemany(_UPSERT, [update_params(u) for u in updates])  # type: ignore[arg-type]
            if positions:
                await cursor.executemany(_OFFSET_UPSERT, [  # type: ignore[arg-type]
                    dict(topic=topic, partition_id=partition, next_offset=offset, applied_at=now)
                    for (topic, partition), offset in positions.items()])

    async def _select(self, sql: str, params: dict[str, Any]) -> list[Any]:
        connection = await self._conn()
        async with self._lock:
            cursor = await connection.execute(sql, params)  # type: ignore[arg-type]
            return await cursor.fetchall()

    async def list(self, query: ExecutionQuery) -> list[ExecutionRecord]:
        sql, params = list_sql(query)
        return [record_of(row) for row in await self._select(pyformat(sql), params)]

    async def count(self, query: ExecutionQuery) -> int:
        sql, params = count_sql(query)
        return int((await self._select(pyformat(sql), params))[0][0])

    async def get(self, execution_id: str) -> ExecutionRecord | None:
        rows = await self._select(_GET, {"execution_id": execution_id})
        return record_of(rows[0]) if rows else None

    async def positions(self, topic: str) -> tuple[dict[int, int], datetime | None]:
        rows = await self._select(_POSITIONS, {"topic": topic})
        return {int(p): int(o) for p, o, _ in rows}, from_millis(max((at for *_, at in rows), default=None))


def _redacted(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
