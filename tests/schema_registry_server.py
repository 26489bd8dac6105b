"""A tiny, real HTTP schema registry for tests: the REST subset of Confluent's API that
treeflow and confluent-kafka's client use. (No Schema Registry server is installable
here, Karapace is not on the index, so this stands in.)

- ``POST /subjects/{subject}/versions`` ``{"schema": ..., "schemaType": "AVRO"}`` -> ``{"id": N}``;
  the same schema (by its JSON, canonicalised) gets the same id in every subject, as Confluent's does.
- ``GET /schemas/ids/{id}`` -> ``{"schema": ..., "schemaType": "AVRO"}``; 404 (error 40403) when unknown.
- ``GET /subjects`` and ``GET /subjects/{subject}/versions/latest``.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class SchemaRegistryServer:
    """Runs on 127.0.0.1 and a free port in a thread; `url`; `requests` lists (method, path) served."""

    def __init__(self) -> None:
        self.schemas: list[str] = []                       # id - 1 -> schema text
        self.subjects: dict[str, list[int]] = {}           # subject -> ids of its versions
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                registry._answer(self, "GET")

            def do_POST(self) -> None:
                registry._answer(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> SchemaRegistryServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        with self._lock:
            self.requests.append((method, path))
            status, body = self._route(method, path, handler)
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _route(self, method: str, path: str, handler: BaseHTTPRequestHandler) -> tuple[int, Any]:
        if method == "POST" and (match := re.fullmatch(r"/subjects/([^/]+)/versions", path)):
            length = int(handler.headers.get("Content-Length") or 0)
            request = json.loads(handler.rfile.read(length) or b"{}")
            if request.get("schemaType", "AVRO") != "AVRO" or "schema" not in request:
                return 422, {"error_code": 42201, "message": "Invalid schema"}
            text = json.dumps(json.loads(request["schema"]), sort_keys=True, separators=(",", ":"))
            if text not in self.schemas:
                self.schemas.append(text)
            schema_id = self.schemas.index(text) + 1
            versions = self.subjects.setdefault(_unquote(match.group(1)), [])
            if schema_id not in versions:
                versions.append(schema_id)
            return 200, {"id": schema_id}
        if method == "GET" and (match := re.fullmatch(r"/schemas/ids/(\d+)", path)):
            schema_id = int(match.group(1))
            if not 1 <= schema_id <= len(self.schemas):
                return 404, {"error_code": 40403, "message": "Schema not found"}
            return 200, {"schema": self.schemas[schema_id - 1], "schemaType": "AVRO"}
        if method == "GET" and path == "/subjects":
            return 200, sorted(self.subjects)
        if method == "GET" and (match := re.fullmatch(r"/subjects/([^/]+)/versions/latest", path)):
            subject = _unquote(match.group(1))
            if subject not in self.subjects:
                return 404, {"error_code": 40401, "message": "Subject not found"}
            versions = self.subjects[subject]
            return 200, {"subject": subject, "version": len(versions), "id": versions[-1],
                         "schema": self.schemas[versions[-1] - 1], "schemaType": "AVRO"}
        return 404, {"error_code": 404, "message": f"not served here: {method} {path}"}


def _unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)
