"""Schedules in the pure core and the partition engine (README "Schedules"): when specs tick
(intervals, cron, time zones and DST), jitter, overlap policies, catch-up after an outage,
run ids, and state == fold of the log (snapshot included)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from treeflow.core.decide import process
from treeflow.core.schedules import fire_time, jitter, latest_due, next_fire_after, run_id_of
from treeflow.errors import InvalidScheduleError
from treeflow.processor.engine import PartitionEngine
from treeflow.processor.snapshots import encode_chunks
from treeflow.schedules import ScheduleIntervalSpec, ScheduleSpec, parse_duration
from treeflow.schemas import SNAPSHOTS, Command, EventType
from treeflow.schemas import models as m

T = EventType
UTC = timezone.utc
T0 = datetime(2026, 1, 1, tzinfo=UTC)
P = m.ScheduleOverlapPolicy


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def walk(spec: m.ScheduleSpec, after: datetime, n: int) -> list[datetime]:
    found = []
    for _ in range(n):
        after = next_fire_after(spec, after)  # type: ignore[assignment]
        found.append(after)
    return found


# ---------------------------------------------------------------- specs


def test_interval_ticks_at_multiples_of_the_period_since_the_epoch_plus_offset() -> None:
    spec = ScheduleSpec(intervals=[ScheduleIntervalSpec("2s", offset="500ms")]).to_record()
    assert walk(spec, utc(2026, 1, 1, 0, 0, 0), 3) == [
        T0 + timedelta(seconds=0.5), T0 + timedelta(seconds=2.5), T0 + timedelta(seconds=4.5)]
    # strictly after: a time that is itself a tick gives the next one
    assert next_fire_after(spec, T0 + timedelta(seconds=2.5)) == T0 + timedelta(seconds=4.5)


def test_cron_in_a_time_zone_follows_its_utc_offset_across_the_year() -> None:
    spec = ScheduleSpec(cron=["0 9 * * *"], time_zone="Europe/Paris").to_record()
    assert next_fire_after(spec, utc(2026, 1, 10)) == utc(2026, 1, 10, 8)   # CET, UTC+1
    assert next_fire_after(spec, utc(2026, 7, 10)) == utc(2026, 7, 10, 7)   # CEST, UTC+2
    ny = ScheduleSpec(cron=["0 9 * * 1-5"], time_zone="America/New_York").to_record()
    assert next_fire_after(ny, utc(2026, 1, 10)) == utc(2026, 1, 12, 14)    # Saturday -> Monday, UTC-5


def test_cron_across_dst_changes_fires_each_day_once() -> None:
    spec = ScheduleSpec(cron=["30 2 * * *"], time_zone="Europe/Paris").to_record()
    # Spring forward (29 March 2026, 02:00 -> 03:00): the skipped 02:30 fires at 03:30 CEST.
    assert walk(spec, utc(2026, 3, 27, 12), 4) == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 30),
                                                 utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]
    # Fall back (25 October 2026, 03:00 -> 02:00): 02:30 happens twice and fires once, the first time.
    assert walk(spec, utc(2026, 10, 23, 12), 4) == [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30),
                                                  utc(2026, 10, 26, 1, 30), utc(2026, 10, 27, 1, 30)]
    # From inside the repeated hour, the first 02:30 (already past) is not given again.
    assert next_fire_after(spec, utc(2026, 10, 25, 1, 15)) == utc(2026, 10, 26, 1, 30)


def test_cron_with_seconds_last_and_start_end_bounds() -> None:
    spec = ScheduleSpec(cron=["* * * * * */15"], start_at=utc(2026, 1, 1, 0, 0, 20),
                        end_at=utc(2026, 1, 1, 0, 1)).to_record()
    assert walk(spec, T0, 3) == [utc(2026, 1, 1, 0, 0, 30), utc(2026, 1, 1, 0, 0, 45), utc(2026, 1, 1, 0, 1)]
    assert next_fire_after(spec, utc(2026, 1, 1, 0, 1)) is None


def test_union_of_cron_and_intervals() -> None:
    spec = ScheduleSpec(cron=["*/1 * * * *"], intervals=[ScheduleIntervalSpec(timedelta(seconds=25))]).to_record()
    assert [t.second + 60 * t.minute for t in walk(spec, T0, 4)] == [25, 50, 60, 75]


@pytest.mark.parametrize("spec, message", [
    (ScheduleSpec(), "at least one"),
    (ScheduleSpec(cron=["61 * * * *"]), "invalid cron"),
    (ScheduleSpec.every("500ms"), "at least 1 s"),
    (ScheduleSpec.every("1s", time_zone="Nowhere/Void"), "unknown time zone"),
])
def test_bad_specs_are_refused_with_what_is_wrong(spec: ScheduleSpec, message: str) -> None:
    with pytest.raises(InvalidScheduleError, match=message):
        spec.to_record()


def test_durations() -> None:
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("PT2S") == timedelta(seconds=2)
    assert parse_duration("500ms") == timedelta(milliseconds=500)
    assert parse_duration(3) == timedelta(seconds=3)
    with pytest.raises(InvalidScheduleError):
        parse_duration("2 fortnights")


def test_jitter_is_derived_from_schedule_and_tick_and_stays_before_the_next_tick() -> None:
    spec = ScheduleSpec.every("10s", jitter="30s").to_record()
    delays = [fire_time("nightly", spec, T0 + timedelta(seconds=10 * k)) - T0 - timedelta(seconds=10 * k)
              for k in range(50)]
    assert delays == [fire_time("nightly", spec, T0 + timedelta(seconds=10 * k)) - T0 - timedelta(seconds=10 * k)
                      for k in range(50)]  # the same on every decision
    assert all(timedelta(0) <= d < timedelta(seconds=10) for d in delays)  # never reaches the next tick
    assert len(set(delays)) > 10  # spread
    assert jitter("other", T0, 5000, None) != jitter("nightly", T0, 5000, None)
    assert jitter("nightly", T0, 0, None) == timedelta(0)


def test_run_ids_name_the_schedule_and_the_nominal_time() -> None:
    assert run_id_of("nightly", utc(2026, 12, 1, 3)) == "nightly.20261201T030000Z"
    assert run_id_of("s", utc(2026, 12, 1, 3) + timedelta(milliseconds=42)) == "s.20261201T030000.042Z"


def test_latest_due_after_an_outage() -> None:
    spec = ScheduleSpec.every("2s").to_record()
    assert latest_due(spec, T0 + timedelta(seconds=2), T0 + timedelta(seconds=11)) == (T0 + timedelta(seconds=10), 4)


# ---------------------------------------------------------------- the engine


class Partition:
    """A partition engine fed commands and ticks at chosen times."""

    def __init__(self) -> None:
        self.engine = PartitionEngine(0)
        self.engine.replay([], T0)
        self.engine.resume(T0)
        self.events: list = []
        self.n = 0

    def command(self, payload: object, at: datetime, schedule_id: str = "s", command_id: str | None = None) -> list:
        self.n += 1
        command = Command(command_id=command_id or f"c{self.n}", timestamp=at, root_workflow_exec_id=schedule_id,
                          workflow_exec_id=schedule_id, payload=payload)
        effects = self.engine.handle(command, at)
        self.events += effects.events
        self.last_replies = effects.replies
        return effects.events

    def tick(self, at: datetime) -> list:
        self.n += 1
        effects = self.engine.tick(at, f"t{self.n}")
        self.events += effects.events
        return effects.events

    def close_run(self, exec_id: str, at: datetime) -> None:
        self.n += 1
        state = self.engine.states[exec_id]
        command = Command(command_id=f"done{self.n}", timestamp=at, root_workflow_exec_id="s",
                          workflow_exec_id=exec_id,
                          payload=m.TerminateWorkflowExecution(reason="test"))
        assert state.open
        self.events += self.engine.handle(command, at).events

    def fired(self) -> list[str]:
        return [e.payload.workflow_exec_id for e in self.events if e.event_type is T.SCHEDULE_FIRED]


def create(every: str = "2s", overlap: m.ScheduleOverlapPolicy = P.ALLOW_ALL, **options: object) -> m.CreateSchedule:
    return m.CreateSchedule(spec=ScheduleSpec.every(every).to_record(),
                            action=m.ScheduleAction(workflow_name="wf", task_queue="q", input_json='{"a": 1}'),
                            overlap=overlap, **options)


def types(events: list) -> list[str]:
    return [e.event_type.value for e in events]


def test_a_tick_starts_a_run_of_the_schedules_tree_then_records_it() -> None:
    p = Partition()
    assert types(p.command(create(), T0)) == ["SCHEDULE_CREATED"]
    assert p.engine.next_wakeup() == T0 + timedelta(seconds=2)
    assert p.tick(T0 + timedelta(seconds=1.9)) == []
    started, fired = p.tick(T0 + timedelta(seconds=2, milliseconds=3))
    assert started.event_type is T.WORKFLOW_EXECUTION_STARTED and fired.event_type is T.SCHEDULE_FIRED
    context = started.workflow_context
    assert (context.workflow_exec_id, context.root_workflow_exec_id, context.parent_workflow_exec_id) == (
        "s.20260101T000002Z", "s", None)
    assert started.payload.input_json == '{"a": 1}' and context.task_queue == "q"
    assert fired.payload.nominal_time == T0 + timedelta(seconds=2) and fired.payload.missed == 0
    assert fired.payload.next_fire_at == T0 + timedelta(seconds=4)
    assert p.engine.next_wakeup() == T0 + timedelta(seconds=4)


def test_overlap_skip() -> None:
    p = Partition()
    p.command(create(overlap=P.SKIP), T0)
    p.tick(T0 + timedelta(seconds=2))
    assert types(p.tick(T0 + timedelta(seconds=4))) == ["SCHEDULE_SKIPPED"]
    p.close_run("s.20260101T000002Z", T0 + timedelta(seconds=5))
    p.tick(T0 + timedelta(seconds=6))
    assert p.fired() == ["s.20260101T000002Z", "s.20260101T000006Z"]


def test_overlap_buffer_one_starts_the_buffered_tick_when_the_run_closes() -> None:
    p = Partition()
    p.command(create(overlap=P.BUFFER_ONE), T0)
    p.tick(T0 + timedelta(seconds=2))
    assert types(p.tick(T0 + timedelta(seconds=4))) == ["SCHEDULE_BUFFERED"]
    assert types(p.tick(T0 + timedelta(seconds=6))) == ["SCHEDULE_SKIPPED"]  # one waits at most
    p.close_run("s.20260101T000002Z", T0 + timedelta(seconds=6.5))
    assert p.engine.next_wakeup() == T0 + timedelta(seconds=6.5)  # woken by the close
    assert types(p.tick(T0 + timedelta(seconds=6.5))) == ["WORKFLOW_EXECUTION_STARTED", "SCHEDULE_FIRED"]
    assert p.fired() == ["s.20260101T000002Z", "s.20260101T000004Z"]
    assert p.events[-1].payload.trigger == "BUFFERED"


def test_overlap_allow_all() -> None:
    p = Partition()
    p.command(create(overlap=P.ALLOW_ALL), T0)
    for k in (2, 4, 6):
        p.tick(T0 + timedelta(seconds=k))
    assert p.fired() == ["s.20260101T000002Z", "s.20260101T000004Z", "s.20260101T000006Z"]


def test_after_an_outage_the_most_recent_missed_tick_fires_once() -> None:
    p = Partition()
    p.command(create(), T0)
    p.tick(T0 + timedelta(seconds=2))
    [fired] = [e for e in p.tick(T0 + timedelta(seconds=31)) if e.event_type is T.SCHEDULE_FIRED]  # 4..30 were due
    assert fired.payload.workflow_exec_id == "s.20260101T000030Z" and fired.payload.missed == 13
    assert p.engine.schedules["s"].next_fire_at == T0 + timedelta(seconds=32)


def test_a_tick_older_than_the_catchup_window_is_skipped() -> None:
    p = Partition()
    p.command(m.CreateSchedule(spec=ScheduleSpec(cron=["0 3 * * *"]).to_record(),
                               action=m.ScheduleAction(workflow_name="wf", task_queue="q"),
                               catchup_window_ms=60_000), T0)
    [skipped] = p.tick(utc(2026, 1, 1, 3, 5))
    assert skipped.event_type is T.SCHEDULE_SKIPPED and skipped.payload.reason == "CATCHUP_WINDOW"
    assert p.tick(utc(2026, 1, 2, 3, 0, 30))[-1].event_type is T.SCHEDULE_FIRED


def test_a_tick_decided_again_finds_its_run_and_does_not_start_it_twice() -> None:
    """A crash left the run's start in the log without the SCHEDULE_FIRED after it."""
    p = Partition()
    p.command(create(), T0)
    started, _ = p.tick(T0 + timedelta(seconds=2))
    engine = PartitionEngine(0)
    engine.replay([p.events[0], started], T0 + timedelta(seconds=3))
    engine.resume(T0 + timedelta(seconds=3))
    effects = engine.tick(T0 + timedelta(seconds=3), "again")
    assert types(effects.events) == ["SCHEDULE_FIRED"]
    assert effects.events[0].payload.workflow_exec_id == started.workflow_context.workflow_exec_id


def test_pause_resume_trigger_delete() -> None:
    p = Partition()
    p.command(create(), T0)
    assert types(p.command(m.PauseSchedule(note="maintenance"), T0 + timedelta(seconds=1))) == ["SCHEDULE_PAUSED"]
    assert p.tick(T0 + timedelta(seconds=10)) == [] and p.engine.next_wakeup() is None
    # a trigger runs while paused
    started, fired = p.command(m.TriggerSchedule(), T0 + timedelta(seconds=11, milliseconds=7))
    assert started.workflow_context.workflow_exec_id == "s.20260101T000011.007Z" and fired.payload.trigger == "TRIGGERED"
    assert types(p.command(m.ResumeSchedule(), T0 + timedelta(seconds=12.5))) == ["SCHEDULE_RESUMED"]
    assert p.engine.next_wakeup() == T0 + timedelta(seconds=14)  # the first tick after the resume
    assert types(p.command(m.DeleteSchedule(), T0 + timedelta(seconds=13))) == ["SCHEDULE_DELETED"]
    assert "s" not in p.engine.schedules and p.tick(T0 + timedelta(seconds=14)) == []
    assert p.command(m.PauseSchedule(), T0 + timedelta(seconds=15)) == []
    assert p.last_replies[0].error.type == "ScheduleNotFound"


def test_ids_are_not_shared_between_schedules_and_executions() -> None:
    p = Partition()
    p.command(create(), T0)
    assert p.command(create(), T0) == [] and p.last_replies[0].error.type == "ScheduleAlreadyExists"
    start = m.StartWorkflowExecution(workflow_name="wf", task_queue="q")
    assert p.command(start, T0) == [] and p.last_replies[0].error.type == "WorkflowIdInAnotherTree"
    p.command(start, T0, schedule_id="e")
    assert p.command(create(), T0, schedule_id="e") == [] and p.last_replies[0].error.type == "WorkflowIdInAnotherTree"


def test_a_command_delivered_again_appends_nothing() -> None:
    p = Partition()
    p.command(create(), T0, command_id="create-1")
    assert p.command(create(), T0, command_id="create-1") == [] and p.last_replies[0].accepted


def test_describe_and_list_answer_from_the_state_without_events() -> None:
    p = Partition()
    p.command(create(), T0)
    p.tick(T0 + timedelta(seconds=2))
    assert p.command(m.DescribeSchedule(), T0 + timedelta(seconds=3)) == []
    import json
    described = json.loads(p.last_replies[0].result_json)
    assert described["fired"] == 1 and described["recent_runs"][0]["execution_id"] == "s.20260101T000002Z"
    assert described["next_fire_times"][:2] == ["2026-01-01T00:00:04.000Z", "2026-01-01T00:00:06.000Z"]
    state = p.engine.schedules["s"]
    outcome = process({}, Command(command_id="l", timestamp=T0, root_workflow_exec_id="", workflow_exec_id="",
                                  payload=m.ListSchedules(workflow_name="other")), schedules={"s": state})
    assert json.loads(outcome.replies[0].result_json) == []


def test_state_is_the_fold_of_the_log_and_survives_a_snapshot() -> None:
    p = Partition()
    p.command(create(overlap=P.BUFFER_ONE), T0)
    p.tick(T0 + timedelta(seconds=2))
    p.tick(T0 + timedelta(seconds=4))  # buffered
    p.command(m.PauseSchedule(note="n"), T0 + timedelta(seconds=5))
    live = p.engine.schedules["s"]
    replayed = PartitionEngine(0)
    replayed.replay(p.events, T0 + timedelta(seconds=6))
    assert replayed.schedules == {"s": live}
    # through the snapshot's records and back
    chunks = [SNAPSHOTS.decode(data).payload for data in encode_chunks(0, "snap", p.engine.export(), 1 << 20)]
    from treeflow.processor.snapshots import schedule_state
    assert [schedule_state(record) for chunk in chunks for record in chunk.schedules] == [live]
    restored = PartitionEngine.restore(0, p.engine.export(), [], T0 + timedelta(seconds=6))
    assert restored.schedules == {"s": live}
    restored.resume(T0 + timedelta(seconds=6))
    resume = Command(command_id="r", timestamp=T0, root_workflow_exec_id="s", workflow_exec_id="s",
                     payload=m.ResumeSchedule())
    live_events = p.engine.handle(resume, T0 + timedelta(seconds=7)).events
    assert restored.handle(resume, T0 + timedelta(seconds=7)).events == live_events
    assert restored.schedules == p.engine.schedules


def test_a_schedules_tree_is_open_until_it_is_deleted_and_its_runs_closed() -> None:
    from treeflow.consumers.tree import TreeTracker

    p = Partition()
    p.command(create(), T0)
    p.tick(T0 + timedelta(seconds=2))
    p.command(m.DeleteSchedule(), T0 + timedelta(seconds=3))
    tracker = TreeTracker("s")
    for event in p.events:
        tracker.observe(event)
    assert tracker.open_executions() == ["s.20260101T000002Z"]  # the schedule is gone, its run goes on
    p.close_run("s.20260101T000002Z", T0 + timedelta(seconds=4))
    tracker.observe(p.events[-1])
    assert tracker.closed
