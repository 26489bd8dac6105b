"""The processor's state of one partition, around the pure core.

`PartitionEngine` holds every execution of one commands/events partition, the
current run's history of each open one (workflow tasks carry it), what has been
dispatched, and when something is due. It applies commands through `core.process`
and says what to append, reply and dispatch; Kafka and faust stay outside.

Recovery happens in steps (`replay`, then `handle` for each command of the backlog
that was waiting, then `resume`): until `resume`, nothing is dispatched and nothing
time-based is decided (`tick` refuses), so a report waiting in the commands topic is
decided before the processor re-sends its task or times it out (DESIGN §5
invariants 5 and 6).

It also holds the partition's schedules (`treeflow.core.schedules`): their state is the
fold of their events, the due-time heap wakes them like timers, and a tick decides them
with the executions (README "Schedules").

A closed execution is forgotten `closed_retention` after it closed (DESIGN.md §5
invariant 7); `export` and `restore` give and take the state a snapshot holds
(`treeflow.processor.snapshots`); `restore` leaves the engine `recovering` as `replay` does.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from treeflow.schemas import SCHEDULE_EVENTS, Command, Event, EventType, Reply, Task, WorkflowContext
from treeflow.schemas import models as m

from ..errors import UNKNOWN_WORKFLOW
from ..core import ExecutionState, Query, WorkItem, evolve, fold, next_due, pending_work, process
from ..core.schedules import ScheduleState, evolve_schedule
from ..core.state import updated

#: How long a closed execution stays in memory by default (TREEFLOW_CLOSED_RETENTION).
DEFAULT_CLOSED_RETENTION = timedelta(minutes=5)
#: The most events a run's history may hold by default (TREEFLOW_HISTORY_LIMIT): Temporal's limit.
DEFAULT_HISTORY_LIMIT = 51_200
#: Who terminates a run whose history reached the limit.
HISTORY_LIMIT_IDENTITY = "treeflow-processor"


@dataclass(frozen=True)
class Dispatch:
    """A task to hand to a worker (`item.kind`: workflow, activity or query): `history`
    is set for workflow tasks."""

    item: WorkItem
    context: WorkflowContext
    task: Task
    history: list[Event] | None = None


#: Wakeups kept before stale ones are swept out (`_sweep_wakeups`).
WAKEUPS_SWEEP_FLOOR = 1024
#: Unanswered queries whose askers' replies partitions are remembered (oldest dropped first).
LATER_ROUTES = 10_000
#: Event types after which a client waiting on the execution has its answer.
FINAL_CLOSES = frozenset({EventType.WORKFLOW_EXECUTION_COMPLETED, EventType.WORKFLOW_EXECUTION_FAILED,
                          EventType.WORKFLOW_EXECUTION_CANCELED, EventType.WORKFLOW_EXECUTION_TERMINATED,
                          EventType.WORKFLOW_EXECUTION_TIMED_OUT})


@dataclass
class Effects:
    events: list[Event] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    dispatches: list[Dispatch] = field(default_factory=list)
    #: The replies partition of each reply whose client named one (by reply command id).
    routes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class OpenImage:
    """What a snapshot keeps of an open execution: its state is the fold of `history`
    (the current run's events) with the two fields that come from earlier runs."""

    history: list[Event]
    execution_started_at: datetime
    recent_commands: tuple[str, ...]


@dataclass(frozen=True)
class PartitionImage:
    """The state of a partition as a snapshot holds it (`PartitionEngine.export`)."""

    open: list[OpenImage]
    closed: list[ExecutionState]
    #: Every schedule of the partition (never evicted; deleted ones are gone).
    schedules: list[ScheduleState] = field(default_factory=list)


#: How long after its scheduling the task of an attempt a worker runs eagerly goes out (as
#: possibly not the only copy): by then the attempt has usually completed and no copy is
#: needed; if the eager worker died, another claims the attempt through it.
EAGER_COPY_DELAY = timedelta(seconds=2)


class PartitionEngine:
    """Executions of one partition, their histories, and their pending work."""

    def __init__(self, partition: int, closed_retention: timedelta = DEFAULT_CLOSED_RETENTION,
                 history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        self.partition = partition
        self.closed_retention = closed_retention
        #: A run whose history reaches this many events is terminated (its memory, and what
        #: every workflow task carries, stays bounded; continue-as-new starts a fresh run).
        self.history_limit = history_limit
        self.states: dict[str, ExecutionState] = {}
        #: The partition's schedules, by id (README "Schedules").
        self.schedules: dict[str, ScheduleState] = {}
        self.histories: dict[str, list[Event]] = {}
        self._dispatched: dict[str, set[str]] = {}
        self._due: list[tuple[datetime, str]] = []
        #: True from `replay` until `resume`: the backlog is being decided.
        self.recovering = False
        #: The latest decision time: decisions never go back in time (a clock step back
        #: must not make a history read out of order).
        self.clock: datetime | None = None
        #: Work pending when the partition was recovered: an earlier processor may have
        #: dispatched it already, so its tasks are not `first_dispatch`.
        self._inherited: dict[str, set[str]] = {}
        #: First attempts a worker runs eagerly: their copy goes out after EAGER_COPY_DELAY.
        self._taken: dict[str, set[str]] = {}
        #: A heap of (closed_at, exec id), for `evict_closed`.
        self._closings: list[tuple[datetime, str]] = []
        #: Replies partitions of queries and updates whose reply comes with a later command.
        self._later_routes: dict[str, int] = {}
        #: The heap's size after its last sweep (`_sweep_wakeups`).
        self._swept_size = 0

    # ------------------------------------------------------------ recovery

    def replay(self, events: list[Event], now: datetime) -> None:
        """Fold events read back from the events topic; the partition is then
        `recovering` (nothing is dispatched or ticked) until `resume`.

        Every open execution is marked resumed at `now`: its activity (start-to-close,
        schedule-to-close, heartbeat) and workflow-task timeouts count from the recovery
        at the earliest. While the processor was down, the work may have progressed
        with its report unable to be decided, or its task may never have been handed
        out; either way the outage is not the work's time. (Heartbeats are not events
        either: the fold cannot know the last one.) Execution timeouts and timers stay
        wall-clock: one due during the outage fires once, after it.
        """
        for event in events:
            self._append(event)
            self._advance(event.timestamp)
        self._recovered(now)

    def _recovered(self, now: datetime) -> None:
        """After a fold (of the whole partition, or of a snapshot and its tail): forget what
        the retention lets go, mark the open executions resumed, and start `recovering`."""
        self.evict_closed(now)
        for exec_id, state in self.states.items():
            if state.open:
                self.states[exec_id] = updated(state, resumed_at=now)
                self._inherited[exec_id] = {item.key for item in pending_work(state)}
        self.recovering = True

    def resume(self, now: datetime) -> list[Dispatch]:
        """End the recovery (the backlog is decided): everything pending is dispatched
        again (what was dispatched before may be lost) and ticks are decided again."""
        self.recovering = False
        dispatches = []
        for exec_id in list(self.states):
            dispatches.extend(self._ready_work(exec_id, now))
            if exec_id in self.states:
                self._schedule(self.states[exec_id])
        for schedule in self.schedules.values():
            self._schedule_due(schedule)
        return dispatches

    # ------------------------------------------------------------ snapshots

    def export(self) -> PartitionImage:
        """The state a snapshot keeps: each open execution's current run history (with
        what came from earlier runs) and each closed execution still retained. Cheap
        (shallow copies of immutable values): call it while no command is decided."""
        opened, closed = [], []
        for exec_id, state in self.states.items():
            if state.open:
                opened.append(OpenImage(list(self.histories.get(exec_id, ())), state.execution_started_at,
                                        state.recent_commands))
            else:
                closed.append(state)
        return PartitionImage(opened, closed, list(self.schedules.values()))

    @classmethod
    def restore(cls, partition: int, image: PartitionImage, tail: list[Event], now: datetime,
                closed_retention: timedelta = DEFAULT_CLOSED_RETENTION) -> PartitionEngine:
        """The engine of a snapshot's `image` plus the `tail` of events after it: the
        same as `replay` of the whole partition at `now` (DESIGN.md §5 invariant 1)."""
        engine = cls(partition, closed_retention)
        for schedule in image.schedules:
            engine.schedules[schedule.schedule_id] = schedule
        for state in image.closed:
            engine.states[state.exec_id] = state
            heapq.heappush(engine._closings, (state.closed_at or now, state.exec_id))
        for item in image.open:
            if not item.history:
                continue
            exec_id = item.history[0].workflow_context.workflow_exec_id
            state = fold(item.history)[exec_id]
            engine.states[exec_id] = updated(state, execution_started_at=item.execution_started_at,
                                             recent_commands=item.recent_commands)
            engine.histories[exec_id] = list(item.history)
            engine._advance(item.history[-1].timestamp)
        for event in tail:
            engine._append(event)
            engine._advance(event.timestamp)
        engine._recovered(now)
        return engine

    def evict_closed(self, now: datetime) -> int:
        """Forget the executions closed `closed_retention` or longer before `now`; returns
        how many. Commands about a forgotten one are answered as for an unknown id
        (README: "Closed executions")."""
        evicted = 0
        limit = now - self.closed_retention
        while self._closings and self._closings[0][0] <= limit:
            closed_at, exec_id = heapq.heappop(self._closings)
            state = self.states.get(exec_id)
            if state is not None and not state.open and state.closed_at == closed_at:
                del self.states[exec_id]
                evicted += 1
        self._sweep_wakeups()
        return evicted

    def _sweep_wakeups(self) -> None:
        """Drop the wakeups of executions no longer open once the heap doubled since the
        last sweep. A closed execution's deadlines (an activity's 5-minute start-to-close)
        stay in the heap until they pass otherwise, so it would hold the rate times the
        longest timeout; an open execution's current wakeup is always kept."""
        if len(self._due) <= max(WAKEUPS_SWEEP_FLOOR, 2 * self._swept_size):
            return
        states, schedules = self.states, self.schedules
        self._due = [(at, key) for at, key in self._due
                     if key in schedules or ((state := states.get(key)) is not None and state.open)]
        heapq.heapify(self._due)
        self._swept_size = len(self._due)

    # ------------------------------------------------------------ commands

    def handle(self, command: Command, now: datetime) -> Effects:
        """Decide `command` at `now` (the decision time: see `treeflow.core.decide`); the
        caller appends the events, sends the replies and dispatches. While `recovering`,
        only query tasks are dispatched (`resume` dispatches the rest)."""
        now = self._advance(now)
        outcome = process(self.states, command, now=now, schedules=self.schedules)
        for event in outcome.events:
            self._append(event)
        # States not moved by an event (a heartbeat) still change.
        for exec_id, state in outcome.states.items():
            self.states[exec_id] = state
        self._schedules_changed(outcome.events, now)
        effects = Effects(outcome.events, outcome.replies)
        touched = set(outcome.states) | self._terminate_over_limit(effects, now)
        self._route(command, effects)
        reported = command.payload
        if isinstance(reported, m.CompleteActivityTask):
            reported = reported.continuation
        if isinstance(reported, (m.CompleteWorkflowTask, m.WorkflowTaskContinuation)):
            self._taken_eagerly(command.workflow_exec_id, reported.decisions, outcome.events)
            for child in reported.decisions:  # eager child starts: their first tasks' activities
                if isinstance(child, m.StartChildWorkflowExecution) and child.first_task is not None:
                    self._taken_eagerly(child.child_workflow_exec_id, child.first_task.decisions, outcome.events)
        if not self.recovering:
            for exec_id in touched:
                effects.dispatches.extend(self._ready_work(exec_id, now))
        effects.dispatches.extend(self._query_task(query, now) for query in outcome.queries)
        return effects

    def _taken_eagerly(self, exec_id: str, decisions: list[Any], events: list[Event]) -> None:
        """The first attempts the reporting worker runs itself (eager activities). Their
        task is still sent, as possibly not the only copy (`first_dispatch` false): the
        eager worker drops it, any other worker claims the attempt first (refused once
        its completion is recorded: invariant 5). So a worker killed mid-attempt is
        replaced as for any task (the copy stays uncommitted), and a copy read by another
        worker after a rebalance does not run the attempt a second time unasked.

        Only when the report (a workflow task's, or a continuation's) was accepted: its
        WORKFLOW_TASK_COMPLETED is among `events`."""
        eager = [d.activity_id for d in decisions if isinstance(d, m.ScheduleActivityTask) and d.eager]
        state = self.states.get(exec_id)
        if not eager or state is None or not any(
                e.event_type is EventType.WORKFLOW_TASK_COMPLETED and e.workflow_context.workflow_exec_id == exec_id
                for e in events):
            return
        keys = {f"{exec_id}|{state.context.workflow_run_id}|{activity_id}|1" for activity_id in eager
                if (activity := state.activities.get(activity_id)) is not None and activity.attempt == 1}
        if keys:
            self._inherited.setdefault(exec_id, set()).update(keys)
            if not self.recovering:  # else decided late: the eager worker may be gone, the copy goes on resume
                self._taken.setdefault(exec_id, set()).update(keys)

    def tick(self, now: datetime, command_id: str) -> Effects:
        """Decide what is due at `now`, and dispatch work whose backoff has passed
        (nothing while `recovering`)."""
        if self.recovering:
            return Effects()
        now = self._advance(now)
        due: set[str] = set()
        while self._due and self._due[0][0] <= now:
            _, exec_id = heapq.heappop(self._due)
            due.add(exec_id)
        effects = Effects()
        if not due:
            return effects
        tick = Command(command_id=command_id, timestamp=now, root_workflow_exec_id="", workflow_exec_id="",
                       payload=m.Tick(now=now))
        outcome = process(self.states, tick, [i for i in due if i in self.states or i in self.schedules],
                          schedules=self.schedules)
        for event in outcome.events:
            self._append(event)
        for exec_id, state in outcome.states.items():
            self.states[exec_id] = state
        for schedule_id in due & set(self.schedules):
            self._schedule_due(self.schedules[schedule_id])
        self._schedules_changed(outcome.events, now)
        effects.events, effects.replies = outcome.events, outcome.replies
        touched = set(outcome.states) | self._terminate_over_limit(effects, now)
        self._close_notices(effects)
        for exec_id in due | touched:
            effects.dispatches.extend(self._ready_work(exec_id, now))
            if exec_id in self.states:
                self._schedule(self.states[exec_id])
        return effects

    def next_wakeup(self) -> datetime | None:
        """When a tick has something to decide (None while `recovering`)."""
        return self._due[0][0] if self._due and not self.recovering else None

    def outstanding(self) -> bool:
        """Whether a task handed out (a workflow or activity task) still waits for its report."""
        return bool(self._dispatched)

    def prune_wakeups(self) -> None:
        """Drop the wakeups that would wake nothing, so that `next_wakeup` is exact: those
        of executions closed or forgotten since, and those earlier than anything their
        execution waits for now (a timer canceled, a timeout whose work was done). Each
        execution's current wakeup is in the heap (every change schedules it), so nothing
        due is lost; a tick would pop these and decide nothing."""
        while self._due and not self.recovering:
            at, exec_id = self._due[0]
            state = self.states.get(exec_id)
            if state is not None and state.open:
                wake = self._wakeup(state)
                if wake is not None and wake <= at:
                    return
            heapq.heappop(self._due)

    def _wakeup(self, state: ExecutionState) -> datetime | None:
        """When a tick has something to decide for `state`: what is due, or a task's backoff end."""
        dispatched = self._dispatched.get(state.exec_id, set())
        waiting = [item.ready_at for item in pending_work(state) if item.key not in dispatched]
        return min((t for t in (next_due(state), *waiting) if t is not None), default=None)

    # ------------------------------------------------------------ replies

    def _route(self, command: Command, effects: Effects) -> None:
        """Send the replies to where their clients read (`Command.reply_partition`), and
        each closing event of an execution started by such a client to it too.

        A query's answer, and an update's result, come later than their command (with the
        worker's report): their route is kept until that reply leaves."""
        if command.reply_partition is not None:
            for reply in effects.replies:
                effects.routes[reply.command_id] = command.reply_partition
            if isinstance(command.payload, m.QueryWorkflow | m.UpdateWorkflowExecution) and not effects.replies:
                self._later_routes[command.command_id] = command.reply_partition
                while len(self._later_routes) > LATER_ROUTES:
                    del self._later_routes[next(iter(self._later_routes))]
        for reply in effects.replies:
            route = self._later_routes.pop(reply.command_id, None)
            if route is not None:
                effects.routes.setdefault(reply.command_id, route)
        self._close_notices(effects)

    def _close_notices(self, effects: Effects) -> None:
        """Tell the client that started an execution (it names its replies partition) of its
        close, and of a workflow task no worker could run for an unregistered workflow name."""
        for event in effects.events:
            if event.event_type in FINAL_CLOSES:
                kind = "closed"
            elif _unregistered_workflow(event):
                kind = f"unregistered:{event.sequence}"
            else:
                continue
            state = self.states.get(event.workflow_context.workflow_exec_id)
            if state is None or state.reply_partition is None:
                continue
            context = event.workflow_context
            notice = Reply(command_id=f"{kind}:{context.workflow_exec_id}:{context.workflow_run_id}",
                           timestamp=event.timestamp, root_workflow_exec_id=context.root_workflow_exec_id,
                           workflow_exec_id=context.workflow_exec_id, accepted=True,
                           workflow_run_id=context.workflow_run_id, closing_event=event)
            effects.replies.append(notice)
            effects.routes[notice.command_id] = state.reply_partition

    def _terminate_over_limit(self, effects: Effects, now: datetime) -> set[str]:
        """Terminate each run the events of `effects` took to `history_limit` events (its
        parent's history gets the child's close, which may take that one there too); the
        terminations' events join `effects`. Returns the executions they changed."""
        touched: set[str] = set()
        checked = 0
        while checked < len(effects.events):
            over = {e.workflow_context.workflow_exec_id for e in effects.events[checked:]}
            checked = len(effects.events)
            for exec_id in sorted(over):
                state = self.states.get(exec_id)
                if state is None or not state.open or len(self.histories.get(exec_id, ())) < self.history_limit:
                    continue
                context = state.context
                terminate = Command(
                    command_id=f"history-limit:{exec_id}:{context.workflow_run_id}", timestamp=now,
                    root_workflow_exec_id=context.root_workflow_exec_id, workflow_exec_id=exec_id,
                    payload=m.TerminateWorkflowExecution(
                        reason=f"the run's history reached {self.history_limit:,} events (TREEFLOW_HISTORY_LIMIT); "
                               "a workflow that runs long continues as new (workflow.should_continue_as_new())",
                        identity=HISTORY_LIMIT_IDENTITY))
                outcome = process(self.states, terminate, now=now)
                for event in outcome.events:
                    self._append(event)
                for changed, changed_state in outcome.states.items():
                    self.states[changed] = changed_state
                effects.events.extend(outcome.events)
                touched |= set(outcome.states)
        return touched

    # ------------------------------------------------------------ internals

    def _advance(self, now: datetime) -> datetime:
        """The decision time for `now`: at the log's precision (events carry milliseconds,
        so that the live state equals the fold) and never before the previous one."""
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        if self.clock is None or now > self.clock:
            self.clock = now
        return self.clock

    def _schedules_changed(self, events: list[Event], now: datetime) -> None:
        """Put the schedules these events changed on the due heap, and those whose buffered
        tick waits for a run these events closed (it starts at the next tick)."""
        for event in events:
            context = event.workflow_context
            if event.event_type in SCHEDULE_EVENTS:
                schedule = self.schedules.get(context.workflow_exec_id)
                if schedule is not None:
                    self._schedule_due(schedule)
            elif event.event_type in FINAL_CLOSES:
                schedule = self.schedules.get(context.root_workflow_exec_id)
                if schedule is not None and schedule.buffered is not None:
                    heapq.heappush(self._due, (now, schedule.schedule_id))

    def _schedule_due(self, schedule: ScheduleState) -> None:
        due = schedule.due_at()
        if due is not None:
            heapq.heappush(self._due, (due, schedule.schedule_id))

    def _append(self, event: Event) -> None:
        exec_id = event.workflow_context.workflow_exec_id
        if event.event_type in SCHEDULE_EVENTS:
            schedule = evolve_schedule(self.schedules.get(exec_id), event)
            if schedule is None:
                self.schedules.pop(exec_id, None)
            else:
                self.schedules[exec_id] = schedule
            return
        state = evolve(self.states.get(exec_id), event)
        self.states[exec_id] = state
        if event.event_type is EventType.WORKFLOW_EXECUTION_STARTED:
            self.histories[exec_id] = [event]
        elif state.open:
            self.histories.setdefault(exec_id, []).append(event)
        else:
            self.histories.pop(exec_id, None)
            self._dispatched.pop(exec_id, None)
            self._inherited.pop(exec_id, None)
            self._taken.pop(exec_id, None)
            if state.closed_at is not None:
                heapq.heappush(self._closings, (state.closed_at, exec_id))

    def _ready_work(self, exec_id: str, now: datetime) -> list[Dispatch]:
        state = self.states.get(exec_id)
        if state is None:
            return []
        items = pending_work(state)
        done = self._dispatched.get(exec_id, set())
        keep = {item.key for item in items} & done
        taken = self._taken.get(exec_id, ())
        dispatches, later = [], []
        for item in items:
            if item.key in done:
                continue
            ready_at = item.ready_at + EAGER_COPY_DELAY if item.key in taken else item.ready_at
            if ready_at <= now:
                dispatches.append(self._dispatch(state, item, now))
                keep.add(item.key)
            else:
                later.append(ready_at)
        if keep:
            self._dispatched[exec_id] = keep
        else:
            self._dispatched.pop(exec_id, None)
        self._schedule(state, later)
        return dispatches

    def _schedule(self, state: ExecutionState, extra: list[datetime] | None = None) -> None:
        times = [t for t in (next_due(state), *(extra or [])) if t is not None]
        if times:
            heapq.heappush(self._due, (min(times), state.exec_id))

    def _query_task(self, query: Query, now: datetime) -> Dispatch:
        """A query task for the execution's queue, carrying the current run's history (a
        worker without an up-to-date instance replays it). Not remembered: a query lost
        with a processor is not dispatched again; its client times out."""
        state = self.states[query.exec_id]
        history = list(self.histories.get(query.exec_id, []))
        item = WorkItem(query.exec_id, "query", f"{query.exec_id}|query|{query.query_id}", state.context.task_queue,
                        now)
        payload = m.QueryTask(query_id=query.query_id, query_name=query.query_name, input_json=query.input_json,
                              deadline=query.deadline, history=history, update=query.update,
                              first_sequence=history[0].sequence if history else 1)
        return Dispatch(item, state.context, Task(task_id=query.query_id, timestamp=now,
                                                  workflow_context=state.context, payload=payload))

    def _dispatch(self, state: ExecutionState, item: WorkItem, now: datetime) -> Dispatch:
        if item.kind == "workflow":
            history = list(self.histories.get(state.exec_id, []))
            task_id = state.workflow_task.task_id  # type: ignore[union-attr]
            payload: Any = m.WorkflowTask(history=history, first_sequence=history[0].sequence if history else 1)
            return Dispatch(item, state.context, Task(task_id=task_id, timestamp=now,
                                                      workflow_context=state.context, payload=payload), history)
        activity = state.activities[item.activity_id]  # type: ignore[index]
        payload = m.ActivityTask(
            activity_id=activity.activity_id, activity_name=activity.activity_name, input_json=activity.input_json,
            attempt=activity.attempt, scheduled_at=activity.ready_at,
            start_to_close_timeout_ms=activity.start_to_close_timeout_ms,
            heartbeat_timeout_ms=activity.heartbeat_timeout_ms, first_dispatch=item.key not in self._inherited.get(state.exec_id, ()))
        return Dispatch(item, state.context, Task(task_id=item.key, timestamp=now, workflow_context=state.context,
                                                  payload=payload))


def _unregistered_workflow(event: Event) -> bool:
    """A WORKFLOW_TASK_FAILED because no worker of the queue registers the workflow's name."""
    return (event.event_type is EventType.WORKFLOW_TASK_FAILED
            and getattr(event.payload, "cause", None) == UNKNOWN_WORKFLOW)
