"""Encode and decode treeflow's records: Avro binary, single-object encoding or Confluent's format.

A record on the wire is ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO
fingerprint + the Avro binary body. A reader resolves the writer schema by its
fingerprint among the current schema and every released one (`avro/history/`),
so records written by any released version of treeflow stay readable.

Records in Confluent's schema-registry format (``00`` + a 4-byte schema id + the
body, see `treeflow.schemas.confluent`) decode too: the writer schema is asked of
the registry once per id (``TREEFLOW_SCHEMA_REGISTRY_URL``, or `use_registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any, Generic, TypeVar

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from . import confluent, registry
from ._base import AvroModel
from .models import Command, Event, Reply, Snapshot, Task

MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8

M = TypeVar("M", bound=AvroModel)


@dataclass(frozen=True)
class RecordPosition:
    """Where a record was read from, for error messages."""

    topic: str | None = None
    partition: int | None = None
    offset: int | None = None

    def __str__(self) -> str:
        if self.topic is None:
            return "record"
        return f"record at {self.topic}[{self.partition}]@{self.offset}"


class DecodeError(ValueError):
    """A record could not be decoded; says why and where it was read from."""

    def __init__(self, reason: str, position: RecordPosition | None = None) -> None:
        self.reason = reason
        self.position = position or RecordPosition()
        super().__init__(f"cannot decode {self.position}: {reason}")


class RecordCodec(Generic[M]):
    """Encoder and decoder of one top-level record kind (event, command or task)."""

    def __init__(self, kind: str, model: type[M]) -> None:
        self.kind = kind
        self.model = model
        current = registry.current(kind)
        self._header = MAGIC + current.fingerprint
        self._writer_schema = parse_schema(current.schema)
        self._reader_schema = self._writer_schema
        self._writers_by_fingerprint: dict[bytes, dict[str, Any] | None] = {
            version.fingerprint: parse_schema(version.schema) for version in registry.history(kind)
        }
        # The current schema reads its own records without resolution.
        self._writers_by_fingerprint[current.fingerprint] = None
        self.schema: dict[str, Any] = current.schema
        self._writers_by_id: dict[int, dict[str, Any] | None] = {}
        self._registry: confluent.SchemaRegistry | None = None

    def use_registry(self, schema_registry: confluent.SchemaRegistry | None) -> None:
        """Ask this registry for the writer schemas of Confluent-format records (None: the environment's).

        Schema ids belong to a registry: the ids learnt from the previous one are forgotten.
        """
        self._registry = schema_registry
        self._writers_by_id.clear()

    def register(self, schema_registry: confluent.SchemaRegistry, topic: str) -> int:
        """Register the current schema under ``<topic>-value``; the id `encode_confluent` takes."""
        schema_id = schema_registry.register(confluent.subject(topic), self.schema)
        self._writers_by_id[schema_id] = None
        if self._registry is None:
            self._registry = schema_registry
        return schema_id

    def encode_confluent(self, record: M, schema_id: int) -> bytes:
        """`record` in Confluent's wire format, for the registered schema `schema_id` (see `register`)."""
        buffer = BytesIO()
        buffer.write(confluent.frame(schema_id, b""))
        schemaless_writer(buffer, self._writer_schema, record.to_avro())
        return buffer.getvalue()

    def _writer_of_id(self, schema_id: int, position: RecordPosition | None) -> dict[str, Any] | None:
        """The parsed writer schema of `schema_id` (None: the current one), asked of the registry once."""
        if schema_id in self._writers_by_id:
            return self._writers_by_id[schema_id]
        schema_registry = self._registry or confluent.from_environment()
        if schema_registry is None:
            raise DecodeError(f"a schema-registry record (schema id {schema_id}): set "
                              f"{confluent.REGISTRY_URL_ENV} to read it", position)
        self._registry = schema_registry
        try:
            schema = schema_registry.schema(schema_id)
            version = registry.make_top_schema(self.kind, schema)
            writer = (None if version.fingerprint == self.fingerprint
                      else self._writers_by_fingerprint.get(version.fingerprint) or parse_schema(schema))
        except confluent.SchemaRegistryError as error:
            raise DecodeError(str(error), position) from None
        except Exception as error:  # noqa: BLE001 - not an Avro schema treeflow can read
            raise DecodeError(f"schema id {schema_id} is not a readable {self.kind} schema: {error}",
                              position) from None
        self._writers_by_id[schema_id] = writer
        return writer

    @property
    def fingerprint(self) -> bytes:
        return self._header[len(MAGIC):]

    def encode(self, record: M) -> bytes:
        buffer = BytesIO()
        buffer.write(self._header)
        schemaless_writer(buffer, self._writer_schema, record.to_avro())
        return buffer.getvalue()

    def decode(self, data: bytes | None, position: RecordPosition | None = None) -> M:
        """Decode one record; raises `DecodeError` (never a fastavro error) on bad input."""
        if data is None:
            raise DecodeError("the record has no value (a tombstone)", position)
        schema_id = confluent.schema_id_of(data)
        if schema_id is not None:
            writer = self._writer_of_id(schema_id, position)
            return self._read(data, confluent.HEADER_SIZE, writer or self._reader_schema, position)
        if len(data) < HEADER_SIZE or data[:2] != MAGIC:
            raise DecodeError(
                f"not an Avro single-object record (starts with {bytes(data[:4]).hex() or 'nothing'})",
                position,
            )
        fingerprint = bytes(data[2:HEADER_SIZE])
        if fingerprint not in self._writers_by_fingerprint:
            raise DecodeError(
                f"unknown {self.kind} schema fingerprint {fingerprint.hex()}: written by a newer "
                "treeflow or by something else",
                position,
            )
        writer = self._writers_by_fingerprint[fingerprint] or self._reader_schema
        return self._read(data, HEADER_SIZE, writer, position)

    def _read(self, data: bytes, start: int, writer: dict[str, Any], position: RecordPosition | None) -> M:
        body = BytesIO(data)
        body.seek(start)
        try:
            raw = schemaless_reader(
                body,
                writer,
                self._reader_schema,
                return_record_name=True,
                return_record_name_override=True,
            )
            if body.tell() != len(data):
                raise DecodeError(f"{len(data) - body.tell()} trailing bytes after the record", position)
            return self.model.from_avro(raw)  # type: ignore[return-value]
        except DecodeError:
            raise
        except Exception as exc:  # fastavro and pydantic raise many types on bad bytes
            detail = "the record ends too early" if isinstance(exc, EOFError) else str(exc)
            raise DecodeError(f"{type(exc).__name__}: {detail}", position) from exc


EVENTS: RecordCodec[Event] = RecordCodec("event", Event)
COMMANDS: RecordCodec[Command] = RecordCodec("command", Command)
TASKS: RecordCodec[Task] = RecordCodec("task", Task)
REPLIES: RecordCodec[Reply] = RecordCodec("reply", Reply)
SNAPSHOTS: RecordCodec[Snapshot] = RecordCodec("snapshot", Snapshot)
