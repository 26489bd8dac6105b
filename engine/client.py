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
import logging
import os
import socket
import typing
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from treeflow.consumers import EventReader
from treeflow.consumers.lookup import AmbiguousExecutionError, RootCache
from treeflow.kafka import KafkaSettings, end_offsets, partition_for
from treeflow.schemas import COMMANDS, EVENTS, REPLIES, Command, DecodeError, Event, EventType, RecordPosition, Reply
from treeflow.schemas import models as m

from .core import ExecutionState, Status, fold
from .definitions import DEFAULT_TASK_QUEUE, WorkflowDefinition, workflow_definition
from .ids import new_id
from .errors import (
    CommandRejectedError,
    QueryTimeoutError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
    WorkflowQueryError,
    exception_from_failure,
)
from .options import RetryPolicy, millis
from .payloads import from_json, to_json

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
#: The `tf.type` headers of FINAL events: the client decodes only those records.
_FINAL_HEADERS = frozenset(t.value.encode() for t in FINAL)
#: How long a wait for a started execution's close notice goes before the log is checked
#: (a notice lost with a processor that died after appending the close).
CLOSE_NOTICE_CHECK = 10.0


@dataclass
class ClientStats:
    """What the client's follower fetched (replies, and events of trees it waits on)."""

    fetched_records: int = 0
    #: Key and value bytes of the records received.
    fetched_bytes: int = 0
    #: Events partitions followed (for executions waited on that this client did not start).
    followed_event_partitions: int = 0


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

    @classmethod
    def of(cls, state: ExecutionState) -> ExecutionDescription:
        context = state.context
        return cls(context.workflow_exec_id, context.workflow_run_id, context.workflow_name, state.status,
                   context.parent_workflow_exec_id, context.root_workflow_exec_id, context.task_queue,
                   state.run_started_at, state.closed_at, state.last_sequence,
                   sorted(a.activity_name + "#" + a.activity_id for a in state.activities.values()),
                   sorted(state.children), state.result_json, state.failure)


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

    async def result(self, timeout: float | None = None) -> Any:
        """The result; raises `WorkflowFailureError` when the execution did not complete."""
        event = await asyncio.wait_for(self.client._closing_event(self), timeout)
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

    async def signal(self, signal: str | Callable[..., Any], payload: Any = None) -> None:
        """Send signal `signal` (a name, or the workflow's `@workflow.signal` method) with
        `payload` (a pydantic model or JSON-able value).

        Returns once the signal is in the execution's history (a WORKFLOW_EXECUTION_SIGNALED
        event): it is then delivered to the handler exactly once, after every signal
        accepted before it. Raises `CommandRejectedError` when the execution is closed or
        unknown.
        """
        await self.client._request(self.execution_id, await self.root(), m.SignalWorkflowExecution(
            signal_name=_handler_name(signal, "__treeflow_signal__"),
            input_json=None if payload is None else to_json(payload), identity=self.client.identity))

    async def query(self, query: str | Callable[..., Any], payload: Any = None, *,
                    timeout: float = DEFAULT_QUERY_TIMEOUT, result_type: Any = None) -> Any:
        """Ask the running execution's query handler `query` (a name, or the workflow's
        `@workflow.query` method) and return its answer, validated as `result_type`
        (default: the method's return annotation, else plain JSON values).

        The answer reflects every event accepted before the query (signals sent before
        it included) and appends nothing to the history. Raises `WorkflowQueryError`
        whose `type` says why there is no answer: QueryNotFound (no such handler),
        QueryFailed (the handler raised), WorkflowClosed / WorkflowNotFound (only running
        executions answer: read a closed one's result or history instead), or
        `QueryTimeoutError` when no worker answered within `timeout` seconds.
        """
        name = _handler_name(query, "__treeflow_query__")
        if result_type is None:
            result_type = typing.get_type_hints(query).get("return", Any) if callable(query) else Any
        root = await self.root()
        deadline = datetime.now(timezone.utc) + timedelta(seconds=timeout)
        request = m.QueryWorkflow(query_name=name, input_json=None if payload is None else to_json(payload),
                                  deadline=deadline, identity=self.client.identity)
        try:
            reply = await asyncio.wait_for(self.client._send(self.execution_id, root, request), timeout)
        except asyncio.TimeoutError:
            raise QueryTimeoutError(await self._no_answer(name, timeout)) from None
        if not reply.accepted:
            error = reply.error
            cause = exception_from_failure(error.cause) if error and error.cause else None
            raise WorkflowQueryError(error.message if error else "query rejected",
                                     error.type if error else "QueryFailed", cause)
        return from_json(reply.result_json, result_type)

    async def _no_answer(self, name: str, timeout: float) -> str:
        message = f"no answer to query {name!r} of {self.execution_id} within {timeout:g}s"
        try:
            found = await asyncio.wait_for(self.describe(), 10)
        except Exception:  # the explanation is best effort; the timeout is the error
            return message
        return (f"{message}: no worker of task queue {found.task_queue!r} answered (is one running?); "
                f"the execution is {found.status.value}")

    async def cancel(self, reason: str = "cancel requested") -> None:
        """Ask the execution to cancel: it gets `asyncio.CancelledError` at its current
        await, may clean up, and ends CANCELED (or keeps running if it ignores it).
        Returns once the request is in its history."""
        await self.client._request(self.execution_id, await self.root(), m.RequestCancelWorkflowExecution(
            reason=reason, identity=self.client.identity))

    async def terminate(self, reason: str = "terminated") -> None:
        """End the execution at once (TERMINATED, with `reason`); no workflow code runs.
        Its open children get their parent close policy."""
        await self.client._request(self.execution_id, await self.root(), m.TerminateWorkflowExecution(
            reason=reason, identity=self.client.identity))


def _handler_name(handler: str | Callable[..., Any], marker: str) -> str:
    if isinstance(handler, str):
        return handler
    name = getattr(handler, marker, None)
    if not name:
        kind = "signal" if "signal" in marker else "query"
        raise TypeError(f"{handler!r} is not a @workflow.{kind} method; pass its name or the decorated method")
    return name


class Client:
    """A connection to treeflow's topics. Use `await Client.connect()` (or `treeflow.connect()`)."""

    def __init__(self, settings: KafkaSettings, identity: str | None = None) -> None:
        self.settings = settings
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._follower: asyncio.Task[None] | None = None
        self._replies: dict[str, asyncio.Future[Reply]] = {}
        self._waiters: dict[str, list[asyncio.Future[Event]]] = {}
        self._closed: OrderedDict[str, Event] = OrderedDict()
        self._started_here: set[str] = set()
        self._roots = RootCache(settings, scan=True, size=KNOWN_ROOTS)
        #: The replies partition this client reads; named in each command it sends.
        self.reply_partition = partition_for(f"{self.identity}/{new_id()}", settings.partitions)
        self.stats = ClientStats()
        self._assignment: set[TopicPartition] = set()
        self._assigning = asyncio.Lock()

    @classmethod
    async def connect(cls, bootstrap_servers: str | None = None, *, identity: str | None = None,
                      **settings: Any) -> Client:
        """Connect to the Kafka named by `bootstrap_servers` or `TREEFLOW_BOOTSTRAP_SERVERS`."""
        client = cls(KafkaSettings.resolve(bootstrap_servers, **settings), identity)
        await client.start()
        return client

    async def start(self) -> None:
        topics = self.settings.topics
        self._producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap_servers,
                                          **self.settings.profile.producer_options())
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers,
                                          enable_auto_commit=False, auto_offset_reset="earliest",
                                          fetch_max_wait_ms=self.settings.profile.fetch_max_wait_ms)
        await self._consumer.start()
        await self._follow_partitions({TopicPartition(topics.replies, self.reply_partition)})
        self._follower = asyncio.ensure_future(self._follow())

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------ starting

    async def start_workflow(self, workflow: type | str, params: Any = None, *, execution_id: str | None = None,
                             execution_timeout: timedelta | None = None, task_queue: str | None = None,
                             retry_policy: RetryPolicy | None = None) -> WorkflowHandle:
        """Start a top-level execution; returns once the processor accepted it.

        Raises `WorkflowAlreadyStartedError` when `execution_id` is already running.
        """
        definition = None if isinstance(workflow, str) else workflow_definition(workflow)
        name = workflow if isinstance(workflow, str) else definition.name  # type: ignore[union-attr]
        if definition is not None and definition.param_type is not None and params is not None:
            from .payloads import validate

            params = validate(params, definition.param_type)  # fail here, not in the worker
        exec_id = execution_id or new_id()
        timeout = execution_timeout or (definition.execution_timeout if definition else None)
        queue = task_queue or (definition.task_queue if definition else None) or DEFAULT_TASK_QUEUE
        reply = await self._send(exec_id, exec_id, m.StartWorkflowExecution(
            workflow_name=name, task_queue=queue, input_json=None if params is None else to_json(params),
            execution_timeout_ms=millis(timeout), retry_policy=retry_policy.to_record() if retry_policy else None,
            identity=self.identity))
        if not reply.accepted:
            error = reply.error
            if error is not None and error.type == "WorkflowAlreadyStarted":
                raise WorkflowAlreadyStartedError(error.message)
            raise CommandRejectedError(error.message if error else "rejected")
        self._started_here.add(exec_id)
        self._roots.remember(exec_id, exec_id)
        return WorkflowHandle(self, exec_id, exec_id, definition.return_type if definition else Any,
                              reply.workflow_run_id)

    async def execute_workflow(self, workflow: type | str, params: Any = None, *, wait: bool = True,
                               **options: Any) -> Any:
        """Start an execution; with `wait=True` return its result, else its handle."""
        handle = await self.start_workflow(workflow, params, **options)
        return await handle.result() if wait else handle

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
        one pass over the whole events topic. Raises `CommandRejectedError` when no event
        names the execution.
        """
        try:
            root = await self._roots.find(execution_id)
        except AmbiguousExecutionError as error:
            raise CommandRejectedError(str(error)) from None
        if root is None:
            raise CommandRejectedError(f"workflow execution {execution_id} not found: no event of it in "
                                       f"{self.settings.topics.events}")
        return root

    async def history(self, execution_id: str, *, root_execution_id: str | None = None) -> list[Event]:
        """Every event of the execution (all its runs), in order; `root_execution_id` saves
        a `find_root` lookup."""
        root = root_execution_id or await self.find_root(execution_id)
        return [e for e in await self._tree_events(root) if e.workflow_context.workflow_exec_id == execution_id]

    async def describe(self, execution_id: str, *, root_execution_id: str | None = None) -> ExecutionDescription:
        """The execution as folded from its events; `root_execution_id` saves a `find_root` lookup."""
        root = root_execution_id or await self.find_root(execution_id)
        states = fold(await self._tree_events(root))
        if execution_id not in states:
            raise CommandRejectedError(f"workflow execution {execution_id} not found in the tree of {root}")
        return ExecutionDescription.of(states[execution_id])

    async def describe_tree(self, execution_id: str, *, root_execution_id: str | None = None
                            ) -> list[ExecutionDescription]:
        """Every execution of the tree that holds `execution_id` (usually its root id),
        parents before their children. Reads the root's partition of the events topic."""
        root = root_execution_id or await self.find_root(execution_id)
        states = fold(await self._tree_events(root))
        return [ExecutionDescription.of(state) for state in states.values()]

    async def _tree_events(self, root: str) -> list[Event]:
        reader = EventReader(self.settings, [partition_for(root, self.settings.partitions)], key=root)
        return [item.event async for item in reader if item.event.workflow_context.root_workflow_exec_id == root]

    # ------------------------------------------------------------ internals

    async def _request(self, exec_id: str, root: str, payload: Any) -> None:
        reply = await self._send(exec_id, root, payload)
        if not reply.accepted:
            raise CommandRejectedError(reply.error.message if reply.error else "rejected")

    async def _send(self, exec_id: str, root: str, payload: Any) -> Reply:
        assert self._producer is not None, "call start() (or use Client.connect()) first"
        command = Command(command_id=new_id(), timestamp=datetime.now(timezone.utc),
                          root_workflow_exec_id=root, workflow_exec_id=exec_id, payload=payload,
                          reply_partition=self.reply_partition)
        answered: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._replies[command.command_id] = answered
        try:
            await self._producer.send_and_wait(self.settings.topics.commands, COMMANDS.encode(command),
                                               key=root.encode())
            return await answered
        finally:
            self._replies.pop(command.command_id, None)

    async def _closing_event(self, handle: WorkflowHandle) -> Event:
        exec_id = handle.execution_id
        if exec_id in self._closed:
            return self._closed[exec_id]
        waiter: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(exec_id, []).append(waiter)
        try:
            if exec_id not in self._started_here:
                # Follow its tree's partition from now, then look in its history (it may
                # have closed before).
                root = await handle.root()
                await self._follow_partitions({TopicPartition(self.settings.topics.events,
                                                              partition_for(root, self.settings.partitions))})
                found = await self._closed_in_log(exec_id, root)
                if found is not None:
                    return found
                return await waiter
            # Started here: the processor sends its closing event to our replies partition.
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter), CLOSE_NOTICE_CHECK)
                except asyncio.TimeoutError:
                    found = await self._closed_in_log(exec_id, await handle.root())
                    if found is not None:
                        return found
        finally:
            waiters = self._waiters.get(exec_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(exec_id, None)

    async def _closed_in_log(self, exec_id: str, root: str) -> Event | None:
        for event in reversed(await self.history(exec_id, root_execution_id=root)):
            if event.event_type in FINAL:
                return event
            if event.event_type is EventType.WORKFLOW_EXECUTION_STARTED:
                break
        return None

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
                        elif headers.get("tf.type") in _FINAL_HEADERS:
                            self._on_close(EVENTS.decode(record.value, RecordPosition(tp.topic, tp.partition,
                                                                                      record.offset)))
                    except DecodeError as error:
                        log.error("client skipped a record: %s", error)

    def _on_reply(self, record: Any, headers: dict[str, bytes], tp: TopicPartition) -> None:
        if "tf.closed" in headers:
            notice = REPLIES.decode(record.value, RecordPosition(tp.topic, tp.partition, record.offset))
            if notice.closing_event is not None:
                self._on_close(notice.closing_event)
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
        self._closed[exec_id] = event
        self._closed.move_to_end(exec_id)
        while len(self._closed) > RECENT_CLOSES:
            self._closed.popitem(last=False)
        for waiter in self._waiters.pop(exec_id, []):
            if not waiter.done():
                waiter.set_result(event)


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


async def close_default_clients() -> None:
    for key, client in list(_default.items()):
        if key[0] == id(asyncio.get_running_loop()):
            await client.close()
            del _default[key]


async def connect(bootstrap_servers: str | None = None, **settings: Any) -> Client:
    """Connect a client (`TREEFLOW_BOOTSTRAP_SERVERS` when `bootstrap_servers` is None)."""
    return await Client.connect(bootstrap_servers, **settings)
