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
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from treeflow.schemas import Command, Event, EventType, Reply, Task, WorkflowContext
from treeflow.schemas import models as m

from ..core import ExecutionState, Query, WorkItem, evolve, next_due, pending_work, process
from ..core.state import updated


@dataclass(frozen=True)
class Dispatch:
    """A task to hand to a worker (`item.kind`: workflow, activity or query): `history`
    is set for workflow tasks."""

    item: WorkItem
    context: WorkflowContext
    task: Task
    history: list[Event] | None = None


@dataclass
class Effects:
    events: list[Event] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    dispatches: list[Dispatch] = field(default_factory=list)


class PartitionEngine:
    """Executions of one partition, their histories, and their pending work."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.states: dict[str, ExecutionState] = {}
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
        return dispatches

    # ------------------------------------------------------------ commands

    def handle(self, command: Command, now: datetime) -> Effects:
        """Decide `command` at `now` (the decision time: see `treeflow.core.decide`); the
        caller appends the events, sends the replies and dispatches. While `recovering`,
        only query tasks are dispatched (`resume` dispatches the rest)."""
        now = self._advance(now)
        outcome = process(self.states, command, now=now)
        for event in outcome.events:
            self._append(event)
        # States not moved by an event (a heartbeat) still change.
        for exec_id, state in outcome.states.items():
            self.states[exec_id] = state
        effects = Effects(outcome.events, outcome.replies)
        if not self.recovering:
            for exec_id in outcome.states:
                effects.dispatches.extend(self._ready_work(exec_id, now))
        effects.dispatches.extend(self._query_task(query, now) for query in outcome.queries)
        return effects

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
        outcome = process(self.states, tick, [exec_id for exec_id in due if exec_id in self.states])
        for event in outcome.events:
            self._append(event)
        for exec_id, state in outcome.states.items():
            self.states[exec_id] = state
        effects.events, effects.replies = outcome.events, outcome.replies
        for exec_id in due | set(outcome.states):
            effects.dispatches.extend(self._ready_work(exec_id, now))
            if exec_id in self.states:
                self._schedule(self.states[exec_id])
        return effects

    def next_wakeup(self) -> datetime | None:
        """When a tick has something to decide (None while `recovering`)."""
        return self._due[0][0] if self._due and not self.recovering else None

    # ------------------------------------------------------------ internals

    def _advance(self, now: datetime) -> datetime:
        """The decision time for `now`: at the log's precision (events carry milliseconds,
        so that the live state equals the fold) and never before the previous one."""
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        if self.clock is None or now > self.clock:
            self.clock = now
        return self.clock

    def _append(self, event: Event) -> None:
        exec_id = event.workflow_context.workflow_exec_id
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

    def _ready_work(self, exec_id: str, now: datetime) -> list[Dispatch]:
        state = self.states.get(exec_id)
        if state is None:
            return []
        items = pending_work(state)
        done = self._dispatched.get(exec_id, set())
        keep = {item.key for item in items} & done
        dispatches = []
        for item in items:
            if item.key in done:
                continue
            if item.ready_at <= now:
                dispatches.append(self._dispatch(state, item, now))
                keep.add(item.key)
        if keep:
            self._dispatched[exec_id] = keep
        else:
            self._dispatched.pop(exec_id, None)
        self._schedule(state, [item.ready_at for item in items if item.key not in keep])
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
