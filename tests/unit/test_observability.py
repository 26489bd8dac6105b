"""Pure parts of metrics, export cursors and the schema-registry framing (no broker)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from treeflow.consumers.cursor import Cursor
from treeflow.consumers.export import ExportCursor, ExportError
from treeflow.observability import metrics
from treeflow.observability.http import METRICS_PORT_ENV, metrics_port
from treeflow.schemas import EVENTS, EventType
from treeflow.schemas.confluent import frame, schema_id_of, subject
from tests.samples import context, event_of


def test_the_metrics_port_comes_from_the_flag_then_the_variable(monkeypatch) -> None:
    monkeypatch.delenv(METRICS_PORT_ENV, raising=False)
    assert metrics_port(None) is None
    monkeypatch.setenv(METRICS_PORT_ENV, "9100")
    assert metrics_port(None) == 9100
    assert metrics_port(0) == 0
    monkeypatch.setenv(METRICS_PORT_ENV, "ninety")
    with pytest.raises(ValueError, match=METRICS_PORT_ENV):
        metrics_port(None)


def test_an_export_cursor_is_the_next_position_of_each_partition() -> None:
    cursor = ExportCursor({0: 17, 3: 0})
    assert str(cursor) == f"{Cursor(0, 17)},{Cursor(3, 0)}"
    assert ExportCursor.parse(str(cursor)) == cursor
    assert ExportCursor.parse(None) == ExportCursor()
    for bad, message in (("soon", "not a cursor"), ("1,1", "twice"), (",", "not an export cursor")):
        with pytest.raises(ExportError, match=message):
            ExportCursor.parse(bad)


def test_sourced_gauges_sum_their_sources_at_scrape_time() -> None:
    gauge = metrics.SourcedGauge("treeflow_test_sourced", "test", ["queue"])
    try:
        first, second = (lambda: {("a",): 1.0}), (lambda: {("a",): 2.0, ("b",): 5.0})
        gauge.add(first)
        gauge.add(second)
        assert REGISTRY.get_sample_value("treeflow_test_sourced", {"queue": "a"}) == 3.0
        gauge.remove(second)
        assert REGISTRY.get_sample_value("treeflow_test_sourced", {"queue": "b"}) is None
    finally:
        REGISTRY.unregister(gauge)


def test_events_are_counted_by_type_and_activity() -> None:
    ctx = context("r", "r")
    events = [event_of(EventType.ACTIVITY_TASK_STARTED, ctx, 1), event_of(EventType.ACTIVITY_TASK_TIMED_OUT, ctx, 2)]
    name = events[0].payload.activity_name
    timeout_type = events[1].payload.timeout_type

    def sample(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, labels) or 0.0

    before = (sample("treeflow_events_appended_total", type="ACTIVITY_TASK_STARTED"),
              sample("treeflow_activity_attempts_total", activity=name),
              sample("treeflow_activity_timeouts_total", activity=events[1].payload.activity_name,
                     timeout_type=timeout_type))
    metrics.count_events(events)
    after = (sample("treeflow_events_appended_total", type="ACTIVITY_TASK_STARTED"),
             sample("treeflow_activity_attempts_total", activity=name),
             sample("treeflow_activity_timeouts_total", activity=events[1].payload.activity_name,
                    timeout_type=timeout_type))
    assert [b + 1 for b in before] == list(after)


def test_confluent_framing_is_magic_byte_and_big_endian_schema_id() -> None:
    assert frame(258, b"body") == b"\x00\x00\x00\x01\x02body"
    assert schema_id_of(frame(258, b"")) == 258
    assert schema_id_of(EVENTS.encode(event_of(EventType.TIMER_FIRED, context("r", "r"), 1))) is None
    assert subject("treeflow.events") == "treeflow.events-value"
