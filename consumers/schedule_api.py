"""Schedule routes of the HTTP API, in the shape of Mistral's Workflows API (README "Schedules").

- ``GET /v1/workflows/schedules`` (``workflow_name``, ``status`` = ``active``/``paused``,
  ``page_size``): ``{"schedules": [ScheduleDefinitionOutput...], "next_page_token": null}``.
- ``POST /v1/workflows/schedules`` (``WorkflowScheduleRequest``: ``{"schedule": {...},
  "workflow_identifier": NAME, "workflow_task_queue": ..., "schedule_id": ...}``): 201
  ``{"schedule_id": ...}``.
- ``GET /v1/workflows/schedules/{schedule_id}``: the ``ScheduleDefinitionOutput``.
- ``DELETE /v1/workflows/schedules/{schedule_id}``: 204.
- ``POST /v1/workflows/schedules/{schedule_id}/pause`` and ``/resume`` (``{"note": ...}``): 204.
- ``POST /v1/workflows/schedules/{schedule_id}/trigger`` (``{"overlap": N}``): 204.

A schedule definition carries ``input``, ``cron_expressions``, ``intervals``
(``[{"every": "2s", "offset": null}]``; durations as ``"90s"``, ``"1h30m"`` or ISO 8601
``"PT2S"``), ``start_at``, ``end_at``, ``jitter``, ``time_zone_name`` and ``policy``
(``{"overlap": N, "catchup_window_seconds": S}``; N is Temporal's number: 1 skip,
2 buffer one, 6 allow all; 3, 4 and 5 are refused). ``calendars``, ``skip`` and
``max_executions`` are refused when given (not supported). Errors are
``{"detail": ...}`` with 400 or 422 (bad body), 404 (no such schedule), 409 (exists),
503 (no processor answered, or Kafka unreachable).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from treeflow.kafka import KafkaSettings

log = logging.getLogger(__name__)

#: Temporal's (and Mistral's) numbers of the overlap policies treeflow has.
OVERLAP_NUMBERS = {1: "SKIP", 2: "BUFFER_ONE", 6: "ALLOW_ALL"}
OVERLAP_OF_NAME = {name: number for number, name in OVERLAP_NUMBERS.items()}
#: How long a route waits for the processor's answer (seconds).
ANSWER_TIMEOUT = 30.0


class BadRequest(ValueError):
    def __init__(self, detail: str, status: int = 422) -> None:
        super().__init__(detail)
        self.status = status


class _Schedules:
    def __init__(self, settings: KafkaSettings | None) -> None:
        self._settings = settings

    @property
    def settings(self) -> KafkaSettings:
        if self._settings is None:
            self._settings = KafkaSettings.resolve(None)
        return self._settings

    async def _call(self, call: Callable[[Any], Awaitable[Response]]) -> Response:
        from treeflow.client import Client
        from treeflow.errors import (
            CommandRejectedError,
            DeadlineExceededError,
            InvalidScheduleError,
            ScheduleAlreadyExistsError,
            ScheduleNotFoundError,
        )

        client = Client(self.settings, identity="treeflow-http", command_timeout=ANSWER_TIMEOUT)
        try:
            await client.start()
            return await call(client)
        except BadRequest as error:
            return JSONResponse({"detail": str(error)}, status_code=error.status)
        except InvalidScheduleError as error:
            return JSONResponse({"detail": str(error)}, status_code=422)
        except ScheduleNotFoundError as error:
            return JSONResponse({"detail": str(error)}, status_code=404)
        except ScheduleAlreadyExistsError as error:
            return JSONResponse({"detail": str(error)}, status_code=409)
        except CommandRejectedError as error:
            return JSONResponse({"detail": str(error)}, status_code=409)
        except DeadlineExceededError as error:
            return JSONResponse({"detail": str(error)}, status_code=503)
        except Exception as error:  # noqa: BLE001 - Kafka unreachable and the like
            log.warning("schedule request failed: %r", error)
            return JSONResponse({"detail": f"the request could not be sent: {error}"}, status_code=503)
        finally:
            await client.close()

    async def list(self, request: Request) -> Response:
        status = request.query_params.get("status")
        if status not in (None, "", "active", "paused"):
            return JSONResponse({"detail": "status must be 'active' or 'paused'"}, status_code=422)
        workflow_name = request.query_params.get("workflow_name") or None

        async def call(client: Any) -> Response:
            found = await client.list_schedules(workflow_name=workflow_name)
            rows = [definition_output(d.raw) for d in found
                    if not status or (status == "paused") == d.paused]
            return JSONResponse({"schedules": rows, "next_page_token": None})
        return await self._call(call)

    async def create(self, request: Request) -> Response:
        try:
            schedule_id, workflow, params, options = creation(await _body(request))
        except BadRequest as error:
            return JSONResponse({"detail": str(error)}, status_code=error.status)

        async def call(client: Any) -> Response:
            handle = await client.create_schedule(schedule_id, workflow, params, **options)
            return JSONResponse({"schedule_id": handle.id}, status_code=201)
        return await self._call(call)

    async def get(self, request: Request) -> Response:
        schedule_id = request.path_params["schedule_id"]

        async def call(client: Any) -> Response:
            description = await client.get_schedule_handle(schedule_id).describe()
            return JSONResponse(definition_output(description.raw))
        return await self._call(call)

    async def delete(self, request: Request) -> Response:
        return await self._on_handle(request, lambda handle, body: handle.delete())

    async def pause(self, request: Request) -> Response:
        return await self._on_handle(request, lambda handle, body: handle.pause(_note(body)))

    async def resume(self, request: Request) -> Response:
        return await self._on_handle(request, lambda handle, body: handle.resume(_note(body)))

    async def trigger(self, request: Request) -> Response:
        from treeflow.schedules import ScheduleOverlapPolicy

        def run(handle: Any, body: dict[str, Any]) -> Awaitable[Any]:
            overlap = body.get("overlap")
            return handle.trigger(None if overlap is None else ScheduleOverlapPolicy(_overlap_name(overlap)))
        return await self._on_handle(request, run)

    async def _on_handle(self, request: Request, call: Callable[[Any, dict[str, Any]], Awaitable[Any]]) -> Response:
        schedule_id = request.path_params["schedule_id"]
        try:
            body = await _body(request)
        except BadRequest as error:
            return JSONResponse({"detail": str(error)}, status_code=error.status)

        async def send(client: Any) -> Response:
            await call(client.get_schedule_handle(schedule_id), body)
            return Response(status_code=204)
        return await self._call(send)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as error:
        raise BadRequest(f"bad body: {error}", 400) from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", 400)
    return body


def _note(body: dict[str, Any]) -> str | None:
    note = body.get("note")
    return None if note is None else str(note)


def _overlap_name(value: Any) -> str:
    if isinstance(value, str) and value.upper() in OVERLAP_OF_NAME:
        return value.upper()
    if isinstance(value, int) and value in OVERLAP_NUMBERS:
        return OVERLAP_NUMBERS[value]
    raise BadRequest(f"overlap policy {value!r} is not supported: use 1 (skip), 2 (buffer one) or 6 (allow all)")


def creation(body: dict[str, Any]) -> tuple[str, str, Any, dict[str, Any]]:
    """`Client.create_schedule`'s arguments from a `WorkflowScheduleRequest` body."""
    from treeflow.schedules import ScheduleIntervalSpec, ScheduleOverlapPolicy, SchedulePolicy, ScheduleSpec

    definition = body.get("schedule")
    if not isinstance(definition, dict):
        raise BadRequest("'schedule' (a schedule definition object) is required")
    workflow = body.get("workflow_identifier") or body.get("workflow_name")
    if not workflow:
        raise BadRequest("'workflow_identifier' (the workflow's name) is required")
    schedule_id = body.get("schedule_id") or definition.get("schedule_id")
    if not schedule_id:
        from treeflow.ids import new_id

        schedule_id = f"{workflow}-schedule-{new_id()[:8]}"
    for unsupported in ("calendars", "skip", "max_executions"):
        if definition.get(unsupported):
            raise BadRequest(f"'{unsupported}' is not supported by treeflow's schedules")
    intervals = []
    for item in definition.get("intervals") or []:
        if not isinstance(item, dict) or "every" not in item:
            raise BadRequest("each interval is an object with 'every'")
        intervals.append(ScheduleIntervalSpec(item["every"], item.get("offset") or 0))
    policy_body = definition.get("policy") or {}
    overlap = policy_body.get("overlap")
    policy = SchedulePolicy(
        overlap=ScheduleOverlapPolicy(_overlap_name(overlap)) if overlap is not None else ScheduleOverlapPolicy.SKIP,
        catchup_window=timedelta(seconds=policy_body.get("catchup_window_seconds", 31536000)))
    spec = ScheduleSpec(cron=list(definition.get("cron_expressions") or []), intervals=intervals,
                        jitter=definition.get("jitter") or 0, time_zone=definition.get("time_zone_name"),
                        start_at=_time(definition.get("start_at")), end_at=_time(definition.get("end_at")))
    options = {"spec": spec, "policy": policy, "task_queue": body.get("workflow_task_queue") or None,
               "note": definition.get("note")}
    return str(schedule_id), str(workflow), definition.get("input"), options


def _time(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"not an ISO 8601 time: {value!r}") from None


def _seconds(ms: int | None) -> str | None:
    return None if not ms else f"{ms / 1000:g}s"


def definition_output(raw: dict[str, Any]) -> dict[str, Any]:
    """Mistral's `ScheduleDefinitionOutput` of a schedule's description."""
    spec = raw["spec"]
    return {
        "schedule_id": raw["schedule_id"],
        "workflow_name": raw["workflow_name"],
        "input": None if raw.get("input") is None else json.loads(raw["input"]),
        "paused": raw["paused"],
        "note": raw.get("note"),
        "cron_expressions": spec["cron"],
        "intervals": [{"every": _seconds(i["every_ms"]), "offset": _seconds(i["offset_ms"])}
                      for i in spec["intervals"]],
        "calendars": [],
        "skip": [],
        "start_at": spec.get("start_at"),
        "end_at": spec.get("end_at"),
        "jitter": _seconds(spec.get("jitter_ms")),
        "time_zone_name": spec.get("time_zone"),
        "policy": {"overlap": OVERLAP_OF_NAME[raw["overlap"]],
                   "catchup_window_seconds": raw["catchup_window_ms"] // 1000, "pause_on_failure": False},
        "remaining_executions": None,
        "future_executions": [{"scheduled_at": t} for t in raw.get("next_fire_times", [])],
        "recent_executions": [{"scheduled_at": r["nominal_time"], "started_at": r["started_at"],
                               "execution_id": r["execution_id"]} for r in raw.get("recent_runs", [])],
    }


def routes(settings: KafkaSettings | None = None) -> list[BaseRoute]:
    """The schedule routes (Kafka from `settings`, default the TREEFLOW_* environment);
    mount them in any Starlette app."""
    api = _Schedules(settings)
    return [
        Route("/v1/workflows/schedules", api.list, methods=["GET"]),
        Route("/v1/workflows/schedules", api.create, methods=["POST"]),
        Route("/v1/workflows/schedules/{schedule_id}", api.get, methods=["GET"]),
        Route("/v1/workflows/schedules/{schedule_id}", api.delete, methods=["DELETE"]),
        Route("/v1/workflows/schedules/{schedule_id}/pause", api.pause, methods=["POST"]),
        Route("/v1/workflows/schedules/{schedule_id}/resume", api.resume, methods=["POST"]),
        Route("/v1/workflows/schedules/{schedule_id}/trigger", api.trigger, methods=["POST"]),
    ]
