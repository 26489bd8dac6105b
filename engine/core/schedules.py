"""Schedules in the functional core: when a spec ticks, its jitter, and a schedule's state.

Pure: no Kafka, no clock, no randomness. `next_fire_after(spec, t)` is the first nominal
tick strictly after `t`; `jitter(...)` is derived from the schedule id and the tick, so
deciding a tick again gives the same fire time. `evolve_schedule` folds a schedule's
events (README "Schedules"); the decisions are in `decide.py`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from treeflow.schemas import Event, EventType, WorkflowContext
from treeflow.schemas import models as m

from .state import RECENT_COMMANDS, updated

T = EventType
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: How many of its last runs a schedule remembers (describe shows them; overlap checks them).
RECENT_RUNS = 10
#: Bound of the count of ticks missed during an outage (`ScheduleFired.missed`).
MAX_MISSED_COUNT = 100_000
#: Shortest interval.
MIN_INTERVAL_MS = 1000


class InvalidScheduleSpec(ValueError):
    """A spec that cannot tick: a bad cron expression, an unknown time zone, a short interval."""


@lru_cache(maxsize=256)
def _zone(name: str | None) -> ZoneInfo | timezone:
    if not name:
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidScheduleSpec(f"unknown time zone {name!r} (an IANA name such as 'Europe/Paris')") from exc


def validate_spec(spec: m.ScheduleSpec) -> None:
    """Raise InvalidScheduleSpec unless `spec` is usable."""
    _zone(spec.time_zone)
    if not spec.cron and not spec.intervals:
        raise InvalidScheduleSpec("a schedule needs at least one cron expression or interval")
    for expression in spec.cron:
        if not croniter.is_valid(expression, second_at_beginning=False):
            raise InvalidScheduleSpec(f"invalid cron expression {expression!r}")
    for interval in spec.intervals:
        if interval.every_ms < MIN_INTERVAL_MS:
            raise InvalidScheduleSpec(f"an interval must be at least {MIN_INTERVAL_MS // 1000} s "
                                      f"(got {interval.every_ms} ms)")
    if spec.jitter_ms < 0:
        raise InvalidScheduleSpec("jitter must not be negative")
    if spec.start_at is not None and spec.end_at is not None and spec.end_at < spec.start_at:
        raise InvalidScheduleSpec("end_at is before start_at")


def _ms(t: datetime) -> int:
    return (t - EPOCH) // timedelta(milliseconds=1)


def _cron_next(expression: str, zone: ZoneInfo | timezone, after: datetime) -> datetime:
    """The first time after `after` whose wall-clock time in `zone` matches `expression`.

    croniter walks naive wall-clock times (its own DST handling misplaces ticks around a
    change); each is placed in `zone` by zoneinfo with fold=0: a wall-clock time that a
    change repeats fires once, the first time; one that a change skips fires as far after
    the change as it was meant to be after the hour (02:30 skipped -> 03:30 summer time).
    """
    walker = croniter(expression, after.astimezone(zone).replace(tzinfo=None))
    for _ in range(1000):
        candidate = walker.get_next(datetime).replace(tzinfo=zone).astimezone(timezone.utc)
        if candidate > after:
            return candidate
    raise InvalidScheduleSpec(f"cron expression {expression!r} found no time after {after}")


def _interval_next(interval: m.ScheduleInterval, after: datetime) -> datetime:
    k = (_ms(after) - interval.offset_ms) // interval.every_ms + 1
    return EPOCH + timedelta(milliseconds=k * interval.every_ms + interval.offset_ms)


def next_fire_after(spec: m.ScheduleSpec, after: datetime) -> datetime | None:
    """The first nominal tick of `spec` strictly after `after` (None: none is left)."""
    if spec.start_at is not None and after < spec.start_at:
        after = spec.start_at - timedelta(milliseconds=1)
    zone = _zone(spec.time_zone)
    times = [_cron_next(expression, zone, after) for expression in spec.cron]
    times += [_interval_next(interval, after) for interval in spec.intervals]
    if not times:
        return None
    first = min(times)
    if spec.end_at is not None and first > spec.end_at:
        return None
    return first


def jitter(schedule_id: str, nominal: datetime, jitter_ms: int, following: datetime | None) -> timedelta:
    """How long after `nominal` the tick fires: a value in [0, jitter_ms] derived from the
    schedule id and the tick (the same on every decision), never reaching `following`."""
    if jitter_ms <= 0:
        return timedelta(0)
    bound = jitter_ms
    if following is not None:
        bound = min(bound, _ms(following) - _ms(nominal) - 1)
    if bound <= 0:
        return timedelta(0)
    digest = hashlib.sha256(f"{schedule_id}|{_ms(nominal)}".encode()).digest()
    return timedelta(milliseconds=int.from_bytes(digest[:8], "big") % (bound + 1))


def fire_time(schedule_id: str, spec: m.ScheduleSpec, nominal: datetime) -> datetime:
    """When the tick at `nominal` fires: nominal plus its jitter."""
    following = next_fire_after(spec, nominal) if spec.jitter_ms else None
    return nominal + jitter(schedule_id, nominal, spec.jitter_ms, following)


def run_id_of(schedule_id: str, nominal: datetime) -> str:
    """The execution id of the run a tick starts: `<schedule id>.<nominal time, UTC>`
    (`YYYYMMDDTHHMMSSZ`, with `.mmm` milliseconds before the Z when there are any)."""
    stamp = nominal.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S")
    millis = nominal.microsecond // 1000
    return f"{schedule_id}.{stamp}{f'.{millis:03d}' if millis else ''}Z"


def latest_due(spec: m.ScheduleSpec, first: datetime, now: datetime) -> tuple[datetime, int]:
    """The latest nominal tick at or before `now`, from `first` (itself due), and how many
    due ticks come before it (the ones an outage made the processor miss)."""
    latest, missed = first, 0
    following = next_fire_after(spec, latest)
    while following is not None and following <= now and missed < MAX_MISSED_COUNT:
        latest, missed = following, missed + 1
        following = next_fire_after(spec, latest)
    if following is not None and following <= now:
        # A very long outage: jump (intervals only tick evenly; cron expressions step).
        for interval in spec.intervals:
            candidate = _interval_next(interval, now - timedelta(milliseconds=interval.every_ms))
            latest = max(latest, candidate if candidate <= now else latest)
        zone = _zone(spec.time_zone)
        for expression in spec.cron:
            walker = croniter(expression, now.astimezone(zone).replace(tzinfo=None))
            candidate = walker.get_prev(datetime).replace(tzinfo=zone).astimezone(timezone.utc)
            latest = max(latest, candidate if candidate <= now else latest)
    return latest, missed


@dataclass(frozen=True)
class ScheduleRun:
    nominal_time: datetime
    started_at: datetime
    workflow_exec_id: str


@dataclass(frozen=True)
class ScheduleState:
    """One schedule, as folded from its events (`evolve_schedule`)."""

    context: WorkflowContext
    spec: m.ScheduleSpec
    action: m.ScheduleAction
    overlap: m.ScheduleOverlapPolicy
    catchup_window_ms: int
    created_at: datetime
    last_sequence: int
    paused: bool = False
    note: str | None = None
    #: The next nominal tick (None: the spec has none left).
    next_fire_at: datetime | None = None
    #: A tick waiting for the open run to close (BUFFER_ONE): (nominal time, trigger).
    buffered: tuple[datetime, str] | None = None
    recent_runs: tuple[ScheduleRun, ...] = ()
    fired: int = 0
    skipped: int = 0
    missed: int = 0
    recent_commands: tuple[str, ...] = ()

    @property
    def schedule_id(self) -> str:
        return self.context.workflow_exec_id

    def due_at(self) -> datetime | None:
        """When a tick has something to decide for it (None while paused or finished)."""
        if self.paused or self.next_fire_at is None:
            return None
        return fire_time(self.schedule_id, self.spec, self.next_fire_at)


def _command_id(event: Event) -> str:
    return event.event_id.rsplit(":", 1)[0]


def evolve_schedule(state: ScheduleState | None, event: Event) -> ScheduleState | None:
    """The schedule after `event` (None once deleted)."""
    p = event.payload
    if event.event_type is T.SCHEDULE_CREATED:
        return ScheduleState(context=event.workflow_context, spec=p.spec, action=p.action,  # type: ignore[union-attr]
                             overlap=p.overlap, catchup_window_ms=p.catchup_window_ms,  # type: ignore[union-attr]
                             created_at=event.timestamp, last_sequence=event.sequence,
                             paused=p.paused, note=p.note, next_fire_at=p.next_fire_at,  # type: ignore[union-attr]
                             recent_commands=(_command_id(event),))
    if state is None:
        raise ValueError(f"event {event.event_id} ({event.event_type.value}) for a schedule that does not exist")
    if event.event_type is T.SCHEDULE_DELETED:
        return None
    command_id = _command_id(event)
    recent = state.recent_commands
    if not recent or recent[-1] != command_id:
        recent = (*recent[-(RECENT_COMMANDS - 1):], command_id)
    changes: dict = {"last_sequence": event.sequence, "recent_commands": recent}
    if event.event_type is T.SCHEDULE_PAUSED:
        changes.update(paused=True, note=p.note)  # type: ignore[union-attr]
    elif event.event_type is T.SCHEDULE_RESUMED:
        changes.update(paused=False, note=p.note, next_fire_at=p.next_fire_at)  # type: ignore[union-attr]
    elif event.event_type is T.SCHEDULE_FIRED:
        run = ScheduleRun(p.nominal_time, event.timestamp, p.workflow_exec_id)  # type: ignore[union-attr]
        changes.update(next_fire_at=p.next_fire_at, fired=state.fired + 1,  # type: ignore[union-attr]
                       missed=state.missed + p.missed,  # type: ignore[union-attr]
                       recent_runs=(*state.recent_runs[-(RECENT_RUNS - 1):], run))
        if p.trigger == "BUFFERED":  # type: ignore[union-attr]
            changes["buffered"] = None
    elif event.event_type is T.SCHEDULE_SKIPPED:
        changes.update(next_fire_at=p.next_fire_at, skipped=state.skipped + 1,  # type: ignore[union-attr]
                       missed=state.missed + p.missed)  # type: ignore[union-attr]
    elif event.event_type is T.SCHEDULE_BUFFERED:
        changes.update(next_fire_at=p.next_fire_at, missed=state.missed + p.missed,  # type: ignore[union-attr]
                       buffered=(p.nominal_time, p.trigger))  # type: ignore[union-attr]
    return updated(state, **changes)


def describe_schedule(state: ScheduleState, *, now: datetime | None = None, future: int = 5) -> dict:
    """The JSON view of a schedule (describe, list, the HTTP API)."""
    upcoming = []
    nominal = state.next_fire_at
    while nominal is not None and len(upcoming) < future and not state.paused:
        upcoming.append(_iso(nominal))
        nominal = next_fire_after(state.spec, nominal)
    spec = state.spec
    return {
        "schedule_id": state.schedule_id,
        "workflow_name": state.action.workflow_name,
        "task_queue": state.action.task_queue,
        "input": state.action.input_json,
        "execution_timeout_ms": state.action.execution_timeout_ms,
        "spec": {"cron": list(spec.cron),
                 "intervals": [{"every_ms": i.every_ms, "offset_ms": i.offset_ms} for i in spec.intervals],
                 "jitter_ms": spec.jitter_ms, "time_zone": spec.time_zone,
                 "start_at": _iso(spec.start_at), "end_at": _iso(spec.end_at)},
        "overlap": state.overlap.value,
        "catchup_window_ms": state.catchup_window_ms,
        "paused": state.paused,
        "note": state.note,
        "created_at": _iso(state.created_at),
        "next_fire_at": _iso(state.next_fire_at) if not state.paused else None,
        "next_fire_times": upcoming,
        "buffered": _iso(state.buffered[0]) if state.buffered else None,
        "fired": state.fired,
        "skipped": state.skipped,
        "missed": state.missed,
        "recent_runs": [{"nominal_time": _iso(r.nominal_time), "started_at": _iso(r.started_at),
                         "execution_id": r.workflow_exec_id} for r in state.recent_runs],
    }


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
