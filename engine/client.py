"""The client: start executions, wait for results, and reach any execution by id.

A client writes commands keyed by the root id and follows the events and replies
topics from the moment it connected (one consumer over all partitions, no group):
a start is answered on the replies topic, a result is the execution's closing event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from treeflow.consumers import EventReader
from treeflow.kafka import KafkaSettings, end_offsets, partition_for
from treeflow.schemas import COMMANDS, EVENTS, REPLIES, Command, DecodeError, Event, EventType, RecordPosition, Reply
from treeflow.schemas import models as m

from .core import ExecutionState, Status, fold
from .definitions import DEFAULT_TASK_QUEUE, WorkflowDefinition, workflow_definition
from .ids import new_id
from .errors import (
    CommandRejectedError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
    exception_from_failure,
)
from .options import RetryPolicy, millis
from .payloads import from_json, to_json

log = logging.getLogger(__name__)

#: Closing events kept for results asked for after they arrived.
RECENT_CLOSES = 100_000
FINAL = {EventType.WORKFLOW_EXECUTION_COMPLETED, EventType.WORKFLOW_EXECUTION_FAILED,
         EventType.WORKFLOW_EXECUTION_CANCELED, EventType.WORKFLOW_EXECUTION_TERMINATED,
         EventType.WORKFLOW_EXECUTION_TIMED_OUT}


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
    """An execution: `await handle` (or `await handle.result()`) gives its result."""

    def __init__(self, client: Client, execution_id: str, root_execution_id: str,
                 return_type: Any = Any, run_id: str | None = None) -> None:
        self.client = client
        self.execution_id = execution_id
        self.root_execution_id = root_execution_id
        self.run_id = run_id
        self.return_type = return_type

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result().__await__()

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
        return await self.client.describe(self.execution_id, root_execution_id=self.root_execution_id)

    async def history(self) -> list[Event]:
        return await self.client.history(self.execution_id, root_execution_id=self.root_execution_id)

    async def signal(self, name: str, payload: Any = None) -> None:
        await self.client._request(self.execution_id, self.root_execution_id, m.SignalWorkflowExecution(
            signal_name=name, input_json=None if payload is None else to_json(payload),
            identity=self.client.identity))

    async def cancel(self, reason: str = "cancel requested") -> None:
        await self.client._request(self.execution_id, self.root_execution_id, m.RequestCancelWorkflowExecution(
            reason=reason, identity=self.client.identity))

    async def terminate(self, reason: str = "terminated") -> None:
        await self.client._request(self.execution_id, self.root_execution_id, m.TerminateWorkflowExecution(
            reason=reason, identity=self.client.identity))


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
        partitions = [TopicPartition(topic, p) for topic in (topics.events, topics.replies)
                      for p in range(self.settings.partitions)]
        ends = await end_offsets(self.settings, partitions)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers,
                                          enable_auto_commit=False, auto_offset_reset="earliest",
                                          fetch_max_wait_ms=self.settings.profile.fetch_max_wait_ms)
        await self._consumer.start()
        self._consumer.assign(partitions)
        for tp, offset in ends.items():
            self._consumer.seek(tp, offset)
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
        return WorkflowHandle(self, exec_id, exec_id, definition.return_type if definition else Any,
                              reply.workflow_run_id)

    async def execute_workflow(self, workflow: type | str, params: Any = None, *, wait: bool = True,
                               **options: Any) -> Any:
        """Start an execution; with `wait=True` return its result, else its handle."""
        handle = await self.start_workflow(workflow, params, **options)
        return await handle.result() if wait else handle

    def get_handle(self, execution_id: str, *, root_execution_id: str | None = None,
                   workflow: type | None = None) -> WorkflowHandle:
        """A handle on any execution. A child needs its root id (a top-level one is its own root)."""
        return_type = workflow_definition(workflow).return_type if workflow else Any
        return WorkflowHandle(self, execution_id, root_execution_id or execution_id, return_type)

    # ------------------------------------------------------------ reading

    async def history(self, execution_id: str, *, root_execution_id: str | None = None) -> list[Event]:
        """Every event of the execution (all its runs), in order."""
        root = root_execution_id or execution_id
        return [e for e in await self._tree_events(root) if e.workflow_context.workflow_exec_id == execution_id]

    async def describe(self, execution_id: str, *, root_execution_id: str | None = None) -> ExecutionDescription:
        root = root_execution_id or execution_id
        states = fold(await self._tree_events(root))
        if execution_id not in states:
            raise CommandRejectedError(f"workflow execution {execution_id} not found in the tree of {root}")
        return ExecutionDescription.of(states[execution_id])

    async def describe_tree(self, root_execution_id: str) -> list[ExecutionDescription]:
        """Every execution of the tree, parents before their children."""
        states = fold(await self._tree_events(root_execution_id))
        return [ExecutionDescription.of(state) for state in states.values()]

    async def _tree_events(self, root: str) -> list[Event]:
        reader = EventReader(self.settings, [partition_for(root, self.settings.partitions)])
        return [item.event async for item in reader if item.event.workflow_context.root_workflow_exec_id == root]

    # ------------------------------------------------------------ internals

    async def _request(self, exec_id: str, root: str, payload: Any) -> None:
        reply = await self._send(exec_id, root, payload)
        if not reply.accepted:
            raise CommandRejectedError(reply.error.message if reply.error else "rejected")

    async def _send(self, exec_id: str, root: str, payload: Any) -> Reply:
        assert self._producer is not None, "call start() (or use Client.connect()) first"
        command = Command(command_id=new_id(), timestamp=datetime.now(timezone.utc),
                          root_workflow_exec_id=root, workflow_exec_id=exec_id, payload=payload)
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
                # It may have closed before this client connected: look in its history.
                for event in reversed(await self.history(exec_id, root_execution_id=handle.root_execution_id)):
                    if event.event_type in FINAL:
                        return event
                    if event.event_type is EventType.WORKFLOW_EXECUTION_STARTED:
                        break
            return await waiter
        finally:
            waiters = self._waiters.get(exec_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(exec_id, None)

    async def _follow(self) -> None:
        assert self._consumer is not None
        topics = self.settings.topics
        while True:
            batches = await self._consumer.getmany(timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    headers = dict(record.headers or ())
                    try:
                        if tp.topic == topics.replies:
                            self._on_reply(record, headers, tp)
                        elif headers.get("tf.type", b"").decode() in {t.value for t in FINAL}:
                            self._on_close(EVENTS.decode(record.value, RecordPosition(tp.topic, tp.partition,
                                                                                      record.offset)))
                    except DecodeError as error:
                        log.error("client skipped a record: %s", error)

    def _on_reply(self, record: Any, headers: dict[str, bytes], tp: TopicPartition) -> None:
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
