"""The visibility store on SQLite (a file), its queries and its parts that need no broker."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from treeflow.consumers.visibility import ExecutionQuery, Freshness, QueryError, VisibilityError, open_store, parse_since
from treeflow.consumers.visibility.sqlite import SqliteStore, sqlite_path
from tests.visibility_contract import check_backend


async def test_the_sqlite_backend_keeps_the_contract(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/v.db") as store:
        assert isinstance(store, SqliteStore)
        await check_backend(store)
    # The rows are in the file: another store on it reads them.
    async with open_store(str(tmp_path / "v.db")) as again:
        assert await again.count(ExecutionQuery()) == 3


def test_store_urls() -> None:
    assert sqlite_path("sqlite:///rel/v.db") == "rel/v.db"
    assert sqlite_path("sqlite:////abs/v.db") == "/abs/v.db"
    assert sqlite_path("/abs/v.db") == "/abs/v.db"
    with pytest.raises(VisibilityError, match="sqlite:// or postgresql://"):
        open_store("mysql://x")


def test_no_url_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TREEFLOW_VISIBILITY_URL", raising=False)
    with pytest.raises(VisibilityError, match="TREEFLOW_VISIBILITY_URL"):
        open_store()


async def test_a_store_in_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VisibilityError, match="is not a folder"):
        await open_store(f"sqlite:///{tmp_path}/missing/v.db").open()


def test_query_filters_are_checked() -> None:
    assert ExecutionQuery.of(status="open,Completed").statuses == ("CONTINUED_AS_NEW", "RUNNING", "COMPLETED")
    with pytest.raises(QueryError, match="unknown status 'DONE'"):
        ExecutionQuery.of(status="done")
    with pytest.raises(QueryError, match="limit=0"):
        ExecutionQuery.of(limit=0)
    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    assert parse_since("15m", now) == now - timedelta(minutes=15)
    assert parse_since("1d", now) == now - timedelta(days=1)
    assert parse_since("2026-01-01T10:00:00", now) == datetime(2026, 1, 1, 10, tzinfo=timezone.utc)
    assert parse_since("2026-01-01T10:00:00+01:00", now) == datetime(2026, 1, 1, 9, tzinfo=timezone.utc)
    with pytest.raises(QueryError, match="ISO 8601"):
        parse_since("yesterday", now)


def test_freshness_counts_what_is_not_applied() -> None:
    fresh = Freshness(applied={0: 10, 1: 4}, end={0: 10, 1: 7, 2: 2}, applied_at=None)
    assert fresh.lag == 5 and fresh.lag_by_partition() == {0: 0, 1: 3, 2: 2}
    assert "5 event(s)" in fresh.describe()
    assert Freshness(applied={}, end=None, applied_at=None).lag is None
