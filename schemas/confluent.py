"""Confluent Schema Registry: the wire format and the REST subset treeflow uses.

When ``TREEFLOW_SCHEMA_REGISTRY_URL`` names a registry, the processor registers the
event schema under ``<events topic>-value`` and writes events in Confluent's wire
format: byte ``0``, the schema id (4 bytes, big-endian), the Avro binary body. Kafka
Connect, ksqlDB, Flink and Confluent's deserializers then read the events topic with
no treeflow code. Every treeflow reader decodes both that format and Avro
single-object encoding (`treeflow.schemas.codec`), so a topic may hold both.

Only the REST calls below are used (standard library HTTP, no new dependency):
``POST /subjects/{subject}/versions`` (register, idempotent: the same schema gets its
id back) and ``GET /schemas/ids/{id}`` (a writer schema a reader does not know yet;
asked once per id per process, then cached).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

REGISTRY_URL_ENV = "TREEFLOW_SCHEMA_REGISTRY_URL"
MAGIC_BYTE = b"\x00"
#: Magic byte + schema id.
HEADER_SIZE = 5
_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class SchemaRegistryError(RuntimeError):
    """The registry refused a call or cannot be reached; the message says which and why."""


def frame(schema_id: int, body: bytes) -> bytes:
    """A record in Confluent's wire format."""
    return MAGIC_BYTE + schema_id.to_bytes(4, "big") + body


def schema_id_of(data: bytes) -> int | None:
    """The schema id of a record in Confluent's wire format; None when it is not in that format."""
    if len(data) >= HEADER_SIZE and data[:1] == MAGIC_BYTE:
        return int.from_bytes(data[1:HEADER_SIZE], "big")
    return None


class SchemaRegistry:
    """A client of one schema registry (Confluent's REST API, or a compatible one)."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._ids: dict[tuple[str, str], int] = {}

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """Register `schema` (Avro) under `subject`; its id (the same id again if it is there already)."""
        text = json.dumps(schema, separators=(",", ":"))
        known = self._ids.get((subject, text))
        if known is not None:
            return known
        answer = self._call("POST", f"/subjects/{urllib.parse.quote(subject, safe='')}/versions",
                            {"schema": text, "schemaType": "AVRO"})
        schema_id = int(answer["id"])
        self._ids[(subject, text)] = schema_id
        return schema_id

    def schema(self, schema_id: int) -> dict[str, Any]:
        """The schema with this id."""
        answer = self._call("GET", f"/schemas/ids/{schema_id}")
        return json.loads(answer["schema"])

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": _CONTENT_TYPE, "Accept": _CONTENT_TYPE})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:300]
            raise SchemaRegistryError(f"schema registry {self.url}: {method} {path} answered {error.code}: "
                                      f"{detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise SchemaRegistryError(f"schema registry {self.url} cannot be reached ({REGISTRY_URL_ENV}): "
                                      f"{reason}") from None


def from_environment() -> SchemaRegistry | None:
    """The registry `TREEFLOW_SCHEMA_REGISTRY_URL` names; None when it is unset."""
    url = os.environ.get(REGISTRY_URL_ENV, "").strip()
    return SchemaRegistry(url) if url else None


def subject(topic: str) -> str:
    """The subject of a topic's values (Confluent's default TopicNameStrategy)."""
    return f"{topic}-value"
