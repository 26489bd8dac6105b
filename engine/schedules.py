"""Schedules, the caller's side: options in Temporal's style, and the handle.

A schedule is owned by the processor's clock (README "Schedules"): it lives in the log
like an execution, on the partition of its id, and starts its workflow at each tick as
a run with the id `<schedule id>.<nominal time>`. When it ticks, how a spec is read and
the state it keeps are in `treeflow.core.schedules`; this module turns the options
into the commands' records and the processor's answers into `ScheduleDescription`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from treeflow.schemas import models as m

from .core.schedules import InvalidScheduleSpec, validate_spec
from .errors import InvalidScheduleError
from .options import millis

if TYPE_CHECKING:
    from .client import Client

#: What a tick does while the schedule's previous run is still open: SKIP (default),
#: BUFFER_ONE (start once it closes; one tick waits at most), ALLOW_ALL (start anyway).
ScheduleOverlapPolicy = m.ScheduleOverlapPolicy
#: Temporal's default catch-up window: a tick missed during an outage up to a year ago still fires.
DEFAULT_CATCHUP_WINDOW = timedelta(days=365)

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ISO = re.compile(r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
                  r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$")


def parse_duration(value: str | float | int | timedelta) -> timedelta:
    """A duration from a timedelta, seconds, `"90s"` / `"1h30m"` / `"500ms"`, or ISO 8601 (`"PT2S"`).

    Raises `InvalidScheduleError` for anything else."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    text = value.strip()
    try:
        return timedelta(seconds=float(text))
    except ValueError:
        pass
    iso = _ISO.match(text.upper())
    if iso and any(iso.groupdict().values()):
        parts = {k: float(v) for k, v in iso.groupdict().items() if v}
        return timedelta(days=parts.get("d", 0), hours=parts.get("h", 0), minutes=parts.get("m", 0),
                         seconds=parts.get("s", 0))
    pieces = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", text.lower())
    if not pieces or "".join(n + u for n, u in pieces) != text.lower().replace(" ", ""):
        raise InvalidScheduleError(f"not a duration: {value!r} (use e.g. 30s, 5m, 1h30m, 500ms or PT2S)")
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in pieces))


@dataclass(frozen=True)
class ScheduleIntervalSpec:
    """Tick every `every`, at the epoch plus `offset` plus multiples of `every` (UTC), so
    the ticks do not depend on when the schedule was created."""

    every: timedelta | float | str
    offset: timedelta | float | str = timedelta(0)

    def to_record(self) -> m.ScheduleInterval:
        return m.ScheduleInterval(every_ms=millis(parse_duration(self.every)),
                                  offset_ms=millis(parse_duration(self.offset)))


@dataclass(frozen=True)
class ScheduleSpec:
    """When a schedule ticks: the union of `cron` expressions (5 fields; 6 with seconds
    last), read in `time_zone` (an IANA name, DST-aware; UTC by default), and of
    `intervals`; no tick before `start_at` or after `end_at`. Each tick fires up to
    `jitter` after its nominal time (the same delay for a given schedule and tick,
    never reaching the next tick)."""

    cron: tuple[str, ...] | list[str] = ()
    intervals: tuple[ScheduleIntervalSpec, ...] | list[ScheduleIntervalSpec] = ()
    jitter: timedelta | float | str = timedelta(0)
    time_zone: str | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None

    @classmethod
    def every(cls, interval: timedelta | float | str, **options: Any) -> ScheduleSpec:
        """A spec of one interval (`ScheduleSpec.every("2s")`)."""
        return cls(intervals=(ScheduleIntervalSpec(interval),), **options)

    def to_record(self) -> m.ScheduleSpec:
        """The record the commands carry; raises `InvalidScheduleError` when it cannot tick."""
        record = m.ScheduleSpec(cron=list(self.cron), intervals=[i.to_record() for i in self.intervals],
                                jitter_ms=millis(parse_duration(self.jitter)) or 0, time_zone=self.time_zone,
                                start_at=_utc(self.start_at), end_at=_utc(self.end_at))
        try:
            validate_spec(record)
        except InvalidScheduleSpec as exc:
            raise InvalidScheduleError(str(exc)) from None
        return record


@dataclass(frozen=True)
class SchedulePolicy:
    """`overlap`: what a tick does while the previous run is open. `catchup_window`: after
    an outage of the processor, the most recent missed tick fires once if it is at most
    this old (older ones, and every tick missed before it, do not fire)."""

    overlap: m.ScheduleOverlapPolicy = m.ScheduleOverlapPolicy.SKIP
    catchup_window: timedelta | float | str = DEFAULT_CATCHUP_WINDOW


@dataclass(frozen=True)
class ScheduleRunInfo:
    """A run a schedule started."""

    execution_id: str
    nominal_time: datetime
    started_at: datetime


@dataclass(frozen=True)
class ScheduleDescription:
    """A schedule as the processor holds it (`ScheduleHandle.describe`, `Client.list_schedules`)."""

    schedule_id: str
    workflow_name: str
    task_queue: str
    paused: bool
    overlap: str
    note: str | None
    next_fire_at: datetime | None
    next_fire_times: list[datetime]
    recent_runs: list[ScheduleRunInfo]
    fired: int
    skipped: int
    missed: int
    #: The whole answer, as JSON (spec, input, catch-up window, buffered tick...).
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def of(cls, data: dict[str, Any]) -> ScheduleDescription:
        return cls(schedule_id=data["schedule_id"], workflow_name=data["workflow_name"],
                   task_queue=data["task_queue"], paused=data["paused"], overlap=data["overlap"],
                   note=data.get("note"), next_fire_at=_parse_time(data.get("next_fire_at")),
                   next_fire_times=[_parse_time(t) for t in data.get("next_fire_times", [])],  # type: ignore[misc]
                   recent_runs=[ScheduleRunInfo(r["execution_id"], _parse_time(r["nominal_time"]),  # type: ignore[arg-type]
                                                _parse_time(r["started_at"]))  # type: ignore[arg-type]
                                for r in data.get("recent_runs", [])],
                   fired=data.get("fired", 0), skipped=data.get("skipped", 0), missed=data.get("missed", 0),
                   raw=data)


class ScheduleHandle:
    """A schedule by its id: pause, resume, trigger, describe, delete. Each call returns
    once the processor has decided it (its event is in the log), and raises
    `ScheduleNotFoundError` for an id that names no schedule."""

    def __init__(self, client: Client, schedule_id: str) -> None:
        self.client = client
        self.id = schedule_id

    def __repr__(self) -> str:
        return f"ScheduleHandle({self.id!r})"

    async def describe(self, *, timeout: float | None = None) -> ScheduleDescription:
        reply = await self.client._schedule_command(self.id, m.DescribeSchedule(), timeout)
        return ScheduleDescription.of(json.loads(reply.result_json or "{}"))

    async def pause(self, note: str | None = None, *, timeout: float | None = None) -> None:
        """No tick fires until `resume` (a `trigger` still starts a run)."""
        await self.client._schedule_command(self.id, m.PauseSchedule(note=note, identity=self.client.identity),
                                            timeout)

    async def resume(self, note: str | None = None, *, timeout: float | None = None) -> None:
        """The next tick is the first after now: ticks due while paused do not fire."""
        await self.client._schedule_command(self.id, m.ResumeSchedule(note=note, identity=self.client.identity),
                                            timeout)

    async def trigger(self, overlap: m.ScheduleOverlapPolicy | None = None, *,
                      timeout: float | None = None) -> str | None:
        """Start the workflow now (paused or not), under the schedule's overlap policy unless
        `overlap` is given; returns the run's execution id (None when the policy skipped
        or buffered it)."""
        reply = await self.client._schedule_command(
            self.id, m.TriggerSchedule(overlap=overlap, identity=self.client.identity), timeout)
        return json.loads(reply.result_json or "{}").get("execution_id")

    async def delete(self, *, timeout: float | None = None) -> None:
        """Delete the schedule; its runs go on."""
        await self.client._schedule_command(self.id, m.DeleteSchedule(identity=self.client.identity), timeout)


def _utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _parse_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))
