"""Property tests of the pure core (`treeflow.core`): DESIGN.md §5's processor invariants.

A `RuleBasedStateMachine` drives one tree of executions (a root, children,
grandchildren) with command sequences picked from what the current state makes
plausible: complete or fail the pending workflow task of an open execution with
random decisions, report on activity attempts (current, superseded, timed out, of a
closed run), tick at an advancing time, signal / cancel / terminate / start any id,
re-deliver a recent command, plus stale and invalid reports. Each invariant has its
own machine (so each is its own test and its own shrunk counterexample):

1. state == fold(events) (in one go, event by event, in chunks, after an Avro round
   trip, and through `PartitionEngine.replay`); a state rebuilt from events decides
   what the live state decides.
2. re-processing a command appends nothing; deciding is deterministic.
3. per-execution sequences 1..n, unique event and run ids, a run's events sit between
   its start and its close, child notices follow the child's own close.
4. close policies reach every open child (TERMINATE, REQUEST_CANCEL, ABANDON),
   recursively, with PARENT_CLOSE_POLICY_APPLIED before the parent's closing event.
5. stale reports (superseded attempt, timed out, closed run, not-pending task) emit
   nothing.

Example tests follow for edge cases, then regression tests of the engine bugs these
found (a decision after continue-as-new, a final activity timeout that woke nobody,
re-delivery after a new run, ticks that could not reach an idle parent or child, and
a recovered processor timing out a heartbeating activity).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from treeflow.core import ExecutionState, Status, evolve, fold, process
from treeflow.processor.engine import PartitionEngine
from treeflow.schemas import EVENTS, Command, Event, EventType
from treeflow.schemas import models as m

T = EventType
P = m.ParentClosePolicy
EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)
ROOT = "root"
#: Ids children are started with; "root" too, so a tree can grow a cycle once the root closed.
CHILD_IDS = ("c1", "c2", "g1", ROOT)
POOL = (ROOT, "c1", "c2", "g1")

CLOSING = {
    T.WORKFLOW_EXECUTION_COMPLETED: Status.COMPLETED,
    T.WORKFLOW_EXECUTION_FAILED: Status.FAILED,
    T.WORKFLOW_EXECUTION_CANCELED: Status.CANCELED,
    T.WORKFLOW_EXECUTION_TERMINATED: Status.TERMINATED,
    T.WORKFLOW_EXECUTION_TIMED_OUT: Status.TIMED_OUT,
    T.WORKFLOW_EXECUTION_CONTINUED_AS_NEW: Status.CONTINUED_AS_NEW,
}
CHILD_NOTICES = {
    T.CHILD_WORKFLOW_EXECUTION_COMPLETED: Status.COMPLETED,
    T.CHILD_WORKFLOW_EXECUTION_FAILED: Status.FAILED,
    T.CHILD_WORKFLOW_EXECUTION_CANCELED: Status.CANCELED,
    T.CHILD_WORKFLOW_EXECUTION_TERMINATED: Status.TERMINATED,
    T.CHILD_WORKFLOW_EXECUTION_TIMED_OUT: Status.TIMED_OUT,
}
ACTIVITY_REPORTS = (m.ReportActivityTaskStarted, m.CompleteActivityTask, m.FailActivityTask,
                    m.RecordActivityHeartbeat, m.RecordCustomTaskEvent)
TASK_REPORTS = (m.CompleteWorkflowTask, m.FailWorkflowTask)
#: Events after which the workflow code waits on nothing more for that activity / timer / child.
AWAITED_OUTCOMES = {T.ACTIVITY_TASK_COMPLETED, T.ACTIVITY_TASK_FAILED, T.ACTIVITY_TASK_CANCELED, T.TIMER_FIRED,
                    T.START_CHILD_WORKFLOW_EXECUTION_FAILED, *CHILD_NOTICES}


def at(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def summary(events: list[Event]) -> list[str]:
    return [f"{e.workflow_context.workflow_exec_id}#{e.sequence}:{e.event_type.value}" for e in events]


def exec_of(event: Event) -> str:
    return event.workflow_context.workflow_exec_id


def run_of(event: Event) -> str:
    return event.workflow_context.workflow_run_id


# ------------------------------------------------------------------ strategies

FAILURES = st.builds(m.Failure, type=st.sampled_from(["Boom", "Fatal"]), message=st.just("boom"),
                     non_retryable=st.booleans())
RETRY = st.none() | st.builds(
    m.RetryPolicy, initial_interval_ms=st.sampled_from([1, 1000]), backoff_coefficient=st.sampled_from([1.0, 2.0]),
    maximum_interval_ms=st.sampled_from([None, 1500]), maximum_attempts=st.sampled_from([0, 1, 3]),
    non_retryable_error_types=st.sampled_from([[], ["Fatal"]]))
SCHEDULE = st.builds(
    m.ScheduleActivityTask, activity_id=st.sampled_from(["a1", "a2"]), activity_name=st.just("act"),
    task_queue=st.just("q"), retry_policy=RETRY, schedule_to_close_timeout_ms=st.sampled_from([None, 3000, 20000]),
    start_to_close_timeout_ms=st.sampled_from([None, 1000, 5000]), heartbeat_timeout_ms=st.sampled_from([None, 1000]))
START_CHILD = st.builds(
    m.StartChildWorkflowExecution, child_workflow_exec_id=st.sampled_from(CHILD_IDS),
    child_workflow_name=st.just("child"), task_queue=st.just("q"), parent_close_policy=st.sampled_from([p for p in P if p is not P.UNSPECIFIED]),
    execution_timeout_ms=st.sampled_from([None, 2000, 30000]))
NON_CLOSING = st.one_of(
    SCHEDULE, SCHEDULE, START_CHILD, START_CHILD,
    st.builds(m.StartTimer, timer_id=st.sampled_from(["t1", "t2"]), duration_ms=st.sampled_from([0, 1000, 5000])),
    st.builds(m.CancelTimer, timer_id=st.sampled_from(["t1", "t2"])),
    st.builds(m.RequestCancelActivityTask, activity_id=st.sampled_from(["a1", "a2"])),
    st.builds(m.RequestCancelChildWorkflowExecution, child_workflow_exec_id=st.sampled_from(CHILD_IDS)),
)
FINAL = st.one_of(
    st.builds(m.CompleteWorkflowExecution, result_json=st.just('"ok"')),
    st.builds(m.FailWorkflowExecution, failure=FAILURES),
    st.builds(m.CancelWorkflowExecution),
)
CONTINUE = st.builds(m.ContinueAsNewWorkflowExecution, input_json=st.just("1"))


@st.composite
def decision_lists(draw: Any) -> list[Any]:
    """A few decisions, maybe ending in a closing one. Decisions after a final close are
    drawn too (they must be ignored); none are drawn after continue-as-new (engine bug,
    see test_decisions_after_continue_as_new_are_ignored)."""
    decisions = draw(st.lists(NON_CLOSING, max_size=3))
    ending = draw(st.sampled_from(["none", "none", "none", "none", "final", "continue"]))
    if ending == "final":
        decisions += [draw(FINAL), *draw(st.lists(NON_CLOSING, max_size=1))]
    elif ending == "continue":
        decisions.append(draw(CONTINUE))
    return decisions


# ------------------------------------------------------------------ checks (pure functions)

def check_log(log: list[Event]) -> None:
    """Invariant 3 over the whole log (re-derived from the events alone)."""
    states: dict[str, ExecutionState] = {}
    counts: Counter[str] = Counter()
    event_ids: set[str] = set()
    run_ids: set[str] = set()
    for event in log:
        x, run = exec_of(event), run_of(event)
        counts[x] += 1
        assert event.sequence == counts[x], f"{event.event_id}: sequence {event.sequence}, expected {counts[x]}"
        assert event.event_id not in event_ids, f"duplicate event id {event.event_id}"
        event_ids.add(event.event_id)
        previous = states.get(x)
        if event.event_type is T.WORKFLOW_EXECUTION_STARTED:
            assert previous is None or not previous.open, f"{event.event_id}: {x} started while running"
            assert run not in run_ids, f"{event.event_id}: run id {run} reused"
            run_ids.add(run)
            payload = event.payload
            if payload.continued_from_run_id is not None:
                assert previous is not None and previous.status is Status.CONTINUED_AS_NEW
                assert previous.context.workflow_run_id == payload.continued_from_run_id
            parent_id = event.workflow_context.parent_workflow_exec_id
            if parent_id is not None and payload.continued_from_run_id is None:
                parent = states.get(parent_id)
                assert parent is not None and parent.open, f"{event.event_id}: started by a parent not running"
                assert x in parent.children, f"{event.event_id}: parent {parent_id} never initiated {x}"
                assert parent.context.workflow_run_id == payload.parent_workflow_run_id
                assert event.workflow_context.root_workflow_exec_id == parent.context.root_workflow_exec_id
        else:
            # Covers "started precedes any activity" and "the closing event is the run's last".
            assert previous is not None and previous.open, \
                f"{event.event_id} ({event.event_type.value}) on {x}, which is not running"
            assert run == previous.context.workflow_run_id, f"{event.event_id}: event for run {run}, not current"
        if event.event_type in CHILD_NOTICES:
            child_id = event.payload.child_workflow_exec_id
            child = states.get(child_id)
            assert child is not None and child.status is CHILD_NOTICES[event.event_type], \
                f"{event.event_id}: {event.event_type.value} for {child_id} before the child closed that way"
            assert child.context.parent_workflow_exec_id == x
        if event.event_type is T.CHILD_WORKFLOW_EXECUTION_STARTED:
            child = states.get(event.payload.child_workflow_exec_id)
            assert child is not None and child.open
            assert child.context.workflow_run_id == event.payload.child_workflow_run_id
        states[x] = evolve(previous, event)


def check_close_policies(before: dict[str, ExecutionState], command: Command, events: list[Event]) -> None:
    """Invariant 4 for the events of one command."""
    current = dict(before)
    closes = []
    for i, event in enumerate(events):
        x = exec_of(event)
        if event.event_type in CLOSING:
            parent = current[x]
            status = CLOSING[event.event_type]
            open_children = {cid: (ref, current.get(cid)) for cid, ref in parent.children.items()}
            applied: dict[str, Any] = {}
            for earlier in reversed(events[:i]):
                if exec_of(earlier) != x:
                    continue
                if earlier.event_type is not T.PARENT_CLOSE_POLICY_APPLIED:
                    break
                applied[earlier.payload.child_workflow_exec_id] = earlier.payload
            assert set(applied) == set(open_children), \
                f"{x} closed ({status.value}) with open children {sorted(open_children)} but policies " \
                f"applied to {sorted(applied)} just before"
            for cid, payload in applied.items():
                assert payload.policy is open_children[cid][0].policy
                assert payload.parent_close_status == status.value
            closes.append((i, x, open_children))
        current[x] = evolve(current.get(x), event)
    for i, x, open_children in closes:
        for cid, (ref, child) in open_children.items():
            assert child is not None and child.open, f"{x} counted {cid} as an open child, but it is not running"
            later = [e for e in events[i + 1:] if exec_of(e) == cid]
            if ref.policy is P.TERMINATE:
                assert any(e.event_type in CLOSING for e in later), \
                    f"{x} closed; its TERMINATE child {cid} was not closed by the same command"
            elif ref.policy is P.REQUEST_CANCEL:
                assert child.cancel_requested or any(
                    e.event_type in CLOSING or e.event_type is T.WORKFLOW_EXECUTION_CANCEL_REQUESTED for e in later), \
                    f"{x} closed; its REQUEST_CANCEL child {cid} got no cancel request"
            else:
                assert not any(e.event_type in (T.WORKFLOW_EXECUTION_TERMINATED, T.WORKFLOW_EXECUTION_CANCEL_REQUESTED)
                               for e in later), f"{x} closed; its ABANDON child {cid} was terminated or canceled"
                if not isinstance(command.payload, m.Tick):
                    assert current[cid].open, f"{x} closed; its ABANDON child {cid} did not stay running"


def check_children_tracked(states: dict[str, ExecutionState]) -> None:
    """A running parent's open children are running executions whose parent it is."""
    for x, state in states.items():
        if not state.open:
            continue
        for cid in state.children:
            child = states.get(cid)
            assert child is not None and child.open, f"{x} waits on child {cid}, which is not running"
            assert child.context.parent_workflow_exec_id == x


def report_is_current(before: dict[str, ExecutionState], command: Command,
                      open_attempts: set[tuple[str, str, str, int]],
                      claims: dict[tuple[str, str, str, int], str] | None = None) -> bool:
    """Whether a worker report is about something still pending. Activity attempts are
    tracked by the test from the events (scheduled/retrying open one; retrying, a close
    of the attempt, or a close of the run end it), independently of the core's state;
    so are the claims granted (`claims`): a report of another claim than the attempt's
    latest is stale, a claim itself is current while its attempt is open."""
    p = command.payload
    state = before.get(command.workflow_exec_id)
    if isinstance(p, TASK_REPORTS):
        return (state is not None and state.open and state.context.workflow_run_id == p.workflow_run_id
                and state.workflow_task is not None and state.workflow_task.task_id == p.task_id)
    key = (command.workflow_exec_id, p.workflow_run_id, p.activity_id, p.attempt)
    if key not in open_attempts:
        return False
    granted = (claims or {}).get(key)
    return is_claim(command) or granted is None or granted == p.claim_id


def is_claim(command: Command) -> bool:
    return isinstance(command.payload, m.ReportActivityTaskStarted) and command.payload.claim_id is not None


def track_attempts(open_attempts: set[tuple[str, str, str, int]], events: list[Event]) -> None:
    for e in events:
        x, run = exec_of(e), run_of(e)
        t = e.event_type
        if t is T.ACTIVITY_TASK_SCHEDULED:
            open_attempts.add((x, run, e.payload.activity_id, 1))
        elif t is T.ACTIVITY_TASK_RETRYING:
            open_attempts.discard((x, run, e.payload.activity_id, e.attempt))
            open_attempts.add((x, run, e.payload.activity_id, e.payload.next_attempt))
        elif t in (T.ACTIVITY_TASK_COMPLETED, T.ACTIVITY_TASK_FAILED, T.ACTIVITY_TASK_TIMED_OUT,
                   T.ACTIVITY_TASK_CANCEL_REQUESTED, T.ACTIVITY_TASK_CANCELED):
            open_attempts.discard((x, run, e.payload.activity_id, e.attempt))
        elif t in CLOSING:
            for key in [k for k in open_attempts if k[0] == x and k[1] == run]:
                open_attempts.discard(key)


def with_heartbeats(rebuilt: dict[str, ExecutionState], live: dict[str, ExecutionState]) -> dict[str, ExecutionState]:
    """`rebuilt` with the live volatile fields (heartbeats, claims, resumed_at): not folded from events."""
    return {x: dataclasses.replace(s, heartbeats=live[x].heartbeats, claims=live[x].claims,
                                   resumed_at=live[x].resumed_at) for x, s in rebuilt.items()}


def assert_same_states(a: dict[str, ExecutionState], b: dict[str, ExecutionState], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: executions differ: {sorted(a)} vs {sorted(b)}"
    for x in a:
        assert a[x] == b[x], f"{what}: state of {x} differs:\n{a[x]}\n{b[x]}"


# ------------------------------------------------------------------ the machine

class TreeMachine(RuleBasedStateMachine):
    """Generates commands for one tree and applies them with `process`.

    Subclasses check one invariant each, in `on_command` (per command) and in
    `@invariant` methods (over the states and the whole log).
    """

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, ExecutionState] = {}
        self.log: list[Event] = []
        self.now = 0  # ms since EPOCH
        self.count = 0
        self.processed: list[tuple[Command, int]] = []  # (command, how many events it appended)
        self.run_started_at: dict[str, int] = {}  # exec id -> len(self.processed) when its run last started
        self.seen_tasks: set[tuple[str, str, str]] = set()  # (exec, run, task id) ever pending
        self.seen_attempts: set[tuple[str, str, str, int]] = set()  # (exec, run, activity, attempt) ever open
        self.open_attempts: set[tuple[str, str, str, int]] = set()
        self.claims: dict[tuple[str, str, str, int], str] = {}  # the latest claim granted per open attempt
        self.lag = 0  # ms a command waited in the topic before it is decided (its timestamp is older)

    # -------------------------------------------------------------- plumbing

    def command(self, exec_id: str, payload: Any, root: str = ROOT) -> Command:
        self.count += 1
        return Command(command_id=f"k{self.count}", timestamp=at(self.now - self.lag), root_workflow_exec_id=root,
                       workflow_exec_id=exec_id, payload=payload)

    def apply(self, command: Command, redelivery: bool = False) -> None:
        before = dict(self.states)
        outcome = process(before, command, now=at(self.now))
        note(f"{command.command_id}{' (again)' if redelivery else ''} -> {command.workflow_exec_id or 'tick'} "
             f"{type(command.payload).__name__} @{self.now}: {summary(outcome.events)}")
        after = {**before, **outcome.states}
        for e in outcome.events:
            if e.event_type in CLOSING or e.event_type in (T.PARENT_CLOSE_POLICY_APPLIED, T.ACTIVITY_TASK_RETRYING,
                                                          T.ACTIVITY_TASK_TIMED_OUT, T.TIMER_FIRED):
                event(e.event_type.value)
        if isinstance(command.payload, (*TASK_REPORTS, *ACTIVITY_REPORTS)) and not outcome.events:
            event("report emitted nothing")
        if redelivery:
            event("redelivery")
        self.on_command(before, command, outcome, after, redelivery)
        if not redelivery:
            self.processed.append((command, len(outcome.events)))
        track_attempts(self.open_attempts, outcome.events)
        if is_claim(command) and any(r.accepted for r in outcome.replies):
            p = command.payload
            self.claims[(command.workflow_exec_id, p.workflow_run_id, p.activity_id, p.attempt)] = p.claim_id
        self.claims = {k: c for k, c in self.claims.items() if k in self.open_attempts}
        self.log.extend(outcome.events)
        self.states = after
        for e in outcome.events:
            if e.event_type is T.WORKFLOW_EXECUTION_STARTED:
                self.run_started_at[exec_of(e)] = len(self.processed)
        for x, s in after.items():
            if s.open and s.workflow_task is not None:
                self.seen_tasks.add((x, s.context.workflow_run_id, s.workflow_task.task_id))
            for a in s.activities.values():
                self.seen_attempts.add((x, s.context.workflow_run_id, a.activity_id, a.attempt))

    def on_command(self, before: dict[str, ExecutionState], command: Command, outcome: Any,
                   after: dict[str, ExecutionState], redelivery: bool) -> None:
        """Per-command checks, in subclasses."""

    def with_task(self) -> list[str]:
        return sorted(x for x, s in self.states.items() if s.open and s.workflow_task is not None)

    # -------------------------------------------------------------- rules

    @initialize(timeout=st.sampled_from([None, None, None, 30000]))
    def start_root(self, timeout: int | None) -> None:
        self.apply(self.command(ROOT, m.StartWorkflowExecution(workflow_name="wf", task_queue="q",
                                                               execution_timeout_ms=timeout)))

    @precondition(lambda self: self.with_task())
    @rule(pick=st.integers(0, 5), decisions=decision_lists(), unseen=st.sampled_from([0, 0, 0, 1, 3]),
          fail=st.sampled_from([False, False, False, True]))
    def workflow_task(self, pick: int, decisions: list[Any], unseen: int, fail: bool) -> None:
        """Complete (or fail) the pending task of an open execution; `unseen` events arrived
        after the history the worker ran on."""
        x = self.with_task()[pick % len(self.with_task())]
        s = self.states[x]
        ids = {"task_id": s.workflow_task.task_id, "workflow_run_id": s.context.workflow_run_id}
        payload: Any = (m.FailWorkflowTask(**ids, cause="WORKFLOW_CODE_ERROR", failure=m.Failure(type="X", message="x"))
                        if fail else m.CompleteWorkflowTask(
                            **ids, history_length=max(s.first_sequence, s.last_sequence - unseen), decisions=decisions))
        self.apply(self.command(x, payload))

    @precondition(lambda self: self.seen_tasks)
    @rule(pick=st.integers(0, 20), decisions=decision_lists(), fail=st.booleans())
    def report_on_old_task(self, pick: int, decisions: list[Any], fail: bool) -> None:
        """A workflow task report for any task ever pending (usually superseded or of a closed run)."""
        tasks = sorted(self.seen_tasks)
        x, run, task_id = tasks[pick % len(tasks)]
        payload: Any = (m.FailWorkflowTask(task_id=task_id, workflow_run_id=run, cause="X",
                                           failure=m.Failure(type="X", message="x")) if fail else
                        m.CompleteWorkflowTask(task_id=task_id, workflow_run_id=run,
                                               history_length=self.states[x].last_sequence, decisions=decisions))
        self.apply(self.command(x, payload))

    @precondition(lambda self: self.seen_attempts)
    @rule(which=st.sampled_from(["open", "open", "any"]), pick=st.integers(0, 20),
          kind=st.sampled_from(["started", "complete", "complete", "fail", "fail", "heartbeat", "custom"]),
          skew=st.sampled_from(["none", "none", "none", "none", "run", "attempt+1", "attempt-1"]),
          failure=FAILURES, custom_type=st.sampled_from([T.CUSTOM_TASK_STARTED, T.CUSTOM_TASK_COMPLETED,
                                                        T.CUSTOM_TASK_FAILED, T.ACTIVITY_TASK_COMPLETED]),
          claim=st.sampled_from([None, None, "w1", "w2"]))
    def report_activity(self, which: str, pick: int, kind: str, skew: str, failure: m.Failure,
                        custom_type: EventType, claim: str | None) -> None:
        """A report on an open attempt or on any attempt ever open (superseded, timed out, of a
        closed run), maybe with a skewed run id or attempt, from a worker that claimed the
        attempt (`claim`: a "started" report is then the claim) or not."""
        attempts = sorted(self.open_attempts if which == "open" and self.open_attempts else self.seen_attempts)
        x, run, activity_id, attempt = attempts[pick % len(attempts)]
        if skew == "run":
            run = "no-such-run"
        elif skew == "attempt+1":
            attempt += 1
        elif skew == "attempt-1":
            attempt -= 1
        ids = {"activity_id": activity_id, "workflow_run_id": run, "attempt": attempt, "claim_id": claim}
        payload: Any = {
            "started": lambda: m.ReportActivityTaskStarted(**ids),
            "complete": lambda: m.CompleteActivityTask(**ids, result_json="1"),
            "fail": lambda: m.FailActivityTask(**ids, failure=failure),
            "heartbeat": lambda: m.RecordActivityHeartbeat(**ids),
            "custom": lambda: m.RecordCustomTaskEvent(**ids, event_type=custom_type, custom_task_id="ct",
                                                      custom_task_type="t",
                                                      failure=failure if custom_type is T.CUSTOM_TASK_FAILED
                                                      else None),
        }[kind]()
        self.apply(self.command(x, payload))

    @rule(lag=st.sampled_from([0, 0, 500, 5000, 60_000]))
    def commands_wait(self, lag: int) -> None:
        """The next commands waited `lag` ms in the commands topic (an outage): their own
        timestamps are that much older than the decision time."""
        self.lag = lag

    @rule(advance=st.sampled_from([0, 1, 999, 1000, 2000, 5000, 10_000, 30_000]),
          tick=st.sampled_from([True, True, False]))
    def time_passes(self, advance: int, tick: bool) -> None:
        """The clock advances; the processor ticks (or not: later commands carry a later time)."""
        self.now += advance
        if tick:
            self.apply(self.command("", m.Tick(now=at(self.now)), root=""))

    @rule(to=st.sampled_from([*POOL, "ghost"]),
          kind=st.sampled_from(["signal", "cancel", "terminate", "start", "start-bad-root",
                                "bogus-task", "bogus-task-failure", "bogus-activity"]))
    def client_or_bogus(self, to: str, kind: str) -> None:
        """Client requests to any id (running, closed or unknown), a top-level start of any id
        (rejected while running or with a root not its own), or reports with ids that never existed."""
        state = self.states.get(to)
        run = state.context.workflow_run_id if state is not None else "no-such-run"
        payload: Any = {
            "signal": lambda: m.SignalWorkflowExecution(signal_name="sig", input_json="1"),
            "cancel": lambda: m.RequestCancelWorkflowExecution(reason="client"),
            "terminate": lambda: m.TerminateWorkflowExecution(reason="client"),
            "start": lambda: m.StartWorkflowExecution(workflow_name="wf", task_queue="q", execution_timeout_ms=3000),
            "start-bad-root": lambda: m.StartWorkflowExecution(workflow_name="wf", task_queue="q"),
            "bogus-task": lambda: m.CompleteWorkflowTask(task_id="no-such-task", workflow_run_id=run,
                                                         history_length=1, decisions=[m.CompleteWorkflowExecution()]),
            "bogus-task-failure": lambda: m.FailWorkflowTask(task_id="no-such-task", workflow_run_id=run, cause="X",
                                                             failure=m.Failure(type="X", message="x")),
            "bogus-activity": lambda: m.CompleteActivityTask(activity_id="no-such-activity", workflow_run_id=run,
                                                             attempt=1),
        }[kind]()
        root = to if kind == "start" else ("elsewhere" if kind == "start-bad-root" else ROOT)
        self.apply(self.command(to, payload, root=root))

    @precondition(lambda self: self.processed)
    @rule(back=st.integers(1, 6))
    def redeliver(self, back: int) -> None:
        """A recent command again (same command id): a crash before the offset commit.

        Limited to commands sent to the current run of their target: across a new run
        the engine forgets command ids (see test_redelivery_after_a_new_run_appends_nothing).
        Ticks are never re-delivered: the processor's clock makes them (each with a new id),
        they are not read from the commands topic; a later tick firing a timer the first
        one could not see is right."""
        index = max(0, len(self.processed) - back)
        command, appended = self.processed[index]
        if index < self.run_started_at.get(command.workflow_exec_id, 0) or isinstance(command.payload, m.Tick):
            return
        if not appended:
            # A command that appended nothing (a rejected start, a report for an attempt
            # that did not exist yet) leaves no trace in the state, so the core cannot
            # know it was seen: the processor skips re-delivered commands by the offsets
            # its events record (test_durability.py::
            # test_a_second_processor_group_rereading_every_command_appends_nothing).
            return
        self.apply(command, redelivery=True)


SETTINGS = settings(max_examples=200, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ------------------------------------------------------------------ invariant 1

class StateIsFoldOfEvents(TreeMachine):
    def __init__(self) -> None:
        super().__init__()
        self.topic: list[Event] = []  # the log as read back from the events topic (Avro round trip)
        self.rebuilt: dict[str, ExecutionState] = {}  # fold(self.topic)

    def on_command(self, before, command, outcome, after, redelivery):
        # The states after one command are its events folded onto the states before.
        assert_same_states(fold(outcome.events, before), after, "fold(command's events, before)")
        # A processor rebuilt from the events topic decides the same (given the live heartbeats).
        assert_same_states(self.rebuilt, before, "fold(events topic)")
        assert process(with_heartbeats(self.rebuilt, before), command, now=at(self.now)).events == outcome.events, \
            "a state rebuilt from the events decides differently"
        decoded = [EVENTS.decode(EVENTS.encode(e)) for e in outcome.events]
        self.topic.extend(decoded)
        self.rebuilt = fold(decoded, self.rebuilt)

    @invariant()
    def states_equal_fold(self):
        assert_same_states(fold(self.log), self.states, "fold(all events)")
        assert_same_states(fold(self.topic), self.states, "fold(events read back from Avro)")

    @invariant()
    def fold_in_one_go_equals_event_by_event(self):
        stepwise: dict[str, ExecutionState] = {}
        for e in self.log:
            stepwise[exec_of(e)] = evolve(stepwise.get(exec_of(e)), e)
        assert_same_states(fold(self.log), stepwise, "event by event")
        half = len(self.log) // 2
        assert_same_states(fold(self.log[half:], fold(self.log[:half])), stepwise, "in two chunks")

    @invariant()
    def partition_engine_replay_equals_live(self):
        engine = PartitionEngine(0)
        engine.replay(self.topic, at(self.now))
        assert_same_states(engine.states, self.states, "PartitionEngine.replay(events)")


# ------------------------------------------------------------------ invariant 2

class ReprocessingAppendsNothing(TreeMachine):
    def on_command(self, before, command, outcome, after, redelivery):
        if redelivery:
            assert outcome.events == [], f"re-delivered {command.command_id} appended {summary(outcome.events)}"
        # Against the state right after it: nothing, and no state change.
        again = process(after, command, now=at(self.now))
        assert again.events == [], f"{command.command_id} processed twice appended {summary(again.events)}"
        assert all(after[x] == s for x, s in again.states.items())
        # Same command, same state: the same events, replies and states (ids, timestamps, payloads),
        # also on copies of the states, in a view iterated in another order.
        twin = process({x: dataclasses.replace(s) for x, s in reversed(before.items())}, command, now=at(self.now))
        assert twin.events == outcome.events, "deciding twice gave different events"
        assert twin.replies == outcome.replies
        assert twin.states == outcome.states
        for i, e in enumerate(outcome.events):
            assert e.event_id == f"{command.command_id}:{i}", f"event id {e.event_id} not derived from the command"
            # The decision time, not the command's (older, when it waited: invariant 6).
            assert e.timestamp == at(self.now), f"{e.event_id}: timestamp not the decision time"


# ------------------------------------------------------------------ invariant 3

class TreeIsTotallyOrdered(TreeMachine):
    @invariant()
    def log_is_well_ordered(self):
        check_log(self.log)


# ------------------------------------------------------------------ invariant 4

class ClosePoliciesReachEveryChild(TreeMachine):
    def on_command(self, before, command, outcome, after, redelivery):
        check_close_policies(before, command, outcome.events)

    @invariant()
    def open_children_are_tracked(self):
        check_children_tracked(self.states)


# ------------------------------------------------------------------ property 5

class StaleReportsEmitNothing(TreeMachine):
    def apply(self, command: Command, redelivery: bool = False) -> None:
        self.claims_before = dict(self.claims)
        super().apply(command, redelivery)

    def on_command(self, before, command, outcome, after, redelivery):
        p = command.payload
        if is_claim(command):
            # Invariant 5: a claim is granted exactly while its attempt is open.
            key = (command.workflow_exec_id, p.workflow_run_id, p.activity_id, p.attempt)
            assert [r.accepted for r in outcome.replies] == [key in self.open_attempts], \
                f"claim of {key} answered {outcome.replies} (open: {key in self.open_attempts})"
        if isinstance(p, (*TASK_REPORTS, *ACTIVITY_REPORTS)) and not redelivery:
            current = report_is_current(before, command, self.open_attempts, self.claims_before)
            if not current:
                assert outcome.events == [], f"stale {type(p).__name__} emitted {summary(outcome.events)}"
                assert all(before.get(x) == s for x, s in outcome.states.items()), "stale report changed a state"
            elif isinstance(p, (m.CompleteActivityTask, m.FailActivityTask, *TASK_REPORTS)):
                assert outcome.events, f"current {type(p).__name__} emitted nothing"
            if isinstance(p, m.RecordCustomTaskEvent) and not p.event_type.value.startswith("CUSTOM_TASK_"):
                assert outcome.events == []
        # Awaited outcomes wake the workflow (a final ACTIVITY_TASK_TIMED_OUT does not: engine
        # bug, see test_final_activity_timeout_wakes_the_workflow).
        for e in outcome.events:
            state = after[exec_of(e)]
            if e.event_type in AWAITED_OUTCOMES and state.open and state.context.workflow_run_id == run_of(e):
                assert state.workflow_task is not None, f"{e.event_id} {e.event_type.value} did not wake {exec_of(e)}"

    @invariant()
    def open_attempts_match_state(self):
        in_state = {(x, s.context.workflow_run_id, a.activity_id, a.attempt)
                    for x, s in self.states.items() if s.open for a in s.activities.values()}
        assert in_state == self.open_attempts


TestInvariant1StateIsFoldOfEvents = StateIsFoldOfEvents.TestCase
TestInvariant2ReprocessingAppendsNothing = ReprocessingAppendsNothing.TestCase
TestInvariant3TreeIsTotallyOrdered = TreeIsTotallyOrdered.TestCase
TestInvariant4ClosePoliciesReachEveryChild = ClosePoliciesReachEveryChild.TestCase
TestProperty5StaleReportsEmitNothing = StaleReportsEmitNothing.TestCase
for _case in (TestInvariant1StateIsFoldOfEvents, TestInvariant2ReprocessingAppendsNothing,
              TestInvariant3TreeIsTotallyOrdered, TestInvariant4ClosePoliciesReachEveryChild,
              TestProperty5StaleReportsEmitNothing):
    _case.settings = SETTINGS
del _case


# ------------------------------------------------------------------ example-based tests

class Tree:
    """A small driver of `process` over one tree, with the full tree as the view."""

    def __init__(self) -> None:
        self.states: dict[str, ExecutionState] = {}
        self.log: list[Event] = []
        self.count = 0

    def send(self, exec_id: str, payload: Any, ms: int = 0, command_id: str | None = None,
             view: dict[str, ExecutionState] | None = None) -> list[Event]:
        self.count += 1
        command = Command(command_id=command_id or f"k{self.count}", timestamp=at(ms),
                          root_workflow_exec_id=ROOT, workflow_exec_id=exec_id, payload=payload)
        before = dict(self.states)
        outcome = process(before if view is None else view, command)
        check_close_policies(before, command, outcome.events)
        self.states = {**before, **outcome.states}
        self.log.extend(outcome.events)
        check_log(self.log)
        return outcome.events

    def start(self, timeout: int | None = None, ms: int = 0) -> list[Event]:
        return self.send(ROOT, m.StartWorkflowExecution(workflow_name="wf", task_queue="q",
                                                        execution_timeout_ms=timeout), ms)

    def task(self, exec_id: str, decisions: list[Any], ms: int = 0) -> list[Event]:
        s = self.states[exec_id]
        assert s.workflow_task is not None, f"{exec_id} has no workflow task"
        return self.send(exec_id, m.CompleteWorkflowTask(task_id=s.workflow_task.task_id,
                                                         workflow_run_id=s.context.workflow_run_id,
                                                         history_length=s.last_sequence, decisions=decisions), ms)

    def tick(self, ms: int) -> list[Event]:
        return self.send("", m.Tick(now=at(ms)), ms)

    def fail_activity(self, exec_id: str, activity_id: str, ms: int) -> list[Event]:
        s = self.states[exec_id]
        return self.send(exec_id, m.FailActivityTask(
            activity_id=activity_id, workflow_run_id=s.context.workflow_run_id,
            attempt=s.activities[activity_id].attempt, failure=m.Failure(type="Boom", message="boom")), ms)


def child(exec_id: str, policy: P = P.TERMINATE, timeout: int | None = None) -> m.StartChildWorkflowExecution:
    return m.StartChildWorkflowExecution(child_workflow_exec_id=exec_id, child_workflow_name="child", task_queue="q",
                                         parent_close_policy=policy, execution_timeout_ms=timeout)


def types(events: list[Event], exec_id: str | None = None) -> list[str]:
    return [e.event_type.value for e in events if exec_id is None or exec_of(e) == exec_id]


def test_child_started_and_parent_completed_in_one_task_terminates_the_child():
    tree = Tree()
    tree.start()
    events = tree.task(ROOT, [child("c1"), m.CompleteWorkflowExecution(result_json="1")])
    assert summary(events) == [
        "root#2:WORKFLOW_TASK_COMPLETED", "root#3:START_CHILD_WORKFLOW_EXECUTION_INITIATED",
        "c1#1:WORKFLOW_EXECUTION_STARTED", "root#4:CHILD_WORKFLOW_EXECUTION_STARTED",
        "root#5:PARENT_CLOSE_POLICY_APPLIED", "root#6:WORKFLOW_EXECUTION_COMPLETED",
        "c1#2:WORKFLOW_EXECUTION_TERMINATED"]
    assert tree.states["c1"].status is Status.TERMINATED
    assert tree.states[ROOT].status is Status.COMPLETED


@pytest.mark.parametrize("policy", [p for p in P if p is not P.UNSPECIFIED])
def test_close_policies_reach_grandchildren_started_in_the_same_instant(policy):
    tree = Tree()
    tree.start()
    tree.task(ROOT, [child("c1", P.TERMINATE)])
    tree.task("c1", [child("g1", policy), child("g2", P.TERMINATE)])
    events = tree.send(ROOT, m.TerminateWorkflowExecution(reason="stop"))
    assert tree.states["c1"].status is Status.TERMINATED
    assert tree.states["g2"].status is Status.TERMINATED
    g1 = tree.states["g1"]
    assert {P.TERMINATE: g1.status is Status.TERMINATED,
            P.REQUEST_CANCEL: g1.open and g1.cancel_requested and g1.workflow_task is not None,
            P.ABANDON: g1.open and not g1.cancel_requested}[policy]
    assert types(events, "c1")[:3] == ["PARENT_CLOSE_POLICY_APPLIED", "PARENT_CLOSE_POLICY_APPLIED",
                                       "WORKFLOW_EXECUTION_TERMINATED"]


def test_child_completes_at_the_parents_deadline_before_the_tick():
    """Ordering made explicit: the child's completion (timestamp == parent's deadline) is
    processed first, so the parent hears of it and then times out with no open child."""
    tree = Tree()
    tree.start(timeout=10_000)
    tree.task(ROOT, [child("c1")])
    tree.task("c1", [m.CompleteWorkflowExecution(result_json="1")], ms=10_000)
    assert types(tree.log[-2:]) == ["WORKFLOW_EXECUTION_COMPLETED", "CHILD_WORKFLOW_EXECUTION_COMPLETED"]
    events = tree.tick(10_000)
    assert summary(events) == [f"root#{tree.states[ROOT].last_sequence}:WORKFLOW_EXECUTION_TIMED_OUT"]
    assert tree.states["c1"].status is Status.COMPLETED


def test_child_completion_after_the_tick_that_timed_out_the_parent_is_stale():
    tree = Tree()
    tree.start(timeout=9000)
    tree.task(ROOT, [child("c1")])
    stale = tree.states["c1"]
    events = tree.tick(9000)
    assert types(events) == ["PARENT_CLOSE_POLICY_APPLIED", "WORKFLOW_EXECUTION_TIMED_OUT",
                             "WORKFLOW_EXECUTION_TERMINATED"]
    late = tree.send("c1", m.CompleteWorkflowTask(task_id=stale.workflow_task.task_id,
                                                  workflow_run_id=stale.context.workflow_run_id,
                                                  history_length=1, decisions=[m.CompleteWorkflowExecution()]),
                     ms=9000)
    assert late == []
    assert tree.states["c1"].status is Status.TERMINATED


@pytest.mark.parametrize("child_id, child_first", [("a-child", True), ("z-child", False)])
def test_child_and_parent_deadlines_fire_in_the_same_tick(child_id, child_first):
    """Both deadlines fall in one tick; the tick visits executions in id order. Either the
    child times out first (the parent hears of it, then times out with no open child) or
    the parent does (its TERMINATE policy ends the child, which then does not time out)."""
    tree = Tree()
    tree.start(timeout=10_000)
    tree.task(ROOT, [child(child_id, timeout=10_000)])
    events = tree.tick(10_000)
    if child_first:
        assert [(exec_of(e), e.event_type.value) for e in events] == [
            (child_id, "WORKFLOW_EXECUTION_TIMED_OUT"), (ROOT, "CHILD_WORKFLOW_EXECUTION_TIMED_OUT"),
            (ROOT, "WORKFLOW_EXECUTION_TIMED_OUT")]
    else:
        assert [(exec_of(e), e.event_type.value) for e in events] == [
            (ROOT, "PARENT_CLOSE_POLICY_APPLIED"), (ROOT, "WORKFLOW_EXECUTION_TIMED_OUT"),
            (child_id, "WORKFLOW_EXECUTION_TERMINATED")]
    closing = [e for e in tree.log if exec_of(e) == child_id and e.event_type in CLOSING]
    assert len(closing) == 1
    assert not tree.states[ROOT].open and not tree.states[child_id].open
    assert tree.tick(10_000) == []


@pytest.mark.parametrize("coefficient, maximum_interval, expected", [
    (3.0, None, [1000, 3000, 9000]),
    (10.0, 5000, [1000, 5000, 5000]),
])
def test_activity_retry_backoff_grows_by_the_coefficient_and_stops_at_maximum_attempts(
        coefficient, maximum_interval, expected):
    tree = Tree()
    tree.start()
    policy = m.RetryPolicy(initial_interval_ms=1000, backoff_coefficient=coefficient,
                           maximum_interval_ms=maximum_interval, maximum_attempts=4)
    tree.task(ROOT, [m.ScheduleActivityTask(activity_id="a", activity_name="act", task_queue="q",
                                            retry_policy=policy)])
    now, backoffs = 0, []
    for attempt in (1, 2, 3):
        events = tree.fail_activity(ROOT, "a", now)
        retrying = [e for e in events if e.event_type is T.ACTIVITY_TASK_RETRYING]
        assert len(retrying) == 1 and retrying[0].attempt == attempt
        assert retrying[0].payload.next_attempt == attempt + 1
        backoffs.append(retrying[0].payload.backoff_ms)
        activity = tree.states[ROOT].activities["a"]
        assert activity.attempt == attempt + 1
        assert activity.ready_at == at(now + backoffs[-1])
        now += backoffs[-1]
    assert backoffs == expected
    events = tree.fail_activity(ROOT, "a", now)
    assert types(events) == ["ACTIVITY_TASK_STARTED", "ACTIVITY_TASK_FAILED"]
    assert events[-1].attempt == 4
    assert "a" not in tree.states[ROOT].activities
    assert tree.states[ROOT].workflow_task is not None


def test_activity_start_to_close_timeouts_retry_with_the_same_backoff():
    tree = Tree()
    tree.start()
    policy = m.RetryPolicy(initial_interval_ms=1000, backoff_coefficient=2.0, maximum_attempts=3)
    tree.task(ROOT, [m.ScheduleActivityTask(activity_id="a", activity_name="act", task_queue="q",
                                            retry_policy=policy, start_to_close_timeout_ms=500)])
    assert tree.tick(499) == []
    assert types(tree.tick(500)) == ["ACTIVITY_TASK_TIMED_OUT", "ACTIVITY_TASK_RETRYING"]
    assert tree.log[-1].payload.backoff_ms == 1000
    # attempt 2 is ready at 1500 and times out at 2000
    assert tree.tick(1999) == []
    assert types(tree.tick(2000)) == ["ACTIVITY_TASK_TIMED_OUT", "ACTIVITY_TASK_RETRYING"]
    assert tree.log[-1].payload.backoff_ms == 2000
    events = tree.tick(4500)  # attempt 3 was ready at 4000: out of attempts
    assert types(events) == ["ACTIVITY_TASK_TIMED_OUT"] and events[0].payload.will_retry is False
    assert tree.states[ROOT].activities == {}


def test_execution_timeout_closes_the_run_and_notifies_the_parent():
    tree = Tree()
    tree.start()
    tree.task(ROOT, [child("c1", timeout=5000)])
    tree.task(ROOT, [])
    tree.task("c1", [m.StartTimer(timer_id="t", duration_ms=60_000)])
    assert tree.states[ROOT].workflow_task is None
    assert tree.tick(4999) == []
    events = tree.tick(5000)
    assert [(exec_of(e), e.event_type.value) for e in events] == [
        ("c1", "WORKFLOW_EXECUTION_TIMED_OUT"), (ROOT, "CHILD_WORKFLOW_EXECUTION_TIMED_OUT")]
    assert events[0].payload.execution_timeout_ms == 5000
    assert tree.states["c1"].status is Status.TIMED_OUT and tree.states["c1"].timers == {}
    assert tree.states[ROOT].children == {} and tree.states[ROOT].workflow_task is not None


def test_execution_timeout_counts_from_the_first_run_across_continue_as_new():
    tree = Tree()
    tree.start(timeout=5000)
    tree.task(ROOT, [m.ContinueAsNewWorkflowExecution()], ms=3000)
    assert tree.states[ROOT].open and tree.states[ROOT].first_sequence == 4
    assert types(tree.tick(5000)) == ["WORKFLOW_EXECUTION_TIMED_OUT"]
    assert [e.sequence for e in tree.log] == [1, 2, 3, 4, 5]


def test_stale_reports_emit_nothing():
    tree = Tree()
    tree.start()
    tree.task(ROOT, [m.ScheduleActivityTask(activity_id="a", activity_name="act", task_queue="q",
                                            start_to_close_timeout_ms=1000)])
    run = tree.states[ROOT].context.workflow_run_id
    old_task = tree.log[1].payload.task_id
    tree.tick(1000)  # attempt 1 times out, attempt 2 is scheduled
    assert tree.states[ROOT].activities["a"].attempt == 2
    for payload in (m.CompleteActivityTask(activity_id="a", workflow_run_id=run, attempt=1),
                    m.FailActivityTask(activity_id="a", workflow_run_id=run, attempt=1,
                                       failure=m.Failure(type="X", message="x")),
                    m.ReportActivityTaskStarted(activity_id="a", workflow_run_id=run, attempt=1),
                    m.CompleteActivityTask(activity_id="a", workflow_run_id="other-run", attempt=2),
                    m.CompleteWorkflowTask(task_id=old_task, workflow_run_id=run, history_length=2,
                                           decisions=[m.CompleteWorkflowExecution()])):
        assert tree.send(ROOT, payload, ms=1000) == [], payload
    tree.send(ROOT, m.TerminateWorkflowExecution(reason="x"), ms=1000)
    assert tree.send(ROOT, m.CompleteActivityTask(activity_id="a", workflow_run_id=run, attempt=2), ms=1000) == []


# ------------------------------------------------------------------ bugs these tests found, fixed

def test_decisions_after_continue_as_new_are_ignored():
    tree = Tree()
    tree.start()
    first_run = tree.states[ROOT].context.workflow_run_id
    events = tree.task(ROOT, [m.ContinueAsNewWorkflowExecution(), m.ContinueAsNewWorkflowExecution(),
                              m.ScheduleActivityTask(activity_id="a", activity_name="act", task_queue="q")])
    assert types(events) == ["WORKFLOW_TASK_COMPLETED", "WORKFLOW_EXECUTION_CONTINUED_AS_NEW",
                             "WORKFLOW_EXECUTION_STARTED"]
    assert tree.states[ROOT].context.workflow_run_id != first_run


@pytest.mark.parametrize("timeouts", [{"start_to_close_timeout_ms": 1000},
                                      {"schedule_to_close_timeout_ms": 1000}])
def test_final_activity_timeout_wakes_the_workflow(timeouts):
    tree = Tree()
    tree.start()
    tree.task(ROOT, [m.ScheduleActivityTask(activity_id="a", activity_name="act", task_queue="q",
                                            retry_policy=m.RetryPolicy(maximum_attempts=1), **timeouts)])
    events = tree.tick(1000)
    assert types(events) == ["ACTIVITY_TASK_TIMED_OUT"] and events[0].payload.will_retry is False
    assert tree.states[ROOT].workflow_task is not None, "the workflow is never told its activity timed out"


@pytest.mark.parametrize("new_run", ["continue-as-new", "restart"])
def test_redelivery_after_a_new_run_appends_nothing(new_run):
    tree = Tree()
    tree.start()
    if new_run == "continue-as-new":
        tree.send(ROOT, m.SignalWorkflowExecution(signal_name="s"), command_id="signal")
        tree.task(ROOT, [m.ContinueAsNewWorkflowExecution()])
        redelivered = Command(command_id="signal", timestamp=EPOCH, root_workflow_exec_id=ROOT,
                              workflow_exec_id=ROOT, payload=m.SignalWorkflowExecution(signal_name="s"))
    else:
        tree.send(ROOT, m.TerminateWorkflowExecution(reason="x"), command_id="terminate")
        tree.start()
        redelivered = Command(command_id="terminate", timestamp=EPOCH, root_workflow_exec_id=ROOT,
                              workflow_exec_id=ROOT, payload=m.TerminateWorkflowExecution(reason="x"))
    again = process(tree.states, redelivered)
    assert summary(again.events) == []


def _engine_tree(parent_timeout: int | None, child_timeout: int | None) -> tuple[PartitionEngine, list[Event]]:
    """Through PartitionEngine: a root and one TERMINATE child, both idle (no task, timer
    or activity pending) after t=0, and a tick at 11 s that fires nothing."""
    engine, log = PartitionEngine(0), []

    def send(exec_id: str, payload: Any) -> None:
        command = Command(command_id=f"k{len(log)}", timestamp=EPOCH, root_workflow_exec_id=ROOT,
                          workflow_exec_id=exec_id, payload=payload)
        log.extend(engine.handle(command, EPOCH).events)

    def task(exec_id: str, decisions: list[Any]) -> None:
        s = engine.states[exec_id]
        send(exec_id, m.CompleteWorkflowTask(task_id=s.workflow_task.task_id, workflow_run_id=s.context.workflow_run_id,
                                             history_length=s.last_sequence, decisions=decisions))

    send(ROOT, m.StartWorkflowExecution(workflow_name="wf", task_queue="q", execution_timeout_ms=parent_timeout))
    task(ROOT, [child("c1", P.TERMINATE, timeout=child_timeout)])
    task(ROOT, [])
    task("c1", [])
    assert engine.tick(at(11_000), "tick-0").events == []
    return engine, log


def test_engine_tick_notifies_an_idle_parent_of_its_childs_timeout():
    engine, log = _engine_tree(parent_timeout=None, child_timeout=30_000)
    events = engine.tick(at(31_000), "tick-1").events
    log.extend(events)
    assert engine.states["c1"].status is Status.TIMED_OUT
    assert types(events) == ["WORKFLOW_EXECUTION_TIMED_OUT", "CHILD_WORKFLOW_EXECUTION_TIMED_OUT"]


def test_engine_tick_applies_close_policies_to_idle_children():
    engine, log = _engine_tree(parent_timeout=30_000, child_timeout=None)
    events = engine.tick(at(31_000), "tick-1").events
    log.extend(events)
    assert types(events) == ["PARENT_CLOSE_POLICY_APPLIED", "WORKFLOW_EXECUTION_TIMED_OUT",
                             "WORKFLOW_EXECUTION_TERMINATED"]
    assert engine.states["c1"].status is Status.TERMINATED


def test_recovery_gives_heartbeating_activities_a_fresh_heartbeat():
    """Heartbeats are not events: the fold does not know the last one, so a recovered
    processor counts the heartbeat timeout from the recovery instead of timing out an
    activity that was heartbeating to the processor that went away."""
    tree = Tree()
    tree.start()
    tree.task(ROOT, [m.ScheduleActivityTask(activity_id="a", activity_name="act", task_queue="q",
                                            heartbeat_timeout_ms=1000, start_to_close_timeout_ms=60_000)])
    run = tree.states[ROOT].context.workflow_run_id
    tree.send(ROOT, m.ReportActivityTaskStarted(activity_id="a", workflow_run_id=run, attempt=1), ms=0)
    tree.send(ROOT, m.RecordActivityHeartbeat(activity_id="a", workflow_run_id=run, attempt=1), ms=900)
    tick = Command(command_id="tick", timestamp=at(1500), root_workflow_exec_id="", workflow_exec_id="",
                   payload=m.Tick(now=at(1500)))
    live = process(tree.states, tick).events
    assert live == []
    folded = process(fold(tree.log), tick).events
    assert types(folded) == ["ACTIVITY_TASK_TIMED_OUT", "ACTIVITY_TASK_RETRYING"], "the fold alone would time it out"
    recovered = PartitionEngine(0)
    recovered.replay(tree.log, at(1200))
    assert recovered.tick(at(1500), "tick-a").events == [], "nothing time-based before the backlog is decided"
    recovered.resume(at(1200))
    assert recovered.tick(at(1500), "tick-a").events == live
    assert types(recovered.tick(at(2200), "tick-b").events) == ["ACTIVITY_TASK_TIMED_OUT", "ACTIVITY_TASK_RETRYING"]
