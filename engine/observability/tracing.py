"""OpenTelemetry traces of workflow trees (the optional ``tracing`` extra).

Spans, all in one trace per tree:

- ``StartWorkflow:<name>`` (client): around a top-level start.
- ``RunWorkflow:<name>`` (processor): one per run, from its WORKFLOW_EXECUTION_STARTED
  to its closing event (timed by the events' timestamps). A child's run span is a
  child of its parent's run span; a top-level run's, of the span that started it.
- ``RunActivity:<name>`` (where the attempt runs: a worker, or the processor's
  in-process runner): one per attempt, a child of its execution's run span.

The context travels in record headers as W3C ``traceparent``: on the client's
commands, on every event of an execution and every task dispatched for it (the
run span's), so a worker in another process, or a processor recovering the
partition elsewhere, continues the same trace. A run span open when its processor
stops is lost (its descendants still join the trace through the headers).

Tracing is on when opentelemetry-api is installed and a tracer provider is set
(`opentelemetry.trace.set_tracer_provider`, or ``opentelemetry-instrument``);
otherwise every call here is a cheap no-op and no header is written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from treeflow.schemas import CLOSING_STATUS, Event, EventType

try:
    from opentelemetry import trace
    from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the `tracing` extra is not installed
    trace = None  # type: ignore[assignment]

HEADER = "traceparent"
_PROPAGATOR = TraceContextTextMapPropagator() if trace is not None else None
_FAILED = {"FAILED", "TIMED_OUT", "TERMINATED"}


def enabled() -> bool:
    """True when opentelemetry is installed and a real tracer provider is set."""
    if trace is None:
        return False
    return not isinstance(trace.get_tracer_provider(), (ProxyTracerProvider, NoOpTracerProvider))


def _tracer() -> Any:
    return trace.get_tracer("treeflow")


def _context_of(traceparent: bytes | str | None) -> Any:
    if not traceparent:
        return None
    text = traceparent.decode() if isinstance(traceparent, bytes) else traceparent
    return _PROPAGATOR.extract({HEADER: text})


def _traceparent(span: Any) -> bytes | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    value = carrier.get(HEADER)
    return value.encode() if value else None


def current_headers() -> list[tuple[str, bytes]]:
    """The headers that carry the current span's context ([] when there is none)."""
    if not enabled():
        return []
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return []
    value = _traceparent(span)
    return [(HEADER, value)] if value else []


def traceparent_of(headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None) -> bytes | None:
    """The ``traceparent`` among record headers, if any."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in items or ():
        if key == HEADER:
            return value
    return None


@contextlib.contextmanager
def client_span(workflow_name: str, execution_id: str) -> Iterator[None]:
    """``StartWorkflow:<name>`` around a top-level start (nothing when tracing is off)."""
    if not enabled():
        yield
        return
    with _tracer().start_as_current_span(f"StartWorkflow:{workflow_name}", kind=trace.SpanKind.CLIENT,
                                         attributes={"treeflow.workflow_exec_id": execution_id,
                                                     "treeflow.workflow_name": workflow_name}):
        yield


@contextlib.contextmanager
def activity_span(name: str, activity_id: str, attempt: int, context: Any,
                  traceparent: bytes | None) -> Iterator[Any]:
    """``RunActivity:<name>`` around one attempt, a child of `traceparent` (its run span)."""
    if not enabled():
        yield None
        return
    attributes = {"treeflow.activity_id": activity_id, "treeflow.activity_name": name, "treeflow.attempt": attempt,
                  "treeflow.workflow_exec_id": context.workflow_exec_id,
                  "treeflow.root_workflow_exec_id": context.root_workflow_exec_id}
    with _tracer().start_as_current_span(f"RunActivity:{name}", context=_context_of(traceparent),
                                         kind=trace.SpanKind.CONSUMER, attributes=attributes) as span:
        yield span


def activity_outcome(span: Any, command: Any) -> None:
    """Mark an attempt's span failed when its report is a failure."""
    failure = getattr(command.payload, "failure", None)
    if span is not None and failure is not None:
        span.set_status(Status(StatusCode.ERROR, f"{failure.type}: {failure.message}"))


def _nanos(event: Event) -> int:
    return int(event.timestamp.timestamp() * 1_000_000_000)


class RunSpans:
    """The processor's run spans and the ``traceparent`` of each execution it owns.

    `observe` follows the events a decision appended: a start opens the run's span
    (under its parent execution's, or under the starting command's context), a
    close ends it. `header` gives what to put on the execution's records.
    """

    def __init__(self) -> None:
        #: exec id -> traceparent of its current run span (also known after a recovery).
        self._contexts: dict[str, bytes] = {}
        #: exec id -> the context its runs are children of.
        self._parents: dict[str, Any] = {}
        self._spans: dict[str, Any] = {}
        self._closed: list[str] = []

    def header(self, exec_id: str) -> bytes | None:
        return self._contexts.get(exec_id)

    def recovered(self, exec_id: str, traceparent: bytes) -> None:
        """An event read back on recovery carried this execution's context."""
        self._contexts[exec_id] = traceparent

    def forget(self, exec_ids: Iterable[str]) -> None:
        for exec_id in exec_ids:
            self._contexts.pop(exec_id, None)
            self._parents.pop(exec_id, None)
            self._spans.pop(exec_id, None)

    def observe(self, events: Iterable[Event], command_traceparent: bytes | None) -> None:
        for event in events:
            event_type = event.event_type
            if event_type is EventType.WORKFLOW_EXECUTION_STARTED:
                self._start(event, command_traceparent)
            elif event_type in CLOSING_STATUS:
                self._close(event)

    def _start(self, event: Event, command_traceparent: bytes | None) -> None:
        context = event.workflow_context
        exec_id = context.workflow_exec_id
        parent = self._parents.get(exec_id)
        if parent is None:
            parent_header = (self._contexts.get(context.parent_workflow_exec_id)
                             if context.parent_workflow_exec_id else command_traceparent)
            parent = self._parents[exec_id] = _context_of(parent_header)
        attributes = {"treeflow.workflow_exec_id": exec_id, "treeflow.workflow_run_id": context.workflow_run_id,
                      "treeflow.workflow_name": context.workflow_name, "treeflow.task_queue": context.task_queue,
                      "treeflow.root_workflow_exec_id": context.root_workflow_exec_id}
        if context.parent_workflow_exec_id:
            attributes["treeflow.parent_workflow_exec_id"] = context.parent_workflow_exec_id
        span = _tracer().start_span(f"RunWorkflow:{context.workflow_name}", context=parent,
                                    kind=trace.SpanKind.INTERNAL, attributes=attributes, start_time=_nanos(event))
        self._spans[exec_id] = span
        header = _traceparent(span)
        if header:
            self._contexts[exec_id] = header

    def _close(self, event: Event) -> None:
        exec_id = event.workflow_context.workflow_exec_id
        span = self._spans.pop(exec_id, None)
        status = CLOSING_STATUS[event.event_type]
        if span is not None:
            span.set_attribute("treeflow.status", status)
            if status in _FAILED:
                span.set_status(Status(StatusCode.ERROR, status))
            span.end(end_time=_nanos(event))
        if status != "CONTINUED_AS_NEW":
            self._closed.append(exec_id)

    def release(self) -> None:
        """Forget the executions closed since the last call (their records are written)."""
        self.forget(self._closed)
        self._closed.clear()
