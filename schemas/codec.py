"""Encode and decode treeflow's records: Avro binary, single-object encoding.

A record on the wire is ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO
fingerprint + the Avro binary body. A reader resolves the writer schema by its
fingerprint among the current schema and every released one (`avro/history/`),
so records written by any released version of treeflow stay readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any, Generic, TypeVar

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from . import registry
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
        body = BytesIO(data)
        body.seek(HEADER_SIZE)
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
