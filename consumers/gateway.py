"""The HTTP streaming gateway: a workflow tree as server-sent events, for web clients and other languages.

The app also serves Mistral's Workflows API (`treeflow.consumers.mistral`), whose two
stream routes answer with Mistral's frames unless a request asks for treeflow's with
``format=treeflow`` (or `GatewayOptions.frames` makes them the default). treeflow's, below:

- ``GET /v1/workflows/executions/{execution_id}/stream``: one execution's events.
- ``GET /v1/workflows/events/stream``: a tree's events, filtered by
  ``root_workflow_exec_id``, ``parent_workflow_exec_id``, ``workflow_exec_id``,
  ``workflow_name`` and ``workflow_event_types`` (repeated or comma-separated).
  The tree is the one of ``root_workflow_exec_id``, else of ``workflow_exec_id``,
  else of ``parent_workflow_exec_id``; one of them is required (a stream of every
  tree is what `treeflow.consumers.subscribe` is for).

Both take ``start_seq`` (a cursor, **inclusive**: the stream starts with the first
event whose cursor is at least it; ``0`` is the beginning, the default) and honour
``Last-Event-ID`` (exclusive: what a reconnecting EventSource sends; it wins over
``start_seq``), ``until_closed=true`` (end with an ``end`` frame once the tree's
root and every descendant closed) and ``root_workflow_exec_id`` as a hint on the
execution route (else the root is looked up: `treeflow.consumers.lookup`).

Each frame: ``id`` = the event's cursor, ``event`` = its type, ``data`` = the
event as JSON with its ``workflow_context``. A failure after the response
started sends an ``error`` frame and ends the stream; before it, a JSON error
with status 400 (bad parameter), 404 (unknown execution) or 503 (no Kafka).

Needs the ``serve`` extra (Starlette, Uvicorn).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import uvicorn
from aiokafka.errors import KafkaError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from treeflow.errors import TreeflowError
from treeflow.kafka import KafkaSettings, KafkaSetupError, partition_for
from treeflow.observability import metrics
from treeflow.observability.http import KafkaProbe

from . import sse
from .api import api_routes
from .cursor import Cursor, CursorError, cursor_before
from .filters import EventFilter
from .lookup import RootCache
from .mistral import MistralApi
from .reader import partition_count, resolve_settings
from .schedule_api import routes as schedule_routes
from .subscription import TreeSubscription

if TYPE_CHECKING:
    from treeflow.definitions import WorkflowDefinition

log = logging.getLogger(__name__)

TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class GatewayOptions:
    """How the gateway streams."""

    #: A comment line is sent when no event came for this long (keeps proxies and idle checks happy).
    keepalive: timedelta = timedelta(seconds=15)
    #: The reconnection delay the gateway asks EventSource clients to use.
    retry: timedelta = timedelta(seconds=1)
    #: Look for an execution's root in every partition when its id does not say it (a full-topic read).
    scan_for_roots: bool = False
    #: Execution-to-root answers remembered.
    root_cache_size: int = 10_000
    #: Events read ahead of a slow client, per stream.
    buffer: int = 256
    #: The frames of the two stream routes unless a request asks (``format=``): ``mistral``
    #: (Mistral's StreamEventSsePayload) or ``treeflow`` (`TreeEvent` JSON).
    frames: str = "mistral"


class _HttpError(Exception):
    """Answered with `status` and ``{"detail": ...}`` before any stream starts."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def create_app(settings: KafkaSettings | None = None, *, bootstrap_servers: str | None = None,
               options: GatewayOptions | None = None, visibility_url: str | None = None,
               workflows: Mapping[str, WorkflowDefinition] | None = None) -> Starlette:
    """The gateway as an ASGI app: serve it with any ASGI server, or mount it in another app.

    Besides the streams it serves Mistral's Workflows API (`treeflow.consumers.mistral`:
    `workflows` are the registered workflows it lists and starts; any name is started
    when none is given), the JSON API and the web page (`treeflow.consumers.api`);
    their visibility store is `visibility_url`, default ``$TREEFLOW_VISIBILITY_URL``.
    """
    gateway = _Gateway(resolve_settings(bootstrap_servers, settings), options or GatewayOptions())
    api, app_api = api_routes(gateway.settings, visibility_url)
    mistral = MistralApi(gateway, workflows, visibility_url, gateway.options.frames)
    app = Starlette(routes=[
        *schedule_routes(gateway.settings),  # before Mistral's /v1/workflows/{name} routes
        *mistral.routes(),
        Route("/healthz", gateway.health),
        Route("/readyz", gateway.ready),
        Route("/metrics", gateway.metrics),
        *api,
    ])
    app.state.gateway = gateway
    app.state.api = app_api
    app.state.mistral = mistral
    return app


class _Gateway:
    def __init__(self, settings: KafkaSettings, options: GatewayOptions) -> None:
        self.settings = settings
        self.options = options
        self.roots = RootCache(settings, scan=options.scan_for_roots, size=options.root_cache_size)
        self.closing = asyncio.Event()
        self.probe = KafkaProbe(settings, [settings.topics.events])

    async def health(self, request: Request) -> Response:
        """The process is alive (it answers); says nothing of Kafka: that is `/readyz`."""
        return JSONResponse({"status": "ok", "events_topic": self.settings.topics.events})

    async def ready(self, request: Request) -> Response:
        """Kafka answers and the events topic exists, else 503 with what is wrong."""
        problem = await self.probe.check()
        return JSONResponse({"status": "not ready" if problem else "ready", "problems": [problem] if problem else [],
                             "events_topic": self.settings.topics.events}, status_code=503 if problem else 200)

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def execution_stream(self, request: Request) -> Response:
        execution_id = request.path_params["execution_id"]
        query = request.query_params
        return await self._respond(
            request, lambda: self.root_of(execution_id, query.get("root_workflow_exec_id")),
            lambda: EventFilter.of(event_types=query.getlist("workflow_event_types"), workflow_exec_ids=execution_id))

    async def events_stream(self, request: Request) -> Response:
        query = request.query_params
        exec_id, parent = query.get("workflow_exec_id"), query.get("parent_workflow_exec_id")

        async def root() -> str:
            given = query.get("root_workflow_exec_id")
            if given:
                return given
            if exec_id or parent:
                return await self.root_of(exec_id or parent or "", None)
            raise _HttpError(400, "give root_workflow_exec_id (or workflow_exec_id or parent_workflow_exec_id): "
                                  "a stream follows one tree; a service that wants every tree uses "
                                  "treeflow.consumers.subscribe")

        return await self._respond(request, root, lambda: EventFilter.of(
            event_types=query.getlist("workflow_event_types"), workflow_names=query.get("workflow_name"),
            workflow_exec_ids=exec_id, parent_workflow_exec_ids=parent))

    async def root_of(self, execution_id: str, hint: str | None) -> str:
        """The root of `execution_id`'s tree: `hint` when given, else looked up (raises a 404 `_HttpError`)."""
        if hint:
            return hint  # not cached: a wrong hint must not answer later requests
        root = await self.roots.find(execution_id)
        if root is None:
            raise _HttpError(404, f"workflow execution {execution_id} not found; if it is a child started with an "
                                  "id of its own, pass root_workflow_exec_id")
        return root

    async def _respond(self, request: Request, root_of: Callable[[], Awaitable[str]],
                       filter_of: Callable[[], EventFilter]) -> Response:
        query = request.query_params
        try:
            event_filter = filter_of()
            root = await root_of()
            cursor = await self._cursor(root, request.headers.get("last-event-id"), query.get("start_seq"))
            subscription = TreeSubscription(root, settings=self.settings, cursor=cursor, event_filter=event_filter,
                                            until_closed=query.get("until_closed", "").lower() in TRUE)
            await subscription.start()
        except _HttpError as error:
            return JSONResponse({"detail": error.detail}, status_code=error.status)
        except (CursorError, ValueError) as error:
            return JSONResponse({"detail": str(error)}, status_code=400)
        except (KafkaError, KafkaSetupError, LookupError, OSError) as error:
            log.warning("cannot stream: %r", error)
            return JSONResponse({"detail": f"the event log is unavailable: {error}"}, status_code=503)
        return self.stream(request, subscription, sse.TREEFLOW_FRAMES)

    def stream(self, request: Request, subscription: Any, frames: sse.FrameFormat) -> StreamingResponse:
        """The SSE response of a started `subscription` (anything with ``async for``, ``aclose()``
        and ``root_workflow_exec_id``), written with `frames`; it closes the subscription."""
        return StreamingResponse(self._frames(request, subscription, frames), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _cursor(self, root: str, last_event_id: str | None, start_seq: str | None) -> Cursor | None:
        if last_event_id:
            return Cursor.parse(last_event_id)
        if start_seq:
            return cursor_before(start_seq, partition_for(root, await partition_count(self.settings)))
        return None

    async def _frames(self, request: Request, subscription: Any, frames: sse.FrameFormat) -> AsyncIterator[str]:
        """The response body. Reading runs in a task so that a quiet stream still sends keep-alives
        and notices at once when the client went away or the server is stopping."""
        queue: asyncio.Queue[Any] = asyncio.Queue(self.options.buffer)
        done = object()

        async def pump() -> None:
            try:
                async for event in subscription:
                    await queue.put(event)
                await queue.put(done)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - sent to the client as an error frame
                log.warning("stream of %s failed: %r", subscription.root_workflow_exec_id, error)
                await queue.put(error)

        reading = asyncio.ensure_future(pump())
        gone = asyncio.ensure_future(_disconnected(request))
        closing = asyncio.ensure_future(self.closing.wait())
        getter: asyncio.Future[Any] | None = None
        keepalive = self.options.keepalive.total_seconds()
        retry: int | None = int(self.options.retry.total_seconds() * 1000)  # sent with the first frame
        metrics.GATEWAY_STREAMS.inc()
        try:
            while True:
                getter = getter or asyncio.ensure_future(queue.get())
                ready, _ = await asyncio.wait({getter, gone, closing}, timeout=keepalive,
                                              return_when=asyncio.FIRST_COMPLETED)
                if gone in ready or closing in ready:
                    return
                if getter not in ready:
                    yield sse.comment()
                    continue
                item, getter = getter.result(), None
                if item is done:
                    end = frames.end(retry)
                    if end is not None:
                        yield end
                    return
                if isinstance(item, Exception):
                    yield frames.error(item, retry)
                    return
                text = frames.event(item, retry)
                if text is not None:
                    yield text
                    retry = None
        finally:
            for task in (reading, gone, closing, getter):
                if task is not None:
                    task.cancel()
            await asyncio.gather(reading, gone, closing, return_exceptions=True)
            await subscription.aclose()
            metrics.GATEWAY_STREAMS.dec()

    def close(self) -> None:
        """End every open stream (the server is stopping); clients reconnect with Last-Event-ID."""
        self.closing.set()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ListenError(TreeflowError, OSError):
    """The HTTP server could not listen where it was asked to."""

    exit_code = 2


class GatewayServer:
    """The gateway on a Uvicorn server: `await start()` returns once it listens; it runs until
    `await stop()` or SIGINT/SIGTERM (`await wait_stopped()`). Stopping ends the open streams first."""

    def __init__(self, app: Starlette, *, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.app = app
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = _Uvicorn(self.config, on_exit=self._close_streams)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one the system picked when 0 was asked)."""
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.config.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Listen; raises `ListenError` when the address cannot be had (a port in use, say)."""
        self._task = asyncio.ensure_future(self._serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises why it did not start
                raise ListenError("the gateway stopped before it started")
            await asyncio.sleep(0.02)

    async def _serve(self) -> None:
        try:
            await self.server.serve()
        except SystemExit:  # Uvicorn's answer to a failed bind (it logged why); it would end the event loop
            raise ListenError(f"cannot listen on {self.config.host}:{self.config.port}: the port is in use or "
                              "the address is not this machine's; pick another") from None

    async def stop(self) -> None:
        self._close_streams()
        self.server.should_exit = True
        if self._task is not None:
            await self._task
        for part in ("api", "mistral"):
            closing = getattr(self.app.state, part, None)
            if closing is not None:
                await closing.close()

    async def wait_stopped(self) -> None:
        """Return once the server stopped: after `stop()`, or SIGINT/SIGTERM."""
        if self._task is not None:
            await self._task

    def _close_streams(self) -> None:
        gateway = getattr(self.app.state, "gateway", None)
        if isinstance(gateway, _Gateway):
            asyncio.get_running_loop().call_soon_threadsafe(gateway.close)


class _Uvicorn(uvicorn.Server):
    """Uvicorn, ending the event streams when a signal asks it to stop (else it would wait for them)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
