"""The routes of Mistral's Workflows API (executions and events), on treeflow's engine.

Mounted by the gateway (`treeflow.consumers.gateway.create_app`); README.md, "Mistral's
HTTP API", lists the routes, their parameters and what differs from Mistral's.
Errors are FastAPI's shapes, as Mistral's API answers them: ``{"detail": "..."}`` with
400, 404, 408, 409, 503 or 504, and ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``
with 422 (a body or parameter that does not fit).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from treeflow.errors import (
    ApplicationError,
    CommandRejectedError,
    DeadlineExceededError,
    ExecutionNotFoundError,
    TreeflowError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
    WorkflowNotRegisteredError,
    WorkflowQueryError,
    WorkflowUpdateError,
)
from treeflow.kafka import KafkaSettings, end_offsets, partition_for
from treeflow.schemas import Event

from .. import sse
from ..cursor import Cursor, CursorError, cursor_before
from ..events import TreeEvent
from ..filters import EventFilter
from ..reader import EventReader, partition_count
from ..subscription import TreeSubscription
from .shapes import (
    CLOSED_EVENTS,
    MISTRAL_EVENT_TYPES,
    ActivityInputs,
    decoded,
    execution_status,
    history_event,
    mistral_event,
    mistral_type,
    scope_of,
    sse_payload,
    stream_name,
)

if TYPE_CHECKING:
    from treeflow.client import Client, ExecutionDescription
    from treeflow.definitions import WorkflowDefinition

    from ..gateway import _Gateway

log = logging.getLogger(__name__)

#: ``format=`` values of the stream routes: Mistral's frames (the default) or treeflow's.
MISTRAL, TREEFLOW = "mistral", "treeflow"
ANY = "*"
TRUE = {"1", "true", "yes", "on"}
#: How long a query waits for a worker's answer (seconds).
QUERY_TIMEOUT = 30.0
#: The most events one page of ``/v1/workflows/events/list`` holds.
MAX_PAGE = 1000


class _Invalid(Exception):
    """Answered 422 in FastAPI's shape: one entry per problem."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(str(e["msg"]) for e in errors))
        self.errors = errors

    @classmethod
    def one(cls, where: str, name: str, message: str, kind: str = "value_error") -> _Invalid:
        return cls([{"loc": [where, name], "msg": message, "type": kind}])

    @classmethod
    def of(cls, error: ValidationError, where: str) -> _Invalid:
        return cls([{"loc": [where, *error["loc"]], "msg": error["msg"], "type": error["type"]}
                    for error in error.errors(include_url=False, include_context=False, include_input=False)])


class _Refused(Exception):
    """Answered with `status` and ``{"detail": ...}`` (plus `extra` fields)."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.extra = extra


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ExecuteBody(_Body):
    """Mistral's WorkflowExecutionRequest (the fields treeflow acts on; the others are ignored)."""

    input: Any = None
    execution_id: str | None = Field(default=None, min_length=1)
    wait_for_result: bool = False
    timeout_seconds: float | None = Field(default=None, gt=0)
    task_queue: str | None = None
    deployment_name: str | None = None


class InvocationBody(_Body):
    """Mistral's Signal/Query/UpdateInvocationBody: a handler's name and its input."""

    name: str = Field(min_length=1)
    input: Any = None


class ReasonBody(_Body):
    """What cancel and terminate may be given (Mistral's send no body)."""

    reason: str | None = None


class BatchBody(_Body):
    """Mistral's BatchExecutionBody."""

    execution_ids: list[str] = Field(min_length=1)


Handler = Callable[[Request], Awaitable[Response]]


class MistralApi:
    """The handlers; one `Client` (started on first use) sends their commands. `close()` it."""

    def __init__(self, gateway: _Gateway, workflows: Mapping[str, WorkflowDefinition] | None,
                 visibility_url: str | None, default_format: str = MISTRAL) -> None:
        if default_format not in (MISTRAL, TREEFLOW):
            raise ValueError(f"frames must be {MISTRAL!r} or {TREEFLOW!r}, not {default_format!r}")
        self.gateway = gateway
        self.settings: KafkaSettings = gateway.settings
        self.workflows = dict(workflows or {})
        self.visibility_url = visibility_url
        self.default_format = default_format
        self._client: Client | None = None
        self._connecting = asyncio.Lock()

    def routes(self) -> list[BaseRoute]:
        """The routes, most specific paths first (``/v1/workflows/{name}`` would match the rest)."""
        wrap = self._answering
        return [
            Route("/v1/workflows", wrap(self.list_workflows), methods=["GET"]),
            Route("/v1/workflows/events/stream", wrap(self.events_stream), methods=["GET"]),
            Route("/v1/workflows/events/list", wrap(self.events_list), methods=["GET"]),
            Route("/v1/workflows/executions/cancel", wrap(self.batch_cancel), methods=["POST"]),
            Route("/v1/workflows/executions/terminate", wrap(self.batch_terminate), methods=["POST"]),
            Route("/v1/workflows/executions/{execution_id}", wrap(self.get_execution), methods=["GET"]),
            Route("/v1/workflows/executions/{execution_id}/history", wrap(self.history), methods=["GET"]),
            Route("/v1/workflows/executions/{execution_id}/stream", wrap(self.execution_stream), methods=["GET"]),
            Route("/v1/workflows/executions/{execution_id}/signals", wrap(self.signal), methods=["POST"]),
            Route("/v1/workflows/executions/{execution_id}/queries", wrap(self.query), methods=["POST"]),
            Route("/v1/workflows/executions/{execution_id}/updates", wrap(self.update), methods=["POST"]),
            Route("/v1/workflows/executions/{execution_id}/cancel", wrap(self.cancel), methods=["POST"]),
            Route("/v1/workflows/executions/{execution_id}/terminate", wrap(self.terminate), methods=["POST"]),
            Route("/v1/workflows/{workflow_identifier}/execute", wrap(self.execute), methods=["POST"]),
        ]

    async def client(self) -> Client:
        from treeflow.client import Client

        async with self._connecting:
            if self._client is None:
                client = Client(self.settings, identity="treeflow-mistral-api", visibility_url=self.visibility_url)
                await client.start()
                self._client = client
            return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ------------------------------------------------------------ workflows

    async def list_workflows(self, request: Request) -> Response:
        query = request.query_params
        limit = _int(query, "limit", 50, minimum=1)
        search = (query.get("search") or "").lower()
        rows = [_workflow_json(d) for d in self.workflows.values()]
        if query.get("archived", "").lower() in TRUE:
            rows = []  # treeflow archives nothing
        if search:
            rows = [r for r in rows if any(search in (r[k] or "").lower() for k in ("name", "display_name",
                                                                                   "description"))]
        rows.sort(key=lambda r: (r["display_name"], r["name"]), reverse=query.get("order") == "desc")
        cursor = query.get("cursor")
        if cursor:
            names = [r["name"] for r in rows]
            if cursor not in names:
                raise _Invalid.one("query", "cursor", f"cursor {cursor!r} is no workflow of this list")
            rows = rows[names.index(cursor) + 1:]
        page = rows[:limit]
        more = len(rows) > limit
        return JSONResponse({"workflows": page, "next_cursor": page[-1]["name"] if more else None})

    async def execute(self, request: Request) -> Response:
        name = request.path_params["workflow_identifier"]
        body = await _body(request, ExecuteBody)
        definition = self.workflows.get(name)
        if self.workflows and definition is None:
            raise _Refused(404, f"workflow {name!r} is not registered here; registered: "
                                f"{', '.join(sorted(self.workflows))}")
        if definition is not None:
            try:  # no input fits an entrypoint whose parameters all have defaults
                definition.parameters.bind(None if body.input is None else json.dumps(body.input))
            except ApplicationError as error:
                raise _Invalid.one("body", "input", str(error)) from None
        client = await self.client()
        handle = await client.start_workflow(definition.cls if definition is not None else name, body.input,
                                             execution_id=body.execution_id,
                                             task_queue=body.task_queue or body.deployment_name)
        if not body.wait_for_result:
            return JSONResponse(_execution_json(await client.describe(handle.execution_id,
                                                                      root_execution_id=handle.execution_id)))
        plain = client.get_handle(handle.execution_id, root_execution_id=handle.execution_id)
        try:
            result = await plain.result(body.timeout_seconds)
        except DeadlineExceededError:
            raise _Refused(408, f"workflow execution {handle.execution_id} did not complete within "
                                f"{body.timeout_seconds:g}s; it goes on: GET /v1/workflows/executions/"
                                f"{handle.execution_id}", execution_id=handle.execution_id) from None
        return JSONResponse({"workflow_name": name, "execution_id": handle.execution_id, "result": result})

    # ------------------------------------------------------------ executions

    async def get_execution(self, request: Request) -> Response:
        execution_id = request.path_params["execution_id"]
        client = await self.client()
        return JSONResponse(_execution_json(await client.describe(execution_id)))

    async def history(self, request: Request) -> Response:
        execution_id = request.path_params["execution_id"]
        decode = _bool(request.query_params, "decode_payloads", True)
        client = await self.client()
        events = await client.history(execution_id)
        if not events:
            raise ExecutionNotFoundError(f"workflow execution {execution_id} not found")
        return JSONResponse({"events": [history_event(e, decode) for e in events]})

    async def signal(self, request: Request) -> Response:
        body = await _body(request, InvocationBody)
        handle = (await self.client()).get_handle(request.path_params["execution_id"])
        await handle.signal(body.name, body.input)
        return JSONResponse({"message": "Signal accepted"}, status_code=202)

    async def query(self, request: Request) -> Response:
        body = await _body(request, InvocationBody)
        handle = (await self.client()).get_handle(request.path_params["execution_id"])
        result = await handle.query(body.name, body.input, timeout=QUERY_TIMEOUT)
        return JSONResponse({"query_name": body.name, "result": result})

    async def update(self, request: Request) -> Response:
        body = await _body(request, InvocationBody)
        handle = (await self.client()).get_handle(request.path_params["execution_id"])
        result = await handle.update(body.name, body.input)
        return JSONResponse({"update_name": body.name, "result": result})

    async def cancel(self, request: Request) -> Response:
        body = await _body(request, ReasonBody, optional=True)
        handle = (await self.client()).get_handle(request.path_params["execution_id"])
        await handle.cancel(body.reason or "canceled through the HTTP API")
        return Response(status_code=204)

    async def terminate(self, request: Request) -> Response:
        body = await _body(request, ReasonBody, optional=True)
        handle = (await self.client()).get_handle(request.path_params["execution_id"])
        await handle.terminate(body.reason or "terminated through the HTTP API")
        return Response(status_code=204)

    async def batch_cancel(self, request: Request) -> Response:
        return await self._batch(request, lambda handle: handle.cancel("canceled through the HTTP API (batch)"))

    async def batch_terminate(self, request: Request) -> Response:
        return await self._batch(request, lambda handle: handle.terminate("terminated through the HTTP API (batch)"))

    async def _batch(self, request: Request, call: Callable[[Any], Awaitable[None]]) -> Response:
        body = await _body(request, BatchBody)
        client = await self.client()

        async def one(execution_id: str) -> dict[str, Any]:
            try:
                await call(client.get_handle(execution_id))
            except TreeflowError as error:
                return {"status": "failure", "error": str(error)}
            return {"status": "success"}

        ids = list(dict.fromkeys(body.execution_ids))
        results = await asyncio.gather(*(one(i) for i in ids))
        return JSONResponse({"results": dict(zip(ids, results))})

    # ------------------------------------------------------------ events

    async def execution_stream(self, request: Request) -> Response:
        if self._format(request) == TREEFLOW:
            return await self.gateway.execution_stream(request)
        execution_id = request.path_params["execution_id"]
        query = request.query_params
        source = (query.get("event_source") or "HYBRID").upper()
        if source not in ("DATABASE", "LIVE", "HYBRID"):
            raise _Invalid.one("query", "event_source", "event_source must be DATABASE, LIVE or HYBRID")
        root = await self.gateway.root_of(execution_id, query.get("root_workflow_exec_id"))
        last = request.headers.get("last-event-id") or query.get("last_event_id")
        cursor = await self._cursor(root, last, _int(query, "start_seq", 0, minimum=0))
        event_filter = EventFilter.of(workflow_exec_ids=execution_id)
        subscription: Any
        if source == "DATABASE":
            subscription = _History(self.settings, root, event_filter, cursor)
        else:
            subscription = TreeSubscription(root, settings=self.settings, cursor=cursor, event_filter=event_filter,
                                            from_beginning=source == "HYBRID" or cursor is not None)
        subscription = _Until(subscription, lambda e: e.workflow_exec_id == execution_id
                              and e.event_type in CLOSED_EVENTS)
        await subscription.start()
        return self.gateway.stream(request, subscription, MistralFrames().format())

    async def events_stream(self, request: Request) -> Response:
        if self._format(request) == TREEFLOW:
            return await self.gateway.events_stream(request)
        query = request.query_params
        scope = query.get("scope") or ANY
        if scope not in (ANY, "activity", "workflow"):
            raise _Invalid.one("query", "scope", "scope must be 'activity', 'workflow' or '*'")
        types = _event_types(query)
        if _given(query, "metadata_filters") and json.loads(query["metadata_filters"] or "{}"):
            raise _Refused(400, "metadata_filters: treeflow's events carry no metadata (search keys), so no event "
                                "would match; filter on workflow_name, the execution ids or the event types")
        start_seq = _int(query, "start_seq", 0, minimum=0)
        last = request.headers.get("last-event-id") or query.get("last_event_id")
        root, exec_id, parent = (_given(query, n) for n in ("root_workflow_exec_id", "workflow_exec_id",
                                                             "parent_workflow_exec_id"))
        event_filter = EventFilter.of(workflow_names=_given(query, "workflow_name"), workflow_exec_ids=exec_id,
                                      parent_workflow_exec_ids=parent, root_workflow_exec_ids=root)
        frames = MistralFrames(types, None if scope == ANY else scope, _given(query, "activity_name"),
                               _given(query, "activity_id"), _given(query, "stream"))
        subscription: Any
        if root or exec_id or parent:
            tree = root or await self.gateway.root_of(exec_id or parent or "", None)
            subscription = TreeSubscription(tree, settings=self.settings,
                                            cursor=await self._cursor(tree, last, start_seq),
                                            event_filter=event_filter,
                                            until_closed=query.get("until_closed", "").lower() in TRUE)
        else:
            if start_seq or last:
                raise _Refused(400, "a stream of every tree starts live: start_seq and Last-Event-ID resume the "
                                    "stream of one tree (give root_workflow_exec_id, workflow_exec_id or "
                                    "parent_workflow_exec_id)")
            subscription = _AllTrees(self.settings, event_filter)
        await subscription.start()
        return self.gateway.stream(request, subscription, frames.format())

    async def events_list(self, request: Request) -> Response:
        query = request.query_params
        limit = _int(query, "limit", 100, minimum=1, maximum=MAX_PAGE)
        root, exec_id, run_id = (_given(query, n) for n in ("root_workflow_exec_id", "workflow_exec_id",
                                                             "workflow_run_id"))
        if not (root or exec_id):
            raise _Refused(400, "give root_workflow_exec_id or workflow_exec_id: treeflow lists the events of one "
                                "tree (its partition of the events topic)")
        tree = root or await self.gateway.root_of(exec_id or "", None)
        partition = partition_for(tree, await partition_count(self.settings))
        start = 0
        if _given(query, "cursor"):
            after = _cursor_param(query["cursor"], "cursor")
            if after.partition != partition:
                raise _Refused(400, f"cursor {after} belongs to another tree's partition")
            start = after.offset + 1
        inputs = ActivityInputs()
        page: list[dict[str, Any]] = []
        last: Cursor | None = None
        more = False
        reader = EventReader(self.settings, [partition], key=tree, start_offsets={partition: start})
        async for item in reader:
            event = item.event
            context = event.workflow_context
            if (context.root_workflow_exec_id != tree or (exec_id and context.workflow_exec_id != exec_id)
                    or (run_id and context.workflow_run_id != run_id)):
                continue
            activity_input = inputs.observe(event)
            data = mistral_event(event, activity_input)
            if data is None:
                continue
            if len(page) == limit:
                more = True
                break
            page.append(data)
            last = Cursor(item.partition, item.offset)
        return JSONResponse({"events": page, "next_cursor": str(last) if more and last is not None else None})

    # ------------------------------------------------------------ helpers

    def _format(self, request: Request) -> str:
        given = request.query_params.get("format") or self.default_format
        if given not in (MISTRAL, TREEFLOW):
            raise _Invalid.one("query", "format", f"format must be {MISTRAL!r} or {TREEFLOW!r}")
        return given

    async def _cursor(self, root: str, last_event_id: str | None, start_seq: int) -> Cursor | None:
        if last_event_id:
            return Cursor.parse(last_event_id)
        if start_seq:
            return cursor_before(start_seq, partition_for(root, await partition_count(self.settings)))
        return None

    def _answering(self, handler: Handler) -> Handler:
        """`handler`, its errors answered in Mistral's (FastAPI's) shapes."""

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:  # noqa: BLE001 - every error becomes an answer, never a traceback
                return _error_response(error, request)

        return answer


class MistralFrames:
    """Mistral's SSE frames (StreamEventSsePayload), with the filters Mistral's stream has that
    treeflow's `EventFilter` does not: Mistral event types, scope, activity, stream name."""

    def __init__(self, event_types: frozenset[str] | None = None, scope: str | None = None,
                 activity_name: str | None = None, activity_id: str | None = None, stream: str | None = None) -> None:
        self.event_types = event_types
        self.scope = scope
        self.activity_name = activity_name
        self.activity_id = activity_id
        self.stream = stream
        self.inputs = ActivityInputs()

    def keeps(self, event: Event) -> bool:
        payload = event.payload
        return ((self.event_types is None or mistral_type(event.event_type) in self.event_types)
                and (self.scope is None or scope_of(event) == self.scope)
                and (self.activity_name is None or getattr(payload, "activity_name", None) == self.activity_name)
                and (self.activity_id is None or getattr(payload, "activity_id", None) == self.activity_id)
                and (self.stream is None or stream_name(event) == self.stream))

    def event(self, item: TreeEvent[Any], retry: int | None) -> str | None:
        event = item.to_event()
        activity_input = self.inputs.observe(event)
        if not self.keeps(event):
            return None
        data = mistral_event(event, activity_input)
        if data is None:
            return None
        payload = sse_payload(event, int(item.cursor), data)
        return sse.frame(json.dumps(payload), event=data["event_type"], id=item.cursor, retry=retry)

    @staticmethod
    def error(error: BaseException, retry: int | None) -> str:
        """Mistral's WorkflowStreamError frame."""
        return sse.frame(json.dumps({"error": type(error).__name__, "reason": str(error)}), event=sse.ERROR_EVENT,
                         retry=retry)

    @staticmethod
    def end(retry: int | None) -> None:
        return None  # Mistral's streams just end

    def format(self) -> sse.FrameFormat:
        return sse.FrameFormat(self.event, self.error, self.end)


class _Until:
    """A subscription that ends right after the event `last` holds for."""

    def __init__(self, inner: Any, last: Callable[[TreeEvent[Any]], bool]) -> None:
        self.inner = inner
        self.last = last
        self.root_workflow_exec_id = inner.root_workflow_exec_id
        self._events: AsyncIterator[TreeEvent[Any]] | None = None

    async def start(self) -> None:
        await self.inner.start()

    def __aiter__(self) -> AsyncIterator[TreeEvent[Any]]:
        self._events = self._stream()
        return self._events

    async def _stream(self) -> AsyncIterator[TreeEvent[Any]]:
        async for event in self.inner:
            yield event
            if self.last(event):
                return

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()  # type: ignore[attr-defined]
        await self.inner.aclose()


class _History:
    """A tree's events recorded so far (Mistral's ``event_source=DATABASE``), then the end."""

    def __init__(self, settings: KafkaSettings, root: str, event_filter: EventFilter, cursor: Cursor | None) -> None:
        self.settings = settings
        self.root_workflow_exec_id = root
        self.filter = event_filter
        self.cursor = cursor
        self._events: AsyncIterator[TreeEvent[Any]] | None = None

    async def start(self) -> None:
        pass

    def __aiter__(self) -> AsyncIterator[TreeEvent[Any]]:
        self._events = self._stream()
        return self._events

    async def _stream(self) -> AsyncIterator[TreeEvent[Any]]:
        root = self.root_workflow_exec_id
        partition = partition_for(root, await partition_count(self.settings))
        if self.cursor is not None and self.cursor.partition != partition:
            raise CursorError(f"cursor {self.cursor} belongs to another tree")
        start = 0 if self.cursor is None else self.cursor.offset + 1
        async for item in EventReader(self.settings, [partition], key=root, start_offsets={partition: start}):
            if item.event.workflow_context.root_workflow_exec_id == root and self.filter.matches(item.event):
                yield TreeEvent.of(item.event, Cursor(item.partition, item.offset))

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()  # type: ignore[attr-defined]


class _AllTrees:
    """Every tree's events appended after `start()`: all partitions of the events topic, no group."""

    root_workflow_exec_id = ANY

    def __init__(self, settings: KafkaSettings, event_filter: EventFilter) -> None:
        self.settings = settings
        self.filter = event_filter
        self._starts: dict[int, int] | None = None
        self._events: AsyncIterator[TreeEvent[Any]] | None = None

    async def start(self) -> None:
        from aiokafka import TopicPartition

        topic = self.settings.topics.events
        partitions = [TopicPartition(topic, p) for p in range(await partition_count(self.settings))]
        self._starts = {tp.partition: offset for tp, offset in (await end_offsets(self.settings, partitions)).items()}

    def __aiter__(self) -> AsyncIterator[TreeEvent[Any]]:
        self._events = self._stream()
        return self._events

    async def _stream(self) -> AsyncIterator[TreeEvent[Any]]:
        assert self._starts is not None, "start() first"
        reader = EventReader(self.settings, list(self._starts), follow=True, start_offsets=self._starts)
        async for item in reader:
            if self.filter.matches(item.event):
                yield TreeEvent.of(item.event, Cursor(item.partition, item.offset))

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()  # type: ignore[attr-defined]


# ------------------------------------------------------------ shapes and parsing


def _workflow_json(definition: WorkflowDefinition) -> dict[str, Any]:
    """Mistral's WorkflowBasicDefinition of a registered workflow."""
    return {"id": definition.name, "name": definition.name, "display_name": definition.display_name or definition.name,
            "archived": False, "description": definition.description, "tags": []}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _execution_json(found: ExecutionDescription) -> dict[str, Any]:
    """Mistral's WorkflowExecutionResponse of a described execution (a failure's record added)."""
    status = found.status.value
    duration = None if found.closed_at is None else int((found.closed_at - found.started_at).total_seconds() * 1000)
    answer: dict[str, Any] = {
        "workflow_name": found.workflow_name, "execution_id": found.execution_id,
        "root_execution_id": found.root_execution_id, "parent_execution_id": found.parent_execution_id,
        "status": execution_status(status, found.workflow_task_failure_cause),
        "start_time": _iso(found.started_at), "end_time": _iso(found.closed_at),
        "result": decoded(found.result_json) if status == "COMPLETED" else None,
        "run_id": found.run_id, "workflow_id": found.workflow_name, "deployment_name": found.task_queue,
        "total_duration_ms": duration,
    }
    failure = found.failure or found.workflow_task_failure
    if failure is not None:
        answer["failure"] = {"type": failure.type, "message": failure.message}
    return answer


async def _body(request: Request, model: type[_Body], optional: bool = False) -> Any:
    raw = await request.body()
    if not raw.strip():
        if optional:
            return model()
        raise _Invalid([{"loc": ["body"], "msg": "Field required", "type": "missing"}])
    try:
        value = json.loads(raw)
    except ValueError as error:
        raise _Invalid([{"loc": ["body"], "msg": f"JSON decode error: {error}", "type": "json_invalid"}]) from None
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise _Invalid.of(error, "body") from None


def _given(query: Mapping[str, str], name: str) -> str | None:
    """A query parameter, None when absent, empty or Mistral's wildcard ``*``."""
    value = query.get(name)
    return None if value in (None, "", ANY) else value


def _int(query: Mapping[str, str], name: str, default: int, *, minimum: int | None = None,
         maximum: int | None = None) -> int:
    text = query.get(name)
    if text in (None, ""):
        return default
    try:
        value = int(text)
    except ValueError:
        raise _Invalid.one("query", name, "Input should be a valid integer", "int_parsing") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise _Invalid.one("query", name, f"Input should be {bounds}")
    return value


def _bool(query: Mapping[str, str], name: str, default: bool) -> bool:
    text = (query.get(name) or "").lower()
    if not text:
        return default
    if text not in TRUE | {"0", "false", "no", "off"}:
        raise _Invalid.one("query", name, "Input should be a valid boolean", "bool_parsing")
    return text in TRUE


def _cursor_param(text: str, name: str) -> Cursor:
    try:
        return Cursor.parse(text)
    except CursorError as error:
        raise _Invalid.one("query", name, str(error)) from None


def _event_types(query: Any) -> frozenset[str] | None:
    names = [n.strip().upper() for value in query.getlist("workflow_event_types") for n in value.split(",")
             if n.strip() and n.strip() != ANY]
    unknown = [n for n in names if n not in MISTRAL_EVENT_TYPES]
    if unknown:
        raise _Invalid.one("query", "workflow_event_types", f"unknown event type(s) {', '.join(unknown)}; Mistral's "
                                                           f"are {', '.join(MISTRAL_EVENT_TYPES)} (format=treeflow "
                                                           "streams every treeflow type)", "enum")
    return frozenset(names) or None


def _error_response(error: BaseException, request: Request) -> Response:
    """The answer to a failed request: a status and FastAPI's ``detail`` shape; never a traceback."""
    if isinstance(error, _Invalid):
        return JSONResponse({"detail": error.errors}, status_code=422)
    if isinstance(error, _Refused):
        return JSONResponse({"detail": error.detail, **error.extra}, status_code=error.status)
    status = _status_of(error)
    if status is None:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=error)
        return JSONResponse({"detail": f"internal error: {type(error).__name__}: {error}"}, status_code=500)
    if status == 422:  # FastAPI's shape: a list of problems
        return JSONResponse({"detail": [{"loc": ["body", "input"], "msg": str(error), "type": "value_error"}]},
                            status_code=422)
    detail: dict[str, Any] = {"detail": str(error)}
    if isinstance(error, (WorkflowQueryError, WorkflowUpdateError)):
        detail["type"] = error.type
    if isinstance(error, WorkflowFailureError):
        detail.update(execution_id=error.execution_id, status=error.status)
    return JSONResponse(detail, status_code=status)


def _status_of(error: BaseException) -> int | None:
    """The HTTP status of one of treeflow's errors (None: not one that is expected)."""
    from ..gateway import _HttpError
    from ..visibility import VisibilityError

    if isinstance(error, _HttpError):
        return error.status
    if isinstance(error, (WorkflowQueryError, WorkflowUpdateError)):
        return {"QueryNotFound": 404, "UpdateNotFound": 404, "WorkflowNotFound": 404, "UpdateRejected": 422,
                "QueryTimeout": 504, "UpdateTimeout": 504}.get(error.type, 409)
    if isinstance(error, ExecutionNotFoundError):
        return 404
    if isinstance(error, (WorkflowAlreadyStartedError, CommandRejectedError, WorkflowFailureError)):
        return 409
    if isinstance(error, WorkflowNotRegisteredError):
        return 503
    if isinstance(error, DeadlineExceededError):
        return 504
    if isinstance(error, (CursorError, ValueError)):
        return 400
    if isinstance(error, (KafkaError, OSError, LookupError, VisibilityError)) or (
            isinstance(error, TreeflowError) and error.exit_code in (3, 4, 5)):
        return 503
    return None
