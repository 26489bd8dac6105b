"""Snapshots and retention (DESIGN.md §5 invariants 1 and 7), without a broker.

The fold of a snapshot (through its Avro records) plus the events after it equals the
fold of the whole partition: property-tested over the command sequences of
test_core_properties' tree machine, cut at any point; and with closed executions
forgotten after the retention, driven through `PartitionEngine`.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from treeflow.processor.engine import PartitionEngine, PartitionImage
from treeflow.processor.snapshots import closed_state, encode_chunks, open_image
from treeflow.schemas import SNAPSHOTS, Command, Event
from treeflow.schemas import models as m

from .test_core_properties import ROOT, SETTINGS, TreeMachine, assert_same_states, at

FOREVER = timedelta(days=3650)


def through_avro(image: PartitionImage, chunk_bytes: int = 512 * 1024) -> PartitionImage:
    """The image written as snapshot chunks and read back."""
    opened, closed = [], []
    for data in encode_chunks(3, "s1", image, chunk_bytes):
        chunk = SNAPSHOTS.decode(data).payload
        assert isinstance(chunk, m.SnapshotChunk)
        opened += [open_image(record) for record in chunk.open_executions]
        closed += [closed_state(record) for record in chunk.closed_executions]
    return PartitionImage(opened, closed)


def assert_same_engines(a: PartitionEngine, b: PartitionEngine, what: str, live: bool = False) -> None:
    """Same states, histories and pending work; and, for two recovered engines, the
    same next wake-up (a live engine's heap also holds stale entries)."""
    assert_same_states(a.states, b.states, what)
    assert a.histories == b.histories, f"{what}: histories differ"
    if live:
        return
    assert a.next_wakeup() == b.next_wakeup(), f"{what}: next wake-up differs"


def snapshot_then_tail(log: list[Event], cut: int, now_ms: int, retention: timedelta = FOREVER,
                       chunk_bytes: int = 512 * 1024) -> PartitionEngine:
    """Snapshot the first `cut` events when the last of them happened, restore at `now_ms`."""
    head = PartitionEngine(0, retention)
    head.replay(log[:cut], log[cut - 1].timestamp if cut else at(0))
    return PartitionEngine.restore(0, through_avro(head.export(), chunk_bytes), log[cut:], at(now_ms), retention)


class SnapshotPlusTailIsFold(TreeMachine):
    @rule(cut=st.floats(0, 1), small_chunks=st.booleans())
    def snapshot_anywhere(self, cut: float, small_chunks: bool) -> None:
        index = int(cut * len(self.log))
        whole = PartitionEngine(0, FOREVER)
        whole.replay(self.log, at(self.now))
        restored = snapshot_then_tail(self.log, index, self.now, chunk_bytes=200 if small_chunks else 512 * 1024)
        assert_same_engines(restored, whole, f"snapshot after {index} of {len(self.log)} events + tail")

    def teardown(self) -> None:
        restored = snapshot_then_tail(self.log, len(self.log), self.now)
        assert_same_states(restored.states, self.states, "snapshot of the whole log")


TestSnapshotPlusTailIsFold = SnapshotPlusTailIsFold.TestCase
TestSnapshotPlusTailIsFold.settings = settings(SETTINGS, max_examples=60)


# ------------------------------------------------------------------ retention


def start(exec_id: str, n: int, ms: int) -> Command:
    return Command(command_id=f"start-{exec_id}-{n}", timestamp=at(ms), root_workflow_exec_id=exec_id,
                   workflow_exec_id=exec_id,
                   payload=m.StartWorkflowExecution(workflow_name="wf", task_queue="q", input_json="1"))


def complete(engine: PartitionEngine, exec_id: str, ms: int) -> Command:
    state = engine.states[exec_id]
    return Command(command_id=f"done-{exec_id}-{ms}", timestamp=at(ms), root_workflow_exec_id=exec_id,
                   workflow_exec_id=exec_id,
                   payload=m.CompleteWorkflowTask(task_id=state.workflow_task.task_id,  # type: ignore[union-attr]
                                                  workflow_run_id=state.context.workflow_run_id,
                                                  history_length=state.last_sequence,
                                                  decisions=[m.CompleteWorkflowExecution(result_json='"ok"')]))


def signal(exec_id: str, ms: int) -> Command:
    return Command(command_id=f"sig-{exec_id}-{ms}", timestamp=at(ms), root_workflow_exec_id=exec_id,
                   workflow_exec_id=exec_id, payload=m.SignalWorkflowExecution(signal_name="s"))


RETENTION = timedelta(seconds=60)


def test_closed_executions_leave_memory_after_the_retention_and_commands_get_the_documented_answers() -> None:
    engine = PartitionEngine(0, RETENTION)
    log: list[Event] = []

    def run(command: Command, ms: int) -> list[m.Reply]:
        effects = engine.handle(command, at(ms))
        log.extend(effects.events)
        return effects.replies

    for i in range(5):
        run(start(f"w{i}", 1, 0), 0)
        run(complete(engine, f"w{i}", 1000), 1000)
    run(start("open", 1, 1000), 1000)
    assert engine.evict_closed(at(30_000)) == 0
    # Within the retention: a signal is rejected as closed; a start of the id continues its history.
    [reply] = run(signal("w0", 30_000), 30_000)
    assert reply.error.type == "WorkflowClosed"
    run(start("w1", 2, 30_000), 30_000)
    assert engine.states["w1"].open and engine.states["w1"].last_sequence == 4
    # After it: forgotten (the open ones stay).
    assert engine.evict_closed(at(61_000)) == 4
    assert set(engine.states) == {"w1", "open"}
    [reply] = run(signal("w0", 61_000), 61_000)
    assert not reply.accepted and reply.error.type == "WorkflowNotFound"
    # A start of a forgotten id begins a new history.
    run(start("w2", 2, 62_000), 62_000)
    assert engine.states["w2"].last_sequence == 1 and engine.states["w2"].recent_commands == ("start-w2-2",)

    # Invariant 1 with the retention: a snapshot (taken after the eviction) plus the
    # tail, and a fold of the whole log, give the live state.
    whole = PartitionEngine(0, RETENTION)
    whole.replay(log, at(62_000))
    assert_same_engines(whole, engine, "fold of the whole log with the retention", live=True)
    for cut in range(len(log) + 1):
        assert_same_engines(snapshot_then_tail(log, cut, 62_000, RETENTION), whole, f"snapshot at {cut}")


def test_an_empty_image_and_a_tiny_chunk_limit_round_trip() -> None:
    assert through_avro(PartitionImage([], [])) == PartitionImage([], [])
    engine = PartitionEngine(0, FOREVER)
    for i in range(20):
        engine.handle(start(f"x{i}", 1, 0), at(0))
    image = engine.export()
    back = through_avro(image, chunk_bytes=1)
    assert back == image
    assert len(encode_chunks(0, "s", image, 1)) == 20  # one execution per chunk at most
    assert ROOT  # the tree machine's ids are not used here


def test_finished_executions_leave_no_wakeups_behind() -> None:
    # Each start schedules a workflow-task deadline 10 s ahead; the execution closes long
    # before it. A processor that runs for months must not hold every such deadline.
    engine = PartitionEngine(0, RETENTION)
    for i in range(5000):
        engine.handle(start(f"w{i}", 1, i), at(i))
        engine.handle(complete(engine, f"w{i}", i), at(i))
        if i % 100 == 0:
            engine.evict_closed(at(i))
    engine.handle(start("open", 1, 5000), at(5000))
    engine.evict_closed(at(5000))
    assert len(engine._due) <= 2048
    engine.prune_wakeups()
    assert engine.next_wakeup() == at(15_000)  # the open one's workflow-task deadline is kept
