"""Every Prometheus metric treeflow exports, in one place (the README lists them).

The metrics live in prometheus-client's default registry, beside its process
metrics, so a process serves them all on one `/metrics` (see `treeflow.observability.http`).

The hot paths use label children bound once (`bound`) so that counting an event
costs a dict lookup and an increment. Values that a scrape can read from live
state (consumer lag, open executions, recovered partitions) are not counted on
the hot path at all: components register a `Source` that the scrape calls.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from treeflow.schemas import EventType

#: Latency buckets in seconds, from 50 µs (one decision) to 10 s (a stalled broker).
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)
#: Activity run-time buckets in seconds.
ACTIVITY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

# ---------------------------------------------------------------- the processor

COMMANDS_DECIDED = Counter(
    "treeflow_commands_decided", "Commands the processor decided, by command type (Tick: the clock's).", ["type"])
COMMANDS_SKIPPED = Counter(
    "treeflow_commands_skipped",
    "Commands the processor read but did not decide: redelivered (decided before a lost offset commit), "
    "undecodable, misrouted (keyed for another partition), reassigned (taken before a rebalance, or for a "
    "partition given to another processor: left for its owner to read again).", ["reason"])
EVENTS_APPENDED = Counter("treeflow_events_appended", "Events appended to the events topic, by event type.", ["type"])
DECISION_SECONDS = Histogram(
    "treeflow_decision_seconds", "Time to decide one command (the pure core and the partition's bookkeeping).",
    buckets=LATENCY_BUCKETS)
COMMAND_BATCH_SIZE = Histogram(
    "treeflow_command_batch_size",
    "Commands taken from the commands topic and decided in one pass (the records of a fetch, "
    "or what arrived while the previous pass was decided).",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
APPEND_SECONDS = Histogram(
    "treeflow_append_seconds",
    "Time from queuing one decision batch's events until the broker acknowledged them all.",
    buckets=LATENCY_BUCKETS)
TASKS_DISPATCHED = Counter(
    "treeflow_tasks_dispatched", "Tasks the processor dispatched, by task queue and kind (workflow, activity, query).",
    ["task_queue", "kind"])
ACTIVITY_ATTEMPTS = Counter(
    "treeflow_activity_attempts", "Activity attempts started (ACTIVITY_TASK_STARTED events), by activity.",
    ["activity"])
ACTIVITY_RETRIES = Counter(
    "treeflow_activity_retries", "Activity attempts that failed or timed out and are retried (ACTIVITY_TASK_RETRYING).",
    ["activity"])
ACTIVITY_FAILURES = Counter(
    "treeflow_activity_failures", "Activities failed for good (ACTIVITY_TASK_FAILED), by activity.", ["activity"])
ACTIVITY_TIMEOUTS = Counter(
    "treeflow_activity_timeouts", "Activity timeouts (ACTIVITY_TASK_TIMED_OUT), by activity and timeout type.",
    ["activity", "timeout_type"])
RECOVERY_SECONDS = Gauge(
    "treeflow_partition_recovery_seconds",
    "How long the last recovery of a partition took (reading its events back and folding them).", ["partition"])
RECOVERED_EVENTS = Counter("treeflow_recovered_events", "Events read back from the log by partition recoveries.")

# ---------------------------------------------------------------- workers

WORKER_TASKS = Counter(
    "treeflow_worker_tasks", "Tasks a worker took from its task queues, by queue and kind.", ["task_queue", "kind"])
ACTIVITY_SECONDS = Histogram(
    "treeflow_activity_execution_seconds",
    "Run time of one activity attempt where it ran (worker or in-process runner), by activity and outcome "
    "(completed, failed).", ["activity", "outcome"], buckets=ACTIVITY_BUCKETS)

# ---------------------------------------------------------------- consumer library

SERVICE_HANDLED = Counter(
    "treeflow_service_events_handled", "Events a group subscription's handler succeeded on, by group.", ["group"])
SERVICE_RETRIES = Counter(
    "treeflow_service_handler_retries", "Handler calls of a group subscription that raised and were retried.",
    ["group"])
SERVICE_DEAD_LETTERED = Counter(
    "treeflow_service_dead_lettered",
    "Records a group subscription wrote to its dead-letter topic (handler out of attempts, or undecodable).",
    ["group"])
GATEWAY_STREAMS = Gauge("treeflow_gateway_streams_open", "Server-sent event streams the gateway has open.")

K = TypeVar("K", bound=Hashable)


def bound(metric: Any, key: Callable[[K], tuple[str, ...]]) -> Callable[[K], Any]:
    """A cached lookup of `metric`'s child for a key: `key(k)` gives its label values, once per key."""
    children: dict[Any, Any] = {}

    def child(k: K) -> Any:
        found = children.get(k)
        if found is None:
            found = children[k] = metric.labels(*key(k))
        return found

    return child


#: `treeflow_events_appended_total` children, one per event type, bound up front.
EVENTS_BY_TYPE: Mapping[EventType, Any] = {t: EVENTS_APPENDED.labels(t.value) for t in EventType}
command_counter = bound(COMMANDS_DECIDED, lambda payload_type: (payload_type.__name__,))
dispatch_counter = bound(TASKS_DISPATCHED, lambda queue_kind: queue_kind)
worker_task_counter = bound(WORKER_TASKS, lambda queue_kind: queue_kind)
_activity_events = {
    EventType.ACTIVITY_TASK_STARTED: bound(ACTIVITY_ATTEMPTS, lambda name: (name,)),
    EventType.ACTIVITY_TASK_RETRYING: bound(ACTIVITY_RETRIES, lambda name: (name,)),
    EventType.ACTIVITY_TASK_FAILED: bound(ACTIVITY_FAILURES, lambda name: (name,)),
}
_timeouts = bound(ACTIVITY_TIMEOUTS, lambda name_type: name_type)
_activity_seconds = bound(ACTIVITY_SECONDS, lambda name_outcome: name_outcome)


def count_events(events: Iterable[Any]) -> None:
    """Count appended events by type, and the activity ones by activity name."""
    for event in events:
        event_type = event.event_type
        EVENTS_BY_TYPE[event_type].inc()
        activity = _activity_events.get(event_type)
        if activity is not None:
            activity(event.payload.activity_name).inc()
        elif event_type is EventType.ACTIVITY_TASK_TIMED_OUT:
            _timeouts((event.payload.activity_name, event.payload.timeout_type)).inc()


def activity_ran(activity_name: str, completed: bool, seconds: float) -> None:
    """Record one activity attempt's run time where it ran."""
    _activity_seconds((activity_name, "completed" if completed else "failed")).observe(seconds)


# ---------------------------------------------------------------- values read at scrape time

#: What a source gives: label values -> value. Sources of one metric are summed.
Source = Callable[[], Mapping[tuple[str, ...], float]]


class SourcedGauge(Collector):
    """A gauge whose values are read from live state when scraped, from the registered sources."""

    def __init__(self, name: str, documentation: str, labels: Iterable[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.sources: list[Source] = []
        REGISTRY.register(self)

    def add(self, source: Source) -> None:
        self.sources.append(source)

    def remove(self, source: Source) -> None:
        if source in self.sources:
            self.sources.remove(source)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        totals: dict[tuple[str, ...], float] = {}
        for source in list(self.sources):
            for labels, value in source().items():
                totals[labels] = totals.get(labels, 0) + value
        for labels, value in sorted(totals.items()):
            family.add_metric(list(labels), value)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=self.labels)


CONSUMER_LAG = SourcedGauge(
    "treeflow_consumer_lag",
    "Records of a partition not yet taken by this process: the partition's high watermark (from the latest "
    "fetch) minus the next offset to take, by consumer (processor, worker), topic and partition.",
    ["consumer", "topic", "partition"])
OPEN_EXECUTIONS = SourcedGauge(
    "treeflow_open_executions", "Open executions in the partitions this processor owns, by task queue.",
    ["task_queue"])
PARTITIONS = SourcedGauge(
    "treeflow_partitions",
    "Commands partitions this processor owns, by state (recovering: reading the log back; recovered: deciding).",
    ["state"])
