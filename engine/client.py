"""The client: start executions, wait for results, and reach any execution by id.

A client writes commands keyed by the root id and reads only its own: each client
picks one partition of the replies topic (by a hash of its identity and a random
instance id), names it in every command (`Command.reply_partition`), and follows it
from the moment it connected (no group). The processor answers there, and when an
execution this client started closes, it sends the closing event there too. Only
for executions it did not start does a client follow events: the partition of the
tree it waits on, from when it began to wait.

Any execution of a tree (root, child, grandchild) is reached by its execution id:
commands about it must be keyed by its tree's root id, which `Client.find_root`
looks up when the caller does not give it (see there for the cost).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
import typing
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from treeflow.consumers import EventReader
from treeflow.consumers.lookup import AmbiguousExecutionError, RootCache
from treeflow.consumers.visibility import (
    VISIBILITY_URL_ENV,
    ExecutionQuery,
    ExecutionRecord,
    Freshness,
    VisibilityStore,
    open_store,
)
from treeflow.consumers.visibility import freshness as visibility_freshness
from treeflow.kafka import KafkaSettings, adopt_partitions, clients, end_offsets, partition_for, watch_topics
from treeflow.kafka.errors import from_kafka_error
from treeflow.schemas import COMMANDS, EVENTS, REPLIES, Command, DecodeError, Event, EventType, RecordPosition, Reply
from treeflow.schemas import models as m

from .core import ExecutionState, Status, fold
from .deadlines import command_timeout as _command_timeout, wait_arg, why_no_answer
from .definitions import DEFAULT_TASK_QUEUE, workflow_definition
from .ids import new_id
from .observability import tracing
from .errors import (
    UNKNOWN_WORKFLOW,
    CommandRejectedError,
    CommandTimeoutError,
    DeadlineExceededError,
    ExecutionNotFoundError,
    InvalidScheduleError,
    QueryTimeoutError,
    ScheduleAlreadyExistsError,
    ScheduleNotFoundError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
    WorkflowNotRegisteredError,
    WorkflowQueryError,
    WorkflowUpdateError,
    exception_from_failure,
)
from .options import RetryPolicy, millis
from .payloads import from_json, handler_input, handler_name, to_json
from .schedules import (
    ScheduleDescription,
    ScheduleHandle,
    SchedulePolicy,
    ScheduleSpec,
    parse_duration,
)

log = logging.getLogger(__name__)

#: Closing events kept for results asked for after they arrived.
RECENT_CLOSES = 100_000
#: Root ids remembered per execution id (started here or looked up).
KNOWN_ROOTS = 100_000
#: How long a query waits for its answer unless told otherwise (seconds).
DEFAULT_QUERY_TIMEOUT = 10.0
FINAL = {EventType.WORKFLOW_EXECUTION_COMPLETED, EventType.WORKFLOW_EXECUTION_FAILED,
         EventType.WORKFLOW_EXECUTION_CANCELED, EventType.WORKFLOW_EXECUTION_TERMINATED,
         EventType.WORKFLOW_EXECUTION_TIMED_OUT}
#: The `tf.type` headers of FINAL events: the client decodes only those records (and
#: the workflow-task failures of executions it waits for).
_FINAL_HEADERS = frozenset(t.value.encode() for t in FINAL)
_TASK_FAILED = EventType.WORKFLOW_TASK_FAILED.value.encode()
_TASK_COMPLETED = EventType.WORKFLOW_TASK_COMPLETED.value.encode()
#: What `start_workflow` does when the execution id is already running.
IdConflictPolicy = Literal["fail", "use_existing"]
#: How long a wait for a started execution's close notice goes before the log is checked
#: (a notice lost with a processor that died after appending the close); each further
#: check waits twice as long, up to CLOSE_NOTICE_CHECK_MAX.
CLOSE_NOTICE_CHECK = 10.0
CLOSE_NOTICE_CHECK_MAX = 160.0
#: How old a partition's remembered events end may be before a start refreshes it.
FLOOR_REFRESH = 30.0


@dataclass
class ClientStats:
    """What the client's follower fetched (replies, and events of trees it waits on)."""

    fetched_records: int = 0
    #: Key and value bytes of the records received.
    fetched_bytes: int = 0
    #: Events partitions followed (for executions waited on that this client did not start).
    followed_event_partitions: int = 0
    #: Reads of an events partition for close notices that did not come (CLOSE_NOTICE_CHECK).
    log_checks: int = 0


@dataclass(frozen=True)
class ExecutionDescription:
    """An execution as folded from its events."""

    execution_id: str
    run_id: str
    workflow_name: str
    status: Status
    parent_execution_id: str | None
    root_execution_id: str
    task_queue: str
    started_at: datetime
    closed_at: datetime | None
    history_length: int
    pending_activities: list[str] = field(default_factory=list)
    open_children: list[str] = field(default_factory=list)
    result_json: str | None = None
    failure: m.Failure | None = None
    #: The last workflow task of the current run failed (and is being retried): its
    #: cause (e.g. UNKNOWN_WORKFLOW, NON_DETERMINISTIC) and failure. None once a
    #: later workflow task completed.
    workflow_task_failure_cause: str | None = None
    workflow_task_failure: m.Failure | None = None

    @classmethod
    def of(cls, state: ExecutionState, task_failure: Event | None = None) -> ExecutionDescription:
        """`state`, with `task_failure` (see `pending_task_failures`) when it is still open."""
        context = state.context
        failed: m.WorkflowTaskFailed | None = task_failure.payload \
            if task_failure is not None and state.open else None  # type: ignore[assignment]
        return cls(context.workflow_exec_id, context.workflow_run_id, context.workflow_name, state.status,
                   context.parent_workflow_exec_id, context.root_workflow_exec_id, context.task_queue,
                   state.run_started_at, state.closed_at, state.last_sequence,
                   sorted(a.activity_name + "#" + a.activity_id for a in state.activities.values()),
                   sorted(state.children), state.result_json, state.failure,
                   failed.cause if failed else None, failed.failure if failed else None)


def pending_task_failures(events: Iterable[Event]) -> dict[str, Event]:
    """Per run id: its last WORKFLOW_TASK_FAILED event, when no workflow task of the run completed since."""
    found: dict[str, Event] = {}
    for event in events:
        if event.event_type is EventType.WORKFLOW_TASK_FAILED:
            found[event.workflow_context.workflow_run_id] = event
        elif event.event_type is EventType.WORKFLOW_TASK_COMPLETED:
            found.pop(event.workflow_context.workflow_run_id, None)
    return found


class WorkflowHandle:
    """Any execution (root, child, grandchild), by its id: `await handle` (or
    `await handle.result()`) gives its result; describe, history, signal, query,
    cancel and terminate reach it from outside.

    `root_execution_id` is None until known: the first call that needs it looks it up
    (`Client.find_root`) and keeps it.
    """

    def __init__(self, client: Client, execution_id: str, root_execution_id: str | None,
                 return_type: Any = Any, run_id: str | None = None) -> None:
        self.client = client
        self.execution_id = execution_id
        self.root_execution_id = root_execution_id
        self.run_id = run_id
        self.return_type = return_type

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result().__await__()

    async def root(self) -> str:
        """The id of the root of this execution's tree (looked up once when not given)."""
        if self.root_execution_id is None:
            self.root_execution_id = await self.client.find_root(self.execution_id)
        return self.root_execution_id

    async def result(self, timeout: float | None = None, *, wait_for_registration: bool = False) -> Any:
        """The result; raises `WorkflowFailureError` when the execution did not complete.

        Waits as long as the execution runs unless `timeout` (seconds) is given: then
        raises `DeadlineExceededError` (the execution goes on). Cancelling the awaiting
        task stops the wait, not the execution.

        When a worker takes the execution's workflow task but registers no workflow of
        its name (an UNKNOWN_WORKFLOW workflow-task failure), raises
        `WorkflowNotRegisteredError` at once: the execution stays open and its workflow
        task is retried with backoff. `wait_for_registration=True` waits instead (for a
        worker that registers it to be deployed).
        """
        waiting = self.client.result_waits
        try:
            with waiting() if waiting is not None else nullcontext():
                event = await asyncio.wait_for(self.client._closing_event(self, not wait_for_registration), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceededError(
                f"workflow execution {self.execution_id} did not close within {timeout:g}s; it goes on: "
                f"wait again, or see what it waits on with treeflow describe {self.execution_id}") from None
        payload = event.payload
        if event.event_type is EventType.WORKFLOW_EXECUTION_COMPLETED:
            return from_json(payload.result_json, self.return_type)  # type: ignore[union-attr]
        failure = getattr(payload, "failure", None)
        cause = exception_from_failure(failure) if failure else None
        if event.event_type is EventType.WORKFLOW_EXECUTION_TERMINATED:
            cause = exception_from_failure(m.Failure(type="Terminated", message=payload.reason))  # type: ignore[union-attr]
        status = event.event_type.value.removeprefix("WORKFLOW_EXECUTION_")
        raise WorkflowFailureError(self.execution_id, status, cause)

    async def describe(self) -> ExecutionDescription:
        """The execution's status, current run, parent, root and what it waits on."""
        return await self.client.describe(self.execution_id, root_execution_id=await self.root())

    async def history(self) -> list[Event]:
        """Every event of the execution (all its runs), in order."""
        return await self.client.history(self.execution_id, root_execution_id=await self.root())

    async def signal(self, signal: str | Callable[..., Any], *args: Any, timeout: float | None = None,
                     **kwargs: Any) -> None:
        """Send signal `signal` (a name, or the workflow's `@workflow.signal` method) with
        its input: one value (a pydantic model or JSON-able value) sent as it is, or the
        handler's parameters by keyword (a JSON object of them, Mistral's form), or
        several values by position (a JSON array).

        Returns once the signal is in the execution's history (a WORKFLOW_EXECUTION_SIGNALED
        event): it is then delivered to the handler exactly once, after every signal
        accepted before it. Raises `CommandRejectedError` when the execution is closed
        (`ExecutionNotFoundError` when unknown), `CommandTimeoutError` when no processor
        answered within `timeout` seconds (default: the client's `command_timeout`).
        """
        await self.client._request(self.execution_id, await self.root(), m.SignalWorkflowExecution(
            signal_name=handler_name(signal, "__treeflow_signal__"),
            input_json=handler_input(args, kwargs), identity=self.client.identity), timeout)

    async def query(self, query: str | Callable[..., Any], *args: Any, timeout: float = DEFAULT_QUERY_TIMEOUT,
                    result_type: Any = None, **kwargs: Any) -> Any:
        """Ask the running execution's query handler `query` (a name, or the workflow's
        `@workflow.query` method) and return its answer, validated as `result_type`
        (default: the method's return annotation, else plain JSON values). Its input is
        given as a signal's.

        The answer reflects every event accepted before the query (signals sent before
        it included) and appends nothing to the history. Raises `WorkflowQueryError`
        whose `type` says why there is no answer: QueryNotFound (no such handler),
        QueryFailed (the handler raised), WorkflowClosed / WorkflowNotFound (only running
        executions answer: read a closed one's result or history instead), or
        `QueryTimeoutError` when no worker answered within `timeout` seconds.
        """
        name = handler_name(query, "__treeflow_query__")
        if result_type is None:
            result_type = typing.get_type_hints(query).get("return", Any) if callable(query) else Any
        root = await self.root()
        deadline = datetime.now(timezone.utc) + timedelta(seconds=timeout)
        request = m.QueryWorkflow(query_name=name, input_json=handler_input(args, kwargs),
                                  deadline=deadline, identity=self.client.identity)
        try:
            reply = await asyncio.wait_for(self.client._send(self.execution_id, root, request, math.inf), timeout)
        except asyncio.TimeoutError:
            raise QueryTimeoutError(await self._no_answer(name, timeout)) from None
        if not reply.accepted:
            error = await self.client._rejection(self.execution_id, root, reply.error)
            cause = exception_from_failure(error.cause) if error and error.cause else None
            raise WorkflowQueryError(error.message if error else "query rejected",
                                     error.type if error else "QueryFailed", cause)
        return from_json(reply.result_json, result_type)

    async def _no_answer(self, name: str, timeout: float) -> str:
        message = f"no answer to query {name!r} of {self.execution_id} within {timeout:g}s"
        settings = self.client.settings
        why = await why_no_answer(settings, partition_for(await self.root(), settings.partitions), None)
        if why is not None and why.startswith("no processor"):  # else the worker is the likely cause
            return f"{message}: {why}"
        try:
            found = await asyncio.wait_for(self.describe(), 10)
        except Exception:  # the explanation is best effort; the timeout is the error
            return message
        return (f"{message}: no worker of task queue {found.task_queue!r} answered (is one running?); "
                f"the execution is {found.status.value}")

    async def update(self, update: str | Callable[..., Any], *args: Any, timeout: float | None = None,
                     result_type: Any = None, **kwargs: Any) -> Any:
        """Run the execution's update handler `update` (a name, or the workflow's
        `@workflow.update` method) and return its result, validated as `result_type`
        (default: the method's return annotation, else plain JSON values).

        The input is `args`/`kwargs` as for the handler's parameters: one positional
        value is sent raw, keywords as a JSON object of them, several positional values
        as a JSON array. The worker runs the update's validator first: a rejected update
        leaves no trace in the history. Raises `WorkflowUpdateError` whose `type` says why
        there is no result: UpdateNotFound, UpdateRejected, UpdateFailed (the handler
        raised; `cause` holds its error), WorkflowClosed / WorkflowNotFound, or
        UpdateTimeout after `timeout` seconds (by default it waits as long as the
        handler runs; the update itself goes on).
        """
        name = handler_name(update, "__treeflow_update__")
        if result_type is None:
            result_type = typing.get_type_hints(update).get("return", Any) if callable(update) else Any
        request = m.UpdateWorkflowExecution(update_name=name, input_json=handler_input(args, kwargs),
                                            identity=self.client.identity)
        root = await self.root()
        try:
            reply = await asyncio.wait_for(self.client._send(self.execution_id, root, request, math.inf), timeout)
        except asyncio.TimeoutError:
            raise WorkflowUpdateError(f"no answer to update {name!r} of {self.execution_id} within {timeout:g}s",
                                      "UpdateTimeout") from None
        if not reply.accepted:
            error = await self.client._rejection(self.execution_id, root, reply.error)
            cause = exception_from_failure(error.cause) if error and error.cause else None
            raise WorkflowUpdateError(error.message if error else "update rejected",
                                      error.type if error else "UpdateRejected", cause)
        return from_json(reply.result_json, result_type)

    async def cancel(self, reason: str = "cancel requested", *, timeout: float | None = None) -> None:
        """Ask the execution to cancel: it gets `asyncio.CancelledError` at its current
        await, may clean up, and ends CANCELED (or keeps running if it ignores it).
        Returns once the request is in its history; `timeout` as for `signal`."""
        await self.client._request(self.execution_id, await self.root(), m.RequestCancelWorkflowExecution(
            reason=reason, identity=self.client.identity), timeout)

    async def terminate(self, reason: str = "terminated", *, timeout: float | None = None) -> None:
        """End the execution at once (TERMINATED, with `reason`); no workflow code runs.
        Its open children get their parent close policy. `timeout` as for `signal`."""
        await self.client._request(self.execution_id, await self.root(), m.TerminateWorkflowExecution(
            reason=reason, identity=self.client.identity), timeout)


class Client:
    """A connection to treeflow's topics. Use `await Client.connect()` (or `treeflow.connect()`).

    `command_timeout` (seconds; default `TREEFLOW_COMMAND_TIMEOUT`, else 30; `math.inf`
    for none) bounds every call that waits for the processor's answer: starts, signals,
    cancels, terminates. Each of those calls also takes its own `timeout=`.
    """

    def __init__(self, settings: KafkaSettings, identity: str | None = None, *,
                 command_timeout: float | None = None, visibility_url: str | None = None) -> None:
        self.settings = settings
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self.command_timeout = _command_timeout(command_timeout)
        #: The visibility store of `list_executions`; None: ``$TREEFLOW_VISIBILITY_URL`` when first needed.
        self.visibility_url = visibility_url
        self._visibility: VisibilityStore | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._follower: asyncio.Task[None] | None = None
        self._replies: dict[str, asyncio.Future[Reply]] = {}
        self._waiters: dict[str, list[asyncio.Future[Event]]] = {}
        self._closed: OrderedDict[str, Event] = OrderedDict()
        #: UNKNOWN_WORKFLOW failures of executions waited for or started here, until a workflow task completes.
        self._unregistered: OrderedDict[str, Event] = OrderedDict()
        #: Executions started here (newest last), each with an events offset its first event
        #: is at or after (None: not known, the log check reads the partition from 0).
        self._started_here: OrderedDict[str, int | None] = OrderedDict()
        #: Per events partition: an end offset read, and when (monotonic seconds).
        self._floors: dict[int, tuple[int, float]] = {}
        self._floor_refresh: dict[int, asyncio.Task[None]] = {}
        #: Per events partition: the log check under way (one at a time serves every waiter).
        self._log_checks: dict[int, asyncio.Future[None]] = {}
        self._last_log_check: dict[int, float] = {}
        self._roots = RootCache(settings, scan=True, size=KNOWN_ROOTS)
        #: The replies partition this client reads; named in each command it sends.
        self.reply_partition = partition_for(f"{self.identity}/{new_id()}", settings.partitions)
        self.stats = ClientStats()
        self._assignment: set[TopicPartition] = set()
        self._assigning = asyncio.Lock()
        #: Entered around each wait for a result (`WorkflowHandle.result`): a time-skipping
        #: `treeflow.testing.Environment` lets time skip while one is open. None: nothing.
        self.result_waits: Callable[[], AbstractContextManager[Any]] | None = None

    @property
    def commands_in_flight(self) -> int:
        """Commands sent (or being sent) whose reply has not arrived yet."""
        return len(self._replies)

    @classmethod
    async def connect(cls, bootstrap_servers: str | None = None, *, identity: str | None = None,
                      command_timeout: float | None = None, visibility_url: str | None = None,
                      **settings: Any) -> Client:
        """Connect to the Kafka named by `bootstrap_servers` or `TREEFLOW_BOOTSTRAP_SERVERS`.

        Raises `BrokerUnreachableError` (or another `treeflow.kafka.errors` error) when Kafka does
        not answer there (nothing is left open).
        """
        client = cls(KafkaSettings.resolve(bootstrap_servers, **settings), identity, command_timeout=command_timeout,
                     visibility_url=visibility_url)
        await client.start()
        return client

    async def start(self) -> None:
        """Connect; raises `BrokerUnreachableError` (or another `treeflow.kafka.errors` error) (having closed what it opened) when Kafka
        does not answer or answers with an error."""
        try:
            await self._start()
        except KafkaError as error:
            await self.close()
            raise from_kafka_error(error, self.settings.bootstrap_servers, self.settings.profile.name) from error
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        self.settings = await adopt_partitions(self.settings, "client")  # routing uses the topics' own count
        topics = self.settings.topics
        # The replies partition this client reads, by the topics' own count.
        self.reply_partition = partition_for(f"{self.identity}/{new_id()}", self.settings.partitions)
        self._producer = await clients.start(clients.producer(self.settings, "client"), self.settings)
        self._consumer = await clients.start(clients.consumer(self.settings, "client"), self.settings)
        await self._follow_partitions({TopicPartition(topics.replies, self.reply_partition)})
        self._follower = asyncio.ensure_future(self._follow_while_topics_stay())

    async def close(self) -> None:
        follower, consumer, producer = self._follower, self._consumer, self._producer
        self._follower = self._consumer = self._producer = None
        background = [task for task in (follower, *self._floor_refresh.values(), *self._log_checks.values())
                      if task is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()
        if self._visibility is not None:
            await self._visibility.close()
            self._visibility = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------ starting

    async def start_workflow(self, workflow: type | str, params: Any = None, *, execution_id: str | None = None,
                             execution_timeout: timedelta | None = None, task_queue: str | None = None,
                             retry_policy: RetryPolicy | None = None, timeout: float | None = None,
                             id_conflict_policy: IdConflictPolicy = "fail") -> WorkflowHandle:
        """Start a top-level execution; returns once the processor accepted it.

        When `execution_id` is already running, raises `WorkflowAlreadyStartedError`, or
        with `id_conflict_policy="use_existing"` returns a handle on the running execution.
        Raises `CommandTimeoutError` when no processor answered within `timeout` seconds
        (default: the client's `command_timeout`): the start may still be applied later,
        so retry it with the same `execution_id` (see README, "Deadlines").
        """
        definition = None if isinstance(workflow, str) else workflow_definition(workflow)
        name = workflow if isinstance(workflow, str) else definition.name  # type: ignore[union-attr]
        if definition is not None and params is not None:
            definition.parameters.bind(to_json(params))  # fail here, not in the worker
        exec_id = execution_id or new_id()
        floor = self._events_floor(partition_for(exec_id, self.settings.partitions))
        run_timeout = execution_timeout or (definition.execution_timeout if definition else None)
        queue = task_queue or (definition.task_queue if definition else None) or DEFAULT_TASK_QUEUE
        with tracing.client_span(name, exec_id):
            reply = await self._send(exec_id, exec_id, m.StartWorkflowExecution(
                workflow_name=name, task_queue=queue, input_json=None if params is None else to_json(params),
                execution_timeout_ms=millis(run_timeout),
                retry_policy=retry_policy.to_record() if retry_policy else None,
                identity=self.identity), timeout)
        if not reply.accepted:
            error = reply.error
            if error is not None and error.type == "WorkflowAlreadyStarted":
                if id_conflict_policy == "use_existing":
                    self._roots.remember(exec_id, exec_id)
                    return WorkflowHandle(self, exec_id, exec_id, definition.return_type if definition else Any,
                                          reply.workflow_run_id)
                raise WorkflowAlreadyStartedError(error.message)
            raise CommandRejectedError(error.message if error else "rejected")
        self._started_here[exec_id] = floor
        self._started_here.move_to_end(exec_id)
        while len(self._started_here) > KNOWN_ROOTS:
            self._started_here.popitem(last=False)
        self._roots.remember(exec_id, exec_id)
        return WorkflowHandle(self, exec_id, exec_id, definition.return_type if definition else Any,
                              reply.workflow_run_id)

    async def execute_workflow(self, workflow: type | str, params: Any = None, *, wait: bool = True,
                               result_timeout: float | None = None, **options: Any) -> Any:
        """Start an execution; with `wait=True` return its result, else its handle.

        `options` are `start_workflow`'s (its `timeout` bounds the start); `result_timeout`
        bounds the wait for the result as in `WorkflowHandle.result`, which also says
        when an unregistered workflow name raises `WorkflowNotRegisteredError`.
        """
        handle = await self.start_workflow(workflow, params, **options)
        return await handle.result(result_timeout) if wait else handle

    def get_handle(self, execution_id: str, *, root_execution_id: str | None = None,
                   workflow: type | None = None) -> WorkflowHandle:
        """A handle on any execution of any tree (root, child, grandchild) by its id.

        Pass `root_execution_id` when known (a top-level execution is its own root);
        otherwise the handle looks it up on first use (`find_root`). `workflow`, the
        workflow class, types the result.
        """
        return_type = workflow_definition(workflow).return_type if workflow else Any
        return WorkflowHandle(self, execution_id, root_execution_id, return_type)

    # ------------------------------------------------------------ reading

    async def find_root(self, execution_id: str) -> str:
        """The root id of the tree that holds `execution_id`.

        Known at once for executions this client started or already looked up; otherwise
        read from the events topic (`treeflow.consumers.find_root` with `scan=True`): first
        the partitions of the candidate roots (the id itself and each dot-prefix of it: a
        child's default id is `<parent id>.<suffix>`), then the others, decoding only the
        execution's own records and stopping at its first event. Cost: the records ahead
        of that event in its partition; for an id that names none of its ancestors, up to
        one pass over the whole events topic. When a visibility store is set (``visibility_url`` or
        ``$TREEFLOW_VISIBILITY_URL``) and keeps this client's events topic, its row answers first
        (one indexed read). Raises `ExecutionNotFoundError` when no event names the execution.
        """
        root = await self._root_from_visibility(execution_id)
        if root is not None:
            self._roots.remember(execution_id, root)
            return root
        try:
            root = await self._roots.find(execution_id)
        except AmbiguousExecutionError as error:
            raise CommandRejectedError(str(error)) from None
        if root is None:
            raise ExecutionNotFoundError(f"workflow execution {execution_id} not found: no event of it in "
                                         f"{self.settings.topics.events} (check the id and the topic prefix)")
        return root

    async def history(self, execution_id: str, *, root_execution_id: str | None = None) -> list[Event]:
        """Every event of the execution (all its runs), in order; `root_execution_id` saves
        a `find_root` lookup."""
        root = root_execution_id or await self.find_root(execution_id)
        return [e for e in await self._tree_events(root) if e.workflow_context.workflow_exec_id == execution_id]

    async def describe(self, execution_id: str, *, root_execution_id: str | None = None) -> ExecutionDescription:
        """The execution as folded from its events; `root_execution_id` saves a `find_root` lookup."""
        root = root_execution_id or await self.find_root(execution_id)
        events = await self._tree_events(root)
        states = fold(events)
        if execution_id not in states:
            raise ExecutionNotFoundError(f"workflow execution {execution_id} not found in the tree of {root} "
                                         "(check the id and --root)")
        state = states[execution_id]
        return ExecutionDescription.of(state, pending_task_failures(events).get(state.context.workflow_run_id))

    async def describe_tree(self, execution_id: str, *, root_execution_id: str | None = None
                            ) -> list[ExecutionDescription]:
        """Every execution of the tree that holds `execution_id` (usually its root id),
        parents before their children. Reads the root's partition of the events topic."""
        root = root_execution_id or await self.find_root(execution_id)
        events = await self._tree_events(root)
        failures = pending_task_failures(events)
        return [ExecutionDescription.of(state, failures.get(state.context.workflow_run_id))
                for state in fold(events).values()]

    # ------------------------------------------------------------ visibility

    async def list_executions(self, *, status: str | list[str] | None = None, workflow_name: str | None = None,
                              root_execution_id: str | None = None, parent_execution_id: str | None = None,
                              since: str | datetime | timedelta | None = None,
                              limit: int = 100) -> list[ExecutionRecord]:
        """Executions from the visibility store, newest start first (see `treeflow.consumers.visibility`).

        Every filter given must hold: `status` (one, a list, or comma-separated; ``open`` /
        ``closed``), workflow name, root, parent, started at or after `since` (a time, a
        `timedelta` back from now, or ``"15m"``). The store lags the events topic by
        `visibility_freshness().lag` events. Raises `VisibilityError` when no store is set
        (``visibility_url`` or ``$TREEFLOW_VISIBILITY_URL``) and `QueryError` for a bad filter.
        """
        query = ExecutionQuery.of(status=status, workflow_name=workflow_name, root_execution_id=root_execution_id,
                                  parent_execution_id=parent_execution_id, since=since, limit=limit)
        return await (await self._visibility_store()).list(query)

    async def count_executions(self, *, status: str | list[str] | None = None, workflow_name: str | None = None,
                               root_execution_id: str | None = None, parent_execution_id: str | None = None,
                               since: str | datetime | timedelta | None = None) -> int:
        """How many executions of the visibility store match the filters (those of `list_executions`)."""
        query = ExecutionQuery.of(status=status, workflow_name=workflow_name, root_execution_id=root_execution_id,
                                  parent_execution_id=parent_execution_id, since=since)
        return await (await self._visibility_store()).count(query)

    async def visibility_freshness(self) -> Freshness:
        """How far the visibility store is behind the events topic (`Freshness.lag`, in events)."""
        return await visibility_freshness(await self._visibility_store(), self.settings)

    async def _root_from_visibility(self, execution_id: str) -> str | None:
        """The root the visibility store records, if one is set and fed from this client's events topic."""
        if self.visibility_url is None and not os.environ.get(VISIBILITY_URL_ENV):
            return None
        try:
            store = await self._visibility_store()
            if not (await store.positions(self.settings.topics.events))[0]:
                return None  # a store of other topics (or still empty): its rows do not answer for ours
            row = await store.get(execution_id)
        except Exception as error:  # noqa: BLE001 - the events topic still answers
            log.debug("visibility store not used for the root of %s: %r", execution_id, error)
            return None
        return row.root_execution_id if row is not None else None

    async def _visibility_store(self) -> VisibilityStore:
        if self._visibility is None:
            store = open_store(self.visibility_url)
            await store.open()
            self._visibility = store
        return self._visibility

    async def _tree_events(self, root: str) -> list[Event]:
        reader = EventReader(self.settings, [partition_for(root, self.settings.partitions)], key=root)
        return [item.event async for item in reader if item.event.workflow_context.root_workflow_exec_id == root]

    # ------------------------------------------------------------ schedules

    async def create_schedule(self, schedule_id: str, workflow: type | str, params: Any = None, *,
                              spec: ScheduleSpec, policy: SchedulePolicy | None = None,
                              task_queue: str | None = None, execution_timeout: timedelta | None = None,
                              retry_policy: RetryPolicy | None = None, paused: bool = False,
                              note: str | None = None, timeout: float | None = None) -> ScheduleHandle:
        """Create a durable schedule that starts `workflow` with `params` at each tick of
        `spec` (README "Schedules"); returns once the processor recorded it.

        Raises `InvalidScheduleError` for a spec that cannot tick or params that do not fit
        the workflow, `ScheduleAlreadyExistsError` when the id is taken, and
        `CommandTimeoutError` as `start_workflow` does.
        """
        definition = None if isinstance(workflow, str) else workflow_definition(workflow)
        name = workflow if isinstance(workflow, str) else definition.name  # type: ignore[union-attr]
        if definition is not None and params is not None:
            try:
                definition.parameters.bind(to_json(params))
            except Exception as exc:  # noqa: BLE001 - said as a bad schedule, before anything is sent
                raise InvalidScheduleError(f"params do not fit workflow {name}: {exc}") from None
        if not schedule_id or "|" in schedule_id:
            raise InvalidScheduleError(f"invalid schedule id {schedule_id!r}")
        policy = policy or SchedulePolicy()
        run_timeout = execution_timeout or (definition.execution_timeout if definition else None)
        queue = task_queue or (definition.task_queue if definition else None) or DEFAULT_TASK_QUEUE
        payload = m.CreateSchedule(
            spec=spec.to_record(),
            action=m.ScheduleAction(workflow_name=name, task_queue=queue,
                                    input_json=None if params is None else to_json(params),
                                    execution_timeout_ms=millis(run_timeout),
                                    retry_policy=retry_policy.to_record() if retry_policy else None),
            overlap=policy.overlap, catchup_window_ms=millis(parse_duration(policy.catchup_window)),
            paused=paused, note=note, identity=self.identity)
        await self._schedule_command(schedule_id, payload, timeout)
        return ScheduleHandle(self, schedule_id)

    def get_schedule_handle(self, schedule_id: str) -> ScheduleHandle:
        """A handle on an existing schedule (nothing is checked until it is used)."""
        return ScheduleHandle(self, schedule_id)

    async def list_schedules(self, *, workflow_name: str | None = None,
                             timeout: float | None = None) -> list[ScheduleDescription]:
        """Every schedule, by id: asks the processor for each partition's schedules."""
        replies = await asyncio.gather(*(
            self._send("", "", m.ListSchedules(workflow_name=workflow_name), timeout, partition=partition)
            for partition in range(self.settings.partitions)))
        found = [ScheduleDescription.of(item) for reply in replies for item in json.loads(reply.result_json or "[]")]
        return sorted(found, key=lambda d: d.schedule_id)

    async def _schedule_command(self, schedule_id: str, payload: Any, timeout: float | None) -> Reply:
        reply = await self._send(schedule_id, schedule_id, payload, timeout)
        if not reply.accepted:
            error = reply.error
            message = error.message if error and error.message else "rejected"
            kind = {"ScheduleNotFound": ScheduleNotFoundError, "ScheduleAlreadyExists": ScheduleAlreadyExistsError,
                    "InvalidArgument": InvalidScheduleError}.get(error.type if error else "", CommandRejectedError)
            raise kind(message)
        return reply

    # ------------------------------------------------------------ internals

    async def _request(self, exec_id: str, root: str, payload: Any, timeout: float | None = None) -> None:
        reply = await self._send(exec_id, root, payload, timeout)
        if not reply.accepted:
            error = await self._rejection(exec_id, root, reply.error)
            kind = ExecutionNotFoundError if error is not None and error.type == "WorkflowNotFound" \
                else CommandRejectedError
            raise kind(error.message if error else "rejected")

    async def _rejection(self, exec_id: str, root: str, error: m.Failure | None) -> m.Failure | None:
        """The processor's reason for a rejection, with WorkflowNotFound for an execution
        the log shows closed turned into WorkflowClosed: the processor forgets a closed
        execution after its retention (README "Closed executions"); the log does not."""
        if error is None or error.type != "WorkflowNotFound":
            return error
        state = fold(await self.history(exec_id, root_execution_id=root)).get(exec_id)
        if state is None or state.open:
            return error
        return m.Failure(type="WorkflowClosed", non_retryable=True,
                       message=f"workflow execution {exec_id} is already closed ({state.status.value})")

    async def _send(self, exec_id: str, root: str, payload: Any, timeout: float | None = None, *,
                    partition: int | None = None) -> Reply:
        """Write the command and wait for the processor's reply, for at most `timeout`
        seconds (default `command_timeout`); then raise `CommandTimeoutError`. `partition`
        picks the commands partition of a command about no tree (an empty root)."""
        assert self._producer is not None, "call start() (or use Client.connect()) first"
        seconds = self.command_timeout if timeout is None else _command_timeout(timeout)
        command = Command(command_id=new_id(), timestamp=datetime.now(timezone.utc),
                          root_workflow_exec_id=root, workflow_exec_id=exec_id, payload=payload,
                          reply_partition=self.reply_partition)
        answered: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._replies[command.command_id] = answered
        written: list[Any] = []  # the record's metadata, once the broker acknowledged it

        async def write_and_wait() -> Reply:
            assert self._producer is not None
            written.append(await self._producer.send_and_wait(self.settings.topics.commands,
                                                              COMMANDS.encode(command), key=root.encode(),
                                                              partition=partition,
                                                              headers=tracing.current_headers() or None))
            return await answered

        try:
            return await asyncio.wait_for(write_and_wait(), wait_arg(seconds))
        except asyncio.TimeoutError:
            raise await self._no_answer(command, seconds, written[0] if written else None) from None
        except KafkaError as error:
            raise from_kafka_error(error, self.settings.bootstrap_servers, self.settings.profile.name) from error
        finally:
            self._replies.pop(command.command_id, None)

    async def _no_answer(self, command: Command, seconds: float, written: Any) -> CommandTimeoutError:
        topic = self.settings.topics.commands
        exec_id = command.workflow_exec_id
        what = {m.StartWorkflowExecution: "the start of", m.SignalWorkflowExecution: "the signal to",
                m.RequestCancelWorkflowExecution: "the cancel request for",
                m.TerminateWorkflowExecution: "the termination of"}.get(type(command.payload), "the command for")
        retry = {
            m.StartWorkflowExecution: "Retrying with the same execution id is safe: it starts the execution if "
                                      "this start was never applied, and is rejected as already started while "
                                      "it runs (id_conflict_policy='use_existing' returns its handle instead)",
            m.SignalWorkflowExecution: f"A retry may deliver the signal twice: look for it first "
                                       f"(treeflow history {exec_id})",
        }.get(type(command.payload), "Retrying is harmless: a closed execution rejects it")
        partition = written.partition if written else partition_for(command.root_workflow_exec_id,
                                                                     self.settings.partitions)
        why = await why_no_answer(self.settings, partition, written.offset if written else None)
        if written is None:
            fate = (f"The broker did not acknowledge the command within {seconds:g}s: it may or may not be in "
                    f"{topic}, and if it is, it is applied when a processor takes partition {partition}")
        else:
            fate = (f"The command stays in {topic} (partition {partition}, offset {written.offset}) and is "
                    f"applied when a processor takes that partition, even after this error")
        message = (f"no processor answered {what} workflow execution {exec_id} within {seconds:g}s: "
                   f"{why or f'no processor answered for partition {partition} of {topic}'}. {fate}. {retry}.")
        return CommandTimeoutError(message, command_id=command.command_id, delivered=written is not None,
                                   partition=partition, offset=written.offset if written else None)

    async def _closing_event(self, handle: WorkflowHandle, fail_unregistered: bool = False) -> Event:
        """The execution's closing event; with `fail_unregistered`, raises
        `WorkflowNotRegisteredError` once its workflow task failed as UNKNOWN_WORKFLOW."""
        exec_id = handle.execution_id
        if exec_id in self._closed:
            return self._closed[exec_id]
        waiter: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(exec_id, []).append(waiter)
        try:
            if exec_id not in self._started_here:
                # Follow its tree's partition from now, then look in its history (it may
                # have closed, or failed its workflow task, before this client waited).
                root = await handle.root()
                await self._follow_partitions({TopicPartition(self.settings.topics.events,
                                                              partition_for(root, self.settings.partitions))})
                found = await self._closed_in_log(exec_id, root)
                if found is not None:
                    return found
            # Started here, the processor sends the closing event (and an UNKNOWN_WORKFLOW
            # task failure) to this client's replies partition; else the tree's partition
            # is followed. A notice lost with a processor that died after appending the
            # close is found in the log after CLOSE_NOTICE_CHECK.
            check = CLOSE_NOTICE_CHECK if exec_id in self._started_here else None
            while True:
                if fail_unregistered and exec_id in self._unregistered:
                    raise _not_registered(self._unregistered[exec_id])
                try:
                    event = await asyncio.wait_for(asyncio.shield(waiter), check)
                except asyncio.TimeoutError:
                    await self._check_log(partition_for(await handle.root(), self.settings.partitions))
                    if exec_id in self._closed:
                        return self._closed[exec_id]
                    check = min(2 * check, CLOSE_NOTICE_CHECK_MAX)  # type: ignore[operator]
                    continue
                if event.event_type in FINAL:
                    return event
                # Woken by an UNKNOWN_WORKFLOW failure: wait on with a new future.
                waiters = self._waiters.setdefault(exec_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                waiter = asyncio.get_running_loop().create_future()
                waiters.append(waiter)
        finally:
            waiters = self._waiters.get(exec_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(exec_id, None)

    async def _follow_while_topics_stay(self) -> None:
        """Follow the topics; if they vanish (or following fails), fail every waiting call with why."""
        topics = self.settings.topics
        tasks = [asyncio.ensure_future(self._follow()), asyncio.ensure_future(
            watch_topics(self.settings, [topics.commands, topics.events, topics.replies], "client"))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        error = next(task.exception() for task in done if task.exception() is not None)
        log.error("the client stopped following treeflow's topics: %s", error)
        waiting = [*self._replies.values(), *(w for ws in self._waiters.values() for w in ws)]
        for future in waiting:
            if not future.done():
                future.set_exception(error)

    async def _closed_in_log(self, exec_id: str, root: str) -> Event | None:
        """The execution's closing event if its history has one since its last start; notes
        a pending UNKNOWN_WORKFLOW workflow-task failure of it."""
        history = await self.history(exec_id, root_execution_id=root)
        for event in reversed(history):
            if event.event_type in FINAL:
                return event
            if event.event_type is EventType.WORKFLOW_EXECUTION_STARTED:
                break
        failed = pending_task_failures(history).get(history[-1].workflow_context.workflow_run_id) \
            if history else None
        if failed is not None and failed.payload.cause == UNKNOWN_WORKFLOW:  # type: ignore[union-attr]
            self._unregistered.setdefault(exec_id, failed)
        return None

    def _events_floor(self, partition: int) -> int | None:
        """An offset of events `partition` that every event of an execution started now
        comes at or after (an end read earlier); refreshed in the background when old."""
        known = self._floors.get(partition)
        if (known is None or time.monotonic() - known[1] > FLOOR_REFRESH) and partition not in self._floor_refresh:
            self._floor_refresh[partition] = asyncio.ensure_future(self._refresh_floor(partition))
        return known[0] if known is not None else None

    async def _refresh_floor(self, partition: int) -> None:
        tp = TopicPartition(self.settings.topics.events, partition)
        try:
            read_at = time.monotonic()
            self._floors[partition] = ((await end_offsets(self.settings, [tp]))[tp], read_at)
        except Exception as error:  # the floor only narrows a rare log check
            log.debug("could not read the end of %s: %r", tp, error)
        finally:
            self._floor_refresh.pop(partition, None)

    async def _check_log(self, partition: int) -> None:
        """Look in events `partition` for the closing events of the executions started
        here that are waited on (a close notice lost with a processor): one read at a
        time per partition, from the oldest such start's floor, serves every waiter; reads
        of a partition start CLOSE_NOTICE_CHECK apart at most (waits that fall due in
        between share the next one)."""
        running = self._log_checks.get(partition)
        if running is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_log_check.get(partition, -math.inf) + CLOSE_NOTICE_CHECK - loop.time())
            running = self._log_checks[partition] = asyncio.ensure_future(self._read_closes(partition, delay))
            running.add_done_callback(lambda _: self._log_checks.pop(partition, None))
        await asyncio.shield(running)

    async def _read_closes(self, partition: int, delay: float) -> None:
        await asyncio.sleep(delay)
        self._last_log_check[partition] = asyncio.get_running_loop().time()
        # Started here, an execution is the root of its tree: its partition is its own id's.
        waited = {exec_id for exec_id in self._waiters if exec_id in self._started_here
                  and partition_for(exec_id, self.settings.partitions) == partition}
        if not waited:
            return
        floors = [self._started_here[exec_id] for exec_id in waited]
        start = 0 if None in floors else min(floors)  # type: ignore[type-var]
        wanted = {exec_id.encode() for exec_id in waited}

        def accept(record: Any) -> bool:
            headers = dict(record.headers or ())
            kind = headers.get("tf.type")
            return headers.get("tf.exec") in wanted and (kind in _FINAL_HEADERS or kind in (_TASK_FAILED,
                                                                                            _TASK_COMPLETED))

        self.stats.log_checks += 1
        reader = EventReader(self.settings, [partition], accept=accept, start_offsets={partition: start})
        async for item in reader:  # in log order: a later completed workflow task clears a failure
            event = item.event
            if event.event_type is EventType.WORKFLOW_TASK_COMPLETED:
                self._unregistered.pop(event.workflow_context.workflow_exec_id, None)
            elif event.event_type is EventType.WORKFLOW_TASK_FAILED:
                self._on_task_failure(event)
            else:
                self._on_close(event)

    async def _follow_partitions(self, partitions: set[TopicPartition]) -> None:
        """Add `partitions` to what the follower reads, each from its true end now."""
        assert self._consumer is not None
        async with self._assigning:
            new = partitions - self._assignment
            if not new:
                return
            ends = await end_offsets(self.settings, sorted(new))
            # assign() resets every position: keep those of the partitions already read.
            positions = {tp: await self._consumer.position(tp) for tp in self._assignment}
            self._assignment |= new
            self._consumer.assign(sorted(self._assignment))
            for tp, offset in {**positions, **ends}.items():
                self._consumer.seek(tp, offset)
            self.stats.followed_event_partitions = sum(tp.topic == self.settings.topics.events
                                                       for tp in self._assignment)

    async def _follow(self) -> None:
        assert self._consumer is not None
        topics = self.settings.topics
        while True:
            async with self._assigning:
                batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    self.stats.fetched_records += 1
                    self.stats.fetched_bytes += max(record.serialized_key_size, 0) + max(
                        record.serialized_value_size, 0)
                    headers = dict(record.headers or ())
                    try:
                        if tp.topic == topics.replies:
                            self._on_reply(record, headers, tp)
                            continue
                        kind = headers.get("tf.type")
                        if kind in _FINAL_HEADERS:
                            self._on_close(EVENTS.decode(record.value, RecordPosition(tp.topic, tp.partition,
                                                                                      record.offset)))
                        elif kind in (_TASK_FAILED, _TASK_COMPLETED):
                            self._on_workflow_task(kind, record, headers, tp)
                    except DecodeError as error:
                        log.error("client skipped a record: %s", error)

    def _on_workflow_task(self, kind: bytes, record: Any, headers: dict[str, bytes], tp: TopicPartition) -> None:
        """Track UNKNOWN_WORKFLOW failures of the executions waited for or started here."""
        exec_id = headers.get("tf.exec", b"").decode()
        if kind == _TASK_COMPLETED:
            self._unregistered.pop(exec_id, None)
            return
        if exec_id not in self._waiters and exec_id not in self._started_here:
            return
        self._on_task_failure(EVENTS.decode(record.value, RecordPosition(tp.topic, tp.partition, record.offset)))

    def _on_task_failure(self, event: Event) -> None:
        """Note an UNKNOWN_WORKFLOW workflow-task failure and wake those waiting on it."""
        exec_id = event.workflow_context.workflow_exec_id
        if event.payload.cause != UNKNOWN_WORKFLOW:  # type: ignore[union-attr]
            return
        self._unregistered[exec_id] = event
        while len(self._unregistered) > KNOWN_ROOTS:
            self._unregistered.popitem(last=False)
        for waiter in self._waiters.get(exec_id, []):
            if not waiter.done():
                waiter.set_result(event)

    def _on_reply(self, record: Any, headers: dict[str, bytes], tp: TopicPartition) -> None:
        if "tf.closed" in headers:
            notice = REPLIES.decode(record.value, RecordPosition(tp.topic, tp.partition, record.offset))
            event = notice.closing_event
            if event is not None and event.event_type is EventType.WORKFLOW_TASK_FAILED:
                self._on_task_failure(event)
            elif event is not None:
                self._on_close(event)
            return
        command_id = headers.get("tf.command", b"").decode()
        if command_id and command_id not in self._replies:
            return
        reply = REPLIES.decode(record.value, RecordPosition(tp.topic, tp.partition, record.offset))
        future = self._replies.get(reply.command_id)
        if future is not None and not future.done():
            future.set_result(reply)

    def _on_close(self, event: Event) -> None:
        exec_id = event.workflow_context.workflow_exec_id
        self._unregistered.pop(exec_id, None)
        self._closed[exec_id] = event
        self._closed.move_to_end(exec_id)
        while len(self._closed) > RECENT_CLOSES:
            self._closed.popitem(last=False)
        for waiter in self._waiters.pop(exec_id, []):
            if not waiter.done():
                waiter.set_result(event)


def _not_registered(event: Event) -> WorkflowNotRegisteredError:
    context = event.workflow_context
    failure = event.payload.failure  # type: ignore[union-attr]
    detail = failure.message if failure else f"no worker registers {context.workflow_name!r}"
    return WorkflowNotRegisteredError(context.workflow_exec_id, context.workflow_name, context.task_queue, detail)


_default: dict[tuple[int, KafkaSettings], Client] = {}


async def default_client() -> Client:
    """The client of this event loop for the settings in the environment (created once)."""
    settings = KafkaSettings.resolve()
    key = (id(asyncio.get_running_loop()), settings)
    client = _default.get(key)
    if client is None:
        client = Client(settings)
        await client.start()
        _default[key] = client
    return client


def use_as_default(client: Client, settings: KafkaSettings) -> None:
    """Make `client` this event loop's default client for `settings` (the settings the
    environment variables resolve to: what `treeflow.execute_workflow` uses outside
    workflow code); closed by `close_default_clients`."""
    _default[(id(asyncio.get_running_loop()), settings)] = client


async def close_default_clients(settings: KafkaSettings | None = None) -> None:
    """Close this event loop's default clients (only the one for `settings`, when given)."""
    for key, client in list(_default.items()):
        if key[0] == id(asyncio.get_running_loop()) and (settings is None or key[1] == settings):
            await client.close()
            del _default[key]


async def connect(bootstrap_servers: str | None = None, **settings: Any) -> Client:
    """Connect a client (`TREEFLOW_BOOTSTRAP_SERVERS` when `bootstrap_servers` is None)."""
    return await Client.connect(bootstrap_servers, **settings)
