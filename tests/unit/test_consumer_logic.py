"""The consumer library's pure logic: cursors, filters, tree tracking, commit ledger, SSE frames, TUI."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import pytest
from rich.console import Console

from treeflow.consumers import Cursor, CursorError, EventFilter, TreeEvent, TreeTracker
from treeflow.consumers.cursor import OFFSET_BITS, cursor_before
from treeflow.consumers.events import TREE_EVENT_MODELS
from treeflow.consumers.ledger import OffsetLedger
from treeflow.consumers.lookup import root_candidates
from treeflow.consumers.service import ServiceOptions, dead_letter_topic_name
from treeflow.consumers import sse
from treeflow.consumers.tui import screen
from treeflow.kafka import KafkaSettings
from treeflow.schemas import PAYLOAD_MODELS, EventType, WorkflowExecutionCompleted
from tests.samples import context, event_of

T = EventType


# ---------------------------------------------------------------- cursors


@pytest.mark.parametrize("partition, offset", [(0, 0), (0, 17), (3, 0), (11, 123_456_789), (4095, 2**48 - 1)])
def test_a_cursor_round_trips_through_its_token(partition: int, offset: int) -> None:
    cursor = Cursor(partition, offset)
    assert Cursor.parse(str(cursor)) == cursor
    assert Cursor.parse(cursor.token) == cursor
    assert int(str(cursor)) == partition * 2**OFFSET_BITS + offset


def test_cursors_grow_with_the_offset_and_plus_one_is_the_next_position() -> None:
    tokens = [Cursor(5, offset).token for offset in (0, 1, 2, 10, 1000)]
    assert tokens == sorted(tokens) and len(set(tokens)) == 5
    assert Cursor.parse(Cursor(5, 9).token + 1) == Cursor(5, 10)
    assert Cursor(5, 10).preceding() == Cursor(5, 9)
    assert Cursor(5, 0).preceding() is None


@pytest.mark.parametrize("bad", ["", "abc", "-1", "1.5", " 12x", True, -3])
def test_what_is_not_a_cursor_is_refused(bad: object) -> None:
    with pytest.raises(CursorError, match="not a cursor"):
        Cursor.parse(bad)  # type: ignore[arg-type]


def test_start_seq_is_inclusive_and_compares_as_an_integer() -> None:
    partition = 3
    assert cursor_before(0, partition) is None  # the beginning
    assert cursor_before(Cursor(1, 99).token, partition) is None  # below the partition: the beginning too
    assert cursor_before(Cursor(3, 0).token, partition) is None
    assert cursor_before(Cursor(3, 8).token, partition) == Cursor(3, 7)  # resume after 7 = start at 8
    with pytest.raises(CursorError, match="another tree"):
        cursor_before(Cursor(4, 0).token, partition)


# ---------------------------------------------------------------- filters


def test_filters_match_every_set_field_and_any_value_within_one() -> None:
    root, child = context("r", "r", name="order"), context("r.c", "r", parent="r", name="payment")
    started, completed = event_of(T.WORKFLOW_EXECUTION_STARTED, child, 1), event_of(T.WORKFLOW_EXECUTION_COMPLETED,
                                                                                     root, 5)
    assert EventFilter().matches_everything and EventFilter().matches(started)
    by_type = EventFilter.of(event_types="workflow_execution_started, WORKFLOW_EXECUTION_FAILED")
    assert by_type.event_types == {T.WORKFLOW_EXECUTION_STARTED, T.WORKFLOW_EXECUTION_FAILED}
    assert by_type.matches(started) and not by_type.matches(completed)
    assert EventFilter.of(event_types=[T.WORKFLOW_EXECUTION_COMPLETED]).matches(completed)
    both = EventFilter.of(workflow_names=["payment", "refund"], parent_workflow_exec_ids="r")
    assert both.matches(started) and not both.matches(completed)
    assert EventFilter.of(workflow_exec_ids="r", root_workflow_exec_ids=["r"]).matches(completed)
    assert not EventFilter.of(workflow_exec_ids="r").matches(started)
    assert EventFilter.of(event_types=[], workflow_names="").matches_everything


def test_an_unknown_event_type_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown event type 'WORKFLOW_EXPLODED'.*WORKFLOW_EXECUTION_STARTED"):
        EventFilter.of(event_types="WORKFLOW_EXPLODED")


# ---------------------------------------------------------------- tree tracking


def initiated(ctx, child_id: str, name: str, sequence: int):
    event = event_of(T.START_CHILD_WORKFLOW_EXECUTION_INITIATED, ctx, sequence)
    return event.model_copy(update={"payload": event.payload.model_copy(
        update={"child_workflow_exec_id": child_id, "child_workflow_name": name})})


def test_a_tree_closes_when_its_root_and_every_descendant_closed_abandoned_ones_included() -> None:
    root, child = context("r", "r", name="root"), context("r.a", "r", parent="r", name="abandoned")
    tracker = TreeTracker("r")
    assert not tracker.closed  # nothing read yet
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_STARTED, root, 1))
    tracker.observe(initiated(root, "r.a", "abandoned", 2))
    assert tracker.executions["r.a"].status == "PENDING" and tracker.open_executions() == ["r", "r.a"]
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_STARTED, child, 1))
    tracker.observe(event_of(T.PARENT_CLOSE_POLICY_APPLIED, root, 3))
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_COMPLETED, root, 4))
    assert not tracker.closed and tracker.open_executions() == ["r.a"]
    node = tracker.observe(event_of(T.WORKFLOW_EXECUTION_TIMED_OUT, child, 2))
    assert node.status == "TIMED_OUT" and tracker.closed
    assert tracker.root is not None and tracker.root.children == ["r.a"]


def test_continue_as_new_closes_a_run_not_the_execution() -> None:
    root = context("r", "r")
    tracker = TreeTracker("r")
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_STARTED, root, 1))
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_CONTINUED_AS_NEW, root, 2))
    assert not tracker.closed and tracker.executions["r"].status == "CONTINUED_AS_NEW"
    next_run = root.model_copy(update={"workflow_run_id": "run-2"})
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_STARTED, next_run, 3))
    assert not tracker.closed and tracker.executions["r"].runs == 2
    assert tracker.executions["r"].workflow_run_id == "run-2"
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_FAILED, next_run, 4))
    assert tracker.closed and tracker.executions["r"].status == "FAILED"


def test_a_child_that_never_started_is_settled_by_its_start_failure() -> None:
    root = context("r", "r")
    tracker = TreeTracker("r")
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_STARTED, root, 1))
    tracker.observe(initiated(root, "r.x", "dup", 2))
    failed = event_of(T.START_CHILD_WORKFLOW_EXECUTION_FAILED, root, 3)
    tracker.observe(failed.model_copy(update={"payload": failed.payload.model_copy(
        update={"child_workflow_exec_id": "r.x"})}))
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_COMPLETED, root, 4))
    assert tracker.executions["r.x"].status == "START_FAILED" and tracker.closed


def test_a_tree_read_from_the_middle_is_never_taken_for_closed() -> None:
    tracker = TreeTracker("r")
    grandchild = context("r.c.g", "r", parent="r.c")
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_STARTED, grandchild, 1))
    tracker.observe(event_of(T.WORKFLOW_EXECUTION_COMPLETED, grandchild, 2))
    assert tracker.executions["r.c"].status == "UNKNOWN" and not tracker.closed


# ---------------------------------------------------------------- offsets to commit


def test_the_ledger_commits_only_up_to_the_first_offset_not_done() -> None:
    ledger = OffsetLedger()
    assert ledger.committable() is None
    for offset in (10, 11, 12, 15):
        ledger.add(offset)
    ledger.done(11)
    ledger.done(15)
    assert ledger.committable() == 10 and ledger.outstanding == 4
    ledger.done(10)
    assert ledger.committable() == 12 and ledger.outstanding == 2
    ledger.done(12)
    assert ledger.committable() == 16 and ledger.outstanding == 0
    with pytest.raises(ValueError, match="must increase"):
        ledger.add(3)


def test_backoff_grows_to_its_bound_and_dead_letter_names_are_valid_topics() -> None:
    options = ServiceOptions(initial_backoff=timedelta(milliseconds=100), backoff_coefficient=3,
                             max_backoff=timedelta(seconds=1))
    assert [options.backoff(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.3, 0.9, 1.0])
    settings = KafkaSettings("localhost:9092", topic_prefix="acme")
    assert dead_letter_topic_name(settings, "billing service/v2") == "acme.dead-letter.billing_service_v2"


def test_root_candidates_are_the_id_and_its_dotted_prefixes() -> None:
    assert root_candidates("r") == ["r"]
    assert root_candidates("r.a1.b2") == ["r", "r.a1", "r.a1.b2"]
    assert root_candidates(".odd.") == [".odd", ".odd."]


# ---------------------------------------------------------------- typed events and SSE frames


def test_every_event_type_has_a_typed_model_and_json_with_its_context() -> None:
    assert set(TREE_EVENT_MODELS) == set(EventType)
    for event_type, model in TREE_EVENT_MODELS.items():
        assert model.model_fields["payload"].annotation is PAYLOAD_MODELS[event_type]
    event = event_of(T.WORKFLOW_EXECUTION_COMPLETED, context("r.c", "r", parent="r"), 4)
    typed = TreeEvent.of(event, Cursor(2, 41))
    assert type(typed) is TREE_EVENT_MODELS[T.WORKFLOW_EXECUTION_COMPLETED]
    assert isinstance(typed.payload, WorkflowExecutionCompleted)
    assert typed.position == Cursor(2, 41) and typed.to_event() == event
    data = json.loads(typed.to_json())
    assert data["cursor"] == str(Cursor(2, 41)) and data["sequence"] == 4
    assert data["workflow_context"]["parent_workflow_exec_id"] == "r"
    assert data["payload"] == json.loads(event.payload.model_dump_json())


def test_sse_frames_carry_id_event_and_one_data_line_per_line() -> None:
    event = TreeEvent.of(event_of(T.TIMER_FIRED, context("r", "r"), 3), Cursor(0, 7))
    text = sse.event_frame(event, retry=1000)
    lines = text.split("\n")
    assert lines[:3] == ["retry: 1000", "id: 7", "event: TIMER_FIRED"]
    assert json.loads(lines[3].removeprefix("data: "))["event_id"] == event.event_id
    assert text.endswith("\n\n") and text.count("\n") == 5
    assert sse.frame("a\nb", event="x") == "event: x\ndata: a\ndata: b\n\n"
    assert sse.error_frame(RuntimeError("broker gone")) == (
        'event: error\ndata: {"error": "RuntimeError", "message": "broker gone"}\n\n')
    assert sse.comment() == ": keep-alive\n\n"


def test_the_tail_screen_draws_the_tree_with_statuses_and_the_latest_events() -> None:
    root, child = context("r", "r", name="order"), context("r.c", "r", parent="r", name="payment")
    tracker = TreeTracker("r")
    events = [event_of(T.WORKFLOW_EXECUTION_STARTED, root, 1), initiated(root, "r.c", "payment", 2),
              event_of(T.WORKFLOW_EXECUTION_STARTED, child, 1), event_of(T.WORKFLOW_EXECUTION_FAILED, child, 2)]
    for event in events:
        tracker.observe(event)
    console = Console(record=True, width=120, color_system=None)
    console.print(screen(tracker, [TreeEvent.of(e, Cursor(0, n)) for n, e in enumerate(events)]))
    lines = console.export_text().splitlines()
    assert lines[0].startswith("order  r  RUNNING  START_CHILD_WORKFLOW_EXECUTION_INITIATED")
    assert lines[1].startswith("└── payment  r.c  FAILED  WORKFLOW_EXECUTION_FAILED")
    assert sum("WORKFLOW_EXECUTION_STARTED" in line for line in lines) == 2
    assert lines[-1] == "following… (Ctrl-C to stop)"
    waiting = Console(record=True, width=80, color_system=None)
    waiting.print(screen(TreeTracker("later"), []))
    assert "waiting for later to start" in waiting.export_text()


def test_importing_the_library_loads_neither_faust_nor_the_http_server() -> None:
    code = ("import sys, treeflow.consumers, treeflow.consumers.service, treeflow.consumers.cli; "
            "print(sorted(m for m in ('faust', 'starlette', 'uvicorn', 'rich') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

