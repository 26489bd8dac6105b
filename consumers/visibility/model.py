"""What the visibility store holds and answers: one row per execution, the filters of a query,
and how fresh the answers are. Pure: no database, no Kafka."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from treeflow.errors import TreeflowError
from treeflow.schemas import CLOSING_STATUS, Event, EventType

RUNNING = "RUNNING"
#: Every status a row can have. CONTINUED_AS_NEW is passing: the next run's start follows it.
STATUSES = ("RUNNING", "COMPLETED", "FAILED", "CANCELED", "TERMINATED", "TIMED_OUT", "CONTINUED_AS_NEW")
#: Statuses of an execution that has not closed for good.
OPEN_STATUSES = frozenset({"RUNNING", "CONTINUED_AS_NEW"})


class VisibilityError(TreeflowError):
    """The visibility store is not configured, cannot be opened, or was asked something malformed."""

    exit_code = 3


class QueryError(VisibilityError, ValueError):
    """A filter of a visibility query is malformed."""

    exit_code = 2


@dataclass(frozen=True)
class ExecutionRecord:
    """One execution as the visibility store knows it (from its own events)."""

    execution_id: str
    run_id: str
    workflow_name: str
    status: str
    parent_execution_id: str | None
    root_execution_id: str
    task_queue: str
    #: When the execution's first run started (or, if its start was never read, e.g. by a service that
    #: began at the end of the topic, the time of the first event the store got).
    start_time: datetime
    #: When it closed (status not RUNNING); None while it runs.
    close_time: datetime | None
    #: Why it closed, on one line: the failure ("Type: message"), the terminate reason, the timeout.
    close_reason: str | None
    #: The Failure record as JSON, for FAILED (and a retried run's CONTINUED_AS_NEW).
    failure_json: str | None
    #: The attempt of the current run (retried executions count up from 1).
    attempt: int
    #: The sequence of the last event applied: the row is as of this event of the execution's history.
    last_sequence: int
    last_event_type: str
    last_event_time: datetime
    #: Where that event is in the events topic.
    partition: int
    offset: int

    @property
    def open(self) -> bool:
        return self.status in OPEN_STATUSES

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict, times as ISO 8601."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
        return out


@dataclass(frozen=True)
class ExecutionUpdate:
    """What one event changes in its execution's row. Applied only when newer than the row
    (`last_sequence`), so a redelivered event changes nothing."""

    execution_id: str
    run_id: str
    workflow_name: str
    parent_execution_id: str | None
    root_execution_id: str
    task_queue: str
    last_sequence: int
    last_event_type: str
    last_event_time: datetime
    partition: int
    offset: int
    #: None: the event leaves the status as it is.
    status: str | None = None
    #: Set by a WORKFLOW_EXECUTION_STARTED; `fresh_start` says it starts the execution (not a next run).
    start_time: datetime | None = None
    fresh_start: bool = False
    attempt: int | None = None
    close_time: datetime | None = None
    close_reason: str | None = None
    failure_json: str | None = None

    @classmethod
    def of(cls, event: Event, partition: int, offset: int) -> ExecutionUpdate:
        """The change `event`, read at `partition`/`offset` of the events topic, makes to its row."""
        context = event.workflow_context
        base: dict[str, Any] = dict(
            execution_id=context.workflow_exec_id, run_id=context.workflow_run_id,
            workflow_name=context.workflow_name, parent_execution_id=context.parent_workflow_exec_id,
            root_execution_id=context.root_workflow_exec_id, task_queue=context.task_queue,
            last_sequence=event.sequence, last_event_type=event.event_type.value,
            last_event_time=event.timestamp, partition=partition, offset=offset)
        payload = event.payload
        if event.event_type is EventType.WORKFLOW_EXECUTION_STARTED:
            continued = payload.continued_from_run_id is not None  # type: ignore[union-attr]
            # A retried run starts with continued_from_run_id unset but attempt > 1.
            fresh = not continued and (event.attempt or 1) == 1
            return cls(**base, status=RUNNING, start_time=event.timestamp, fresh_start=fresh,
                       attempt=event.attempt or 1)
        if event.event_type in CLOSING_STATUS:
            failure = getattr(payload, "failure", None)
            return cls(**base, status=CLOSING_STATUS[event.event_type], close_time=event.timestamp,
                       close_reason=_close_reason(event), failure_json=failure.model_dump_json() if failure else None)
        return cls(**base)


def _close_reason(event: Event) -> str | None:
    payload = event.payload
    failure = getattr(payload, "failure", None)
    if failure is not None:
        return f"{failure.type}: {failure.message}"
    if event.event_type is EventType.WORKFLOW_EXECUTION_TERMINATED:
        return payload.reason  # type: ignore[union-attr]
    if event.event_type is EventType.WORKFLOW_EXECUTION_TIMED_OUT:
        return f"execution timeout of {payload.execution_timeout_ms} ms reached"  # type: ignore[union-attr]
    if event.event_type is EventType.WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
        return f"continued as new in run {payload.new_workflow_run_id}"  # type: ignore[union-attr]
    return None


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str | datetime | timedelta | None, now: datetime | None = None) -> datetime | None:
    """A point in time from an ISO 8601 time (naive means UTC), a duration back from now
    (``90s``, ``15m``, ``2h``, ``1d``, ``1w``) or a `timedelta`."""
    if value is None or value == "":
        return None
    now = now or datetime.now(timezone.utc)
    if isinstance(value, timedelta):
        return now - value
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    match = _DURATION.match(value.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise QueryError(f"since={value!r}: give an ISO 8601 time (2026-12-01T13:00:00Z) or a duration back from "
                         "now (90s, 15m, 2h, 1d, 1w)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


#: The most rows one list answers.
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class ExecutionQuery:
    """Filters of `list` and `count`; every given one must hold (statuses: any of them)."""

    statuses: tuple[str, ...] = ()
    workflow_name: str | None = None
    root_execution_id: str | None = None
    parent_execution_id: str | None = None
    #: Executions started at or after this time.
    since: datetime | None = None
    #: Rows returned by `list`, newest start first (ignored by `count`).
    limit: int = 100

    @classmethod
    def of(cls, *, status: str | list[str] | tuple[str, ...] | None = None, workflow_name: str | None = None,
           root_execution_id: str | None = None, parent_execution_id: str | None = None,
           since: str | datetime | timedelta | None = None, limit: int | None = None) -> ExecutionQuery:
        """A query from loosely typed values (comma-separated or repeated statuses, case-insensitive,
        ``open`` for RUNNING and CONTINUED_AS_NEW, ``closed`` for the others); raises `QueryError`."""
        raw = [status] if isinstance(status, str) else list(status or [])
        statuses: list[str] = []
        for part in (p.strip().upper() for item in raw for p in item.split(",")):
            if not part:
                continue
            if part == "OPEN":
                statuses += sorted(OPEN_STATUSES)
            elif part == "CLOSED":
                statuses += [s for s in STATUSES if s not in OPEN_STATUSES]
            elif part in STATUSES:
                statuses.append(part)
            else:
                raise QueryError(f"unknown status {part!r}: one of {', '.join(STATUSES)}, open or closed")
        if limit is not None and not 1 <= limit <= MAX_LIMIT:
            raise QueryError(f"limit={limit}: between 1 and {MAX_LIMIT}")
        return cls(statuses=tuple(dict.fromkeys(statuses)), workflow_name=workflow_name or None,
                   root_execution_id=root_execution_id or None, parent_execution_id=parent_execution_id or None,
                   since=parse_since(since), limit=limit or 100)


@dataclass(frozen=True)
class Freshness:
    """How far behind the events topic the store's answers are."""

    #: Per partition: the offset after the last event the store applied (0: none yet).
    applied: dict[int, int]
    #: Per partition: the true end of the events topic, when it was asked (None: Kafka not asked).
    end: dict[int, int] | None
    #: When the store last applied events (None: never).
    applied_at: datetime | None
    #: When `end` was read.
    checked_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def lag(self) -> int | None:
        """Events in the topic not applied yet, all partitions together (None when Kafka was not asked)."""
        if self.end is None:
            return None
        return sum(max(0, end - self.applied.get(partition, 0)) for partition, end in self.end.items())

    def lag_by_partition(self) -> dict[int, int]:
        return {p: max(0, end - self.applied.get(p, 0)) for p, end in (self.end or {}).items()}

    def describe(self) -> str:
        """One line for people: the lag and the time of the last applied event."""
        applied = self.applied_at.isoformat(timespec="seconds") if self.applied_at else "never"
        lag = "unknown (Kafka not reached)" if self.lag is None else f"{self.lag} event(s)"
        return f"visibility lag: {lag}; last applied at {applied}"

    def to_json(self) -> dict[str, Any]:
        return {"lag": self.lag, "lag_by_partition": {str(p): n for p, n in self.lag_by_partition().items()},
                "applied_at": self.applied_at.isoformat() if self.applied_at else None,
                "checked_at": self.checked_at.isoformat()}
