"""The gateway's JSON API and web page, beside its event streams (`treeflow.consumers.gateway`).

- ``GET /api/executions``: rows of the visibility store, filtered by ``status``
  (repeated or comma-separated; ``open``/``closed``), ``workflow``, ``root``, ``parent``,
  ``since`` (ISO 8601 or ``15m``/``2h``/``1d``) and ``limit`` (default 100), newest first.
- ``GET /api/executions/count``: how many rows match the same filters.
- ``GET /api/executions/{execution_id}``: one row.
- ``POST /api/executions/{execution_id}/signal`` (``{"name": ..., "input": ...}``),
  ``/cancel`` and ``/terminate`` (``{"reason": ...}``); each body may give
  ``root_workflow_exec_id`` (saves the root lookup). 200 once the request is in the
  execution's history; 409 when the processor rejected it (closed or unknown execution).
- ``GET /``: the web page (``web/`` in this package: plain HTML, JS and CSS).

Every answer from the store carries ``freshness``: ``lag`` (events of the topic not
applied yet; null when Kafka did not answer), ``lag_by_partition``, ``applied_at``.
Errors are ``{"detail": ...}`` with 400 (bad filter or body), 404, 409, or 503
(no store configured, store or Kafka unreachable).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from treeflow.kafka import KafkaSettings

from .visibility import ExecutionQuery, Freshness, QueryError, VisibilityError, VisibilityStore, freshness, open_store

log = logging.getLogger(__name__)

WEB = Path(__file__).parent / "web"
#: Freshness is read from Kafka at most this often (seconds); answers in between reuse it.
FRESHNESS_TTL = 1.0


class _Api:
    def __init__(self, settings: KafkaSettings, visibility_url: str | None) -> None:
        self.settings = settings
        self.visibility_url = visibility_url
        self._store: VisibilityStore | None = None
        self._opening = asyncio.Lock()
        self._freshness: tuple[float, Freshness] | None = None

    async def store(self) -> VisibilityStore:
        async with self._opening:
            if self._store is None:
                store = open_store(self.visibility_url)
                await store.open()
                self._store = store
            return self._store

    async def fresh(self, store: VisibilityStore) -> Freshness:
        cached = self._freshness
        if cached is not None and time.monotonic() - cached[0] < FRESHNESS_TTL:
            return cached[1]
        answer = await freshness(store, self.settings, timeout=5.0)
        self._freshness = (time.monotonic(), answer)
        return answer

    @staticmethod
    def query(request: Request, with_limit: bool = True) -> ExecutionQuery:
        params = request.query_params
        limit = params.get("limit")
        try:
            limit_value = int(limit) if limit and with_limit else None
        except ValueError:
            raise QueryError(f"limit={limit!r} is not a whole number") from None
        return ExecutionQuery.of(status=params.getlist("status"), workflow_name=params.get("workflow"),
                                 root_execution_id=params.get("root"), parent_execution_id=params.get("parent"),
                                 since=params.get("since"), limit=limit_value)

    async def list(self, request: Request) -> Response:
        return await self._answer(lambda store, query: store.list(query),
                                  lambda rows: {"executions": [r.to_json() for r in rows]}, request)

    async def count(self, request: Request) -> Response:
        return await self._answer(lambda store, query: store.count(query), lambda n: {"count": n}, request,
                                  with_limit=False)

    async def get(self, request: Request) -> Response:
        execution_id = request.path_params["execution_id"]
        response = await self._answer(lambda store, _: store.get(execution_id),
                                      lambda row: {"execution": row.to_json() if row else None}, request)
        if response.status_code == 200 and json.loads(bytes(response.body))["execution"] is None:
            return JSONResponse({"detail": f"no execution {execution_id} in the visibility store"}, status_code=404)
        return response

    async def _answer(self, call: Any, shape: Any, request: Request, with_limit: bool = True) -> Response:
        try:
            query = self.query(request, with_limit)
            store = await self.store()
            answer = await call(store, query)
            fresh = await self.fresh(store)
        except QueryError as error:
            return JSONResponse({"detail": str(error)}, status_code=400)
        except VisibilityError as error:
            return JSONResponse({"detail": str(error)}, status_code=503)
        except Exception as error:  # noqa: BLE001 - a database error, answered as unavailable
            log.warning("visibility store query failed: %r", error)
            return JSONResponse({"detail": f"the visibility store is unavailable: {error}"}, status_code=503)
        return JSONResponse({**shape(answer), "freshness": fresh.to_json()})

    # ------------------------------------------------------------ control

    async def signal(self, request: Request) -> Response:
        async def send(handle: Any, body: dict[str, Any]) -> None:
            name = body.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError('give the signal\'s "name"')
            await handle.signal(name, body.get("input"))
        return await self._control(request, send)

    async def cancel(self, request: Request) -> Response:
        return await self._control(request, lambda handle, body: handle.cancel(
            str(body.get("reason") or "canceled from the web page")))

    async def terminate(self, request: Request) -> Response:
        return await self._control(request, lambda handle, body: handle.terminate(
            str(body.get("reason") or "terminated from the web page")))

    async def _control(self, request: Request, call: Any) -> Response:
        from treeflow.client import Client
        from treeflow.errors import CommandRejectedError

        execution_id = request.path_params["execution_id"]
        try:
            raw = await request.body()
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as error:
            return JSONResponse({"detail": f"bad body: {error}"}, status_code=400)
        root = body.get("root_workflow_exec_id") or None
        client = Client(self.settings, identity="treeflow-web")
        try:
            await client.start()
            handle = client.get_handle(execution_id, root_execution_id=root)
            async with asyncio.timeout(30):
                await call(handle, body)
        except ValueError as error:
            return JSONResponse({"detail": str(error)}, status_code=400)
        except CommandRejectedError as error:
            status = 404 if "not found" in str(error) else 409
            return JSONResponse({"detail": str(error)}, status_code=status)
        except TimeoutError:
            return JSONResponse({"detail": "no answer from the processor within 30 s (is one running?)"},
                                status_code=503)
        except Exception as error:  # noqa: BLE001 - Kafka unreachable and the like
            log.warning("control request on %s failed: %r", execution_id, error)
            return JSONResponse({"detail": f"the request could not be sent: {error}"}, status_code=503)
        finally:
            await client.close()
        return JSONResponse({"ok": True, "execution_id": execution_id})

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None


async def _page(request: Request) -> Response:
    return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})


def api_routes(settings: KafkaSettings, visibility_url: str | None) -> tuple[list[BaseRoute], _Api]:
    """The API's and the page's routes, and the object behind them (``close()`` it at the end)."""
    api = _Api(settings, visibility_url)
    routes: list[BaseRoute] = [
        Route("/api/executions", api.list),
        Route("/api/executions/count", api.count),
        Route("/api/executions/{execution_id}", api.get),
        Route("/api/executions/{execution_id}/signal", api.signal, methods=["POST"]),
        Route("/api/executions/{execution_id}/cancel", api.cancel, methods=["POST"]),
        Route("/api/executions/{execution_id}/terminate", api.terminate, methods=["POST"]),
        Route("/", _page),
        Mount("/web", StaticFiles(directory=WEB), name="web"),
    ]
    return routes, api
