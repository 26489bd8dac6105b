"""The events topic as an analytics table: one row per event, to Parquet or JSON lines.

An export reads every partition of the events topic (or only a tree's, with
``root``) from where the previous export stopped up to the partitions' true end
as they were when it began, and writes one row per event (`COLUMNS`). It returns
an `ExportCursor`: pass it as ``since`` to the next export, which then continues
exactly there, with no gap and no repeat.

The end of each partition comes from `treeflow.kafka.end_offsets`, which is
ListOffsets on Kafka and, on the embedded broker (whose ListOffsets answers too
low after a multi-record batch), the high watermark of a fetch response.

pyarrow is needed for Parquet only (the ``export`` extra).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

from aiokafka import TopicPartition

from treeflow.errors import TreeflowError
from treeflow.kafka import KafkaSettings, end_offsets, partition_for
from treeflow.schemas import Event

from .cursor import Cursor, CursorError
from .reader import EventReader, partition_count

Format = Literal["parquet", "jsonl"]
FORMATS: tuple[Format, ...] = ("parquet", "jsonl")

#: The columns of every row, in order, with their Parquet (Arrow) types.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("cursor", "int64"),            # the event's resume cursor (treeflow.consumers.Cursor token)
    ("partition", "int32"),
    ("offset", "int64"),
    ("event_id", "string"),
    ("event_type", "string"),
    ("timestamp", "timestamp[ms, UTC]"),
    ("sequence", "int64"),
    ("workflow_exec_id", "string"),
    ("workflow_run_id", "string"),
    ("workflow_name", "string"),
    ("parent_workflow_exec_id", "string"),  # null for a top-level execution
    ("root_workflow_exec_id", "string"),
    ("task_queue", "string"),
    ("attempt", "int32"),            # null where no attempt applies
    ("payload", "string"),           # the typed payload as JSON text
)

#: Rows buffered before a Parquet row group is written.
ROW_GROUP = 10_000


class ExportError(TreeflowError):
    """An export cannot run as asked (bad cursor, output in the way); nothing was written."""

    exit_code = 2


class TopicResetError(ExportError):
    """A cursor points past the end of its partition: the topics were recreated since."""

    exit_code = 5


@dataclass(frozen=True)
class ExportCursor:
    """Where an export stopped: the next offset to read in each partition it covered.

    Its text is the comma-separated `Cursor` tokens of those positions, each the
    cursor of the partition's last exported event + 1 (``partition * 2**48`` for
    a partition with nothing exported yet). Partitions it does not name are read
    from their beginning.
    """

    positions: dict[int, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return ",".join(str(Cursor(partition, offset)) for partition, offset in sorted(self.positions.items()))

    @classmethod
    def parse(cls, text: str | ExportCursor | None) -> ExportCursor:
        """Read a cursor printed by an earlier export; `ExportError` when it is not one."""
        if text is None:
            return cls()
        if isinstance(text, ExportCursor):
            return text
        positions: dict[int, int] = {}
        for token in filter(None, (part.strip() for part in text.split(","))):
            try:
                cursor = Cursor.parse(token)
            except CursorError as error:
                raise ExportError(f"--since: {error}") from None
            if cursor.partition in positions:
                raise ExportError(f"--since names partition {cursor.partition} twice")
            positions[cursor.partition] = cursor.offset
        if not positions:
            raise ExportError(f"--since: not an export cursor: {text!r}")
        return cls(positions)


@dataclass
class ExportReport:
    """What an export did."""

    rows: int
    #: Where it stopped: pass it as ``since`` next time.
    cursor: ExportCursor
    #: Records of the covered ranges that could not be decoded (logged with their offsets, not exported).
    undecodable: int
    output: str


def event_row(event: Event, partition: int, offset: int) -> dict[str, Any]:
    """One row of the table (see `COLUMNS`) for an event read at (partition, offset)."""
    context = event.workflow_context
    return {
        "cursor": Cursor(partition, offset).token,
        "partition": partition,
        "offset": offset,
        "event_id": event.event_id,
        "event_type": event.event_type.value,
        "timestamp": event.timestamp,
        "sequence": event.sequence,
        "workflow_exec_id": context.workflow_exec_id,
        "workflow_run_id": context.workflow_run_id,
        "workflow_name": context.workflow_name,
        "parent_workflow_exec_id": context.parent_workflow_exec_id,
        "root_workflow_exec_id": context.root_workflow_exec_id,
        "task_queue": context.task_queue,
        "attempt": event.attempt,
        "payload": event.payload.model_dump_json(),
    }


def arrow_schema() -> Any:
    """The Parquet file's schema (a `pyarrow.Schema`)."""
    pa = _pyarrow()
    types = {"int64": pa.int64(), "int32": pa.int32(), "string": pa.string(),
             "timestamp[ms, UTC]": pa.timestamp("ms", tz="UTC")}
    return pa.schema([pa.field(name, types[kind], nullable=name in ("parent_workflow_exec_id", "attempt"))
                      for name, kind in COLUMNS])


async def export_events(settings: KafkaSettings, output: str | Path, *, format: Format = "parquet",
                        since: str | ExportCursor | None = None, root: str | None = None,
                        progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write the events after `since` (all of them when None) to `output`, one row per event.

    - Covers every partition of the events topic, or with `root` only that tree's
      partition and its events; stops at each partition's end as it was when the
      export began, so rows appended meanwhile go to the next export.
    - The file appears whole or not at all (written beside it, then renamed);
      an existing `output` is refused. ``output="-"`` writes JSON lines to stdout.
    - `progress(done, total)` is called about every two seconds with records read
      and records to read.
    Raises `ExportError` for a bad cursor or output, `TopicResetError` for a cursor
    past its partition's end, `LookupError` when the events topic does not exist.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    to_stdout = str(output) == "-"
    if to_stdout and format != "jsonl":
        raise ExportError("only --format jsonl can be written to stdout (--output -)")
    path = None if to_stdout else Path(output)
    if path is not None and path.exists():
        raise ExportError(f"{path} exists: choose a new file for each export (they are read together)")
    if format == "parquet":
        _pyarrow()
    start = ExportCursor.parse(since)
    count = await partition_count(settings)
    unknown = sorted(set(start.positions) - set(range(count)))
    if unknown:
        raise TopicResetError(f"--since names partition {unknown[0]}, but {settings.topics.events} has {count} "
                              "partitions: the cursor is from other topics")
    numbers = [partition_for(root, count)] if root is not None else list(range(count))
    topic = settings.topics.events
    ends = {tp.partition: offset for tp, offset in
            (await end_offsets(settings, [TopicPartition(topic, number) for number in numbers])).items()}
    starts = {number: start.positions.get(number, 0) for number in numbers}
    for number in numbers:
        if starts[number] > ends[number]:
            raise TopicResetError(f"the cursor is at offset {starts[number]} of partition {number}, past its end "
                                  f"({ends[number]}): the topics were recreated since that export")
    reader = EventReader(settings, numbers, key=root, start_offsets=starts, stop_offsets=ends)
    total = sum(ends[number] - starts[number] for number in numbers)
    sink: _Sink = _ParquetSink() if format == "parquet" else _JsonSink()
    temporary = None if path is None else path.with_name(f".{path.name}.partial")
    rows_written = 0
    last_report = time.monotonic()
    try:
        sink.open(temporary)
        async for row in _rows(reader, root):
            sink.write(row)
            rows_written += 1
            if progress is not None and time.monotonic() - last_report >= 2.0:
                last_report = time.monotonic()
                progress(reader.stats.fetched_records, total)
        sink.close()
        if path is not None and temporary is not None:
            os.replace(temporary, path)
    except BaseException:
        sink.abort()
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise
    positions = {**start.positions, **ends}
    return ExportReport(rows=rows_written, cursor=ExportCursor(positions), undecodable=reader.stats.undecodable,
                        output=str(output))


async def _rows(reader: EventReader, root: str | None) -> Any:
    async for consumed in reader:
        event = consumed.event
        if root is not None and event.workflow_context.root_workflow_exec_id != root:
            continue  # a record written without a key
        yield event_row(event, consumed.partition, consumed.offset)


class _Sink:
    def open(self, path: Path | None) -> None: ...
    def write(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class _ParquetSink(_Sink):
    def open(self, path: Path | None) -> None:
        import pyarrow.parquet as pq

        self.schema = arrow_schema()
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")
        self.buffer: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        pa = _pyarrow()
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.buffer = []

    def close(self) -> None:
        self._flush()
        self.writer.close()

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass


class _JsonSink(_Sink):
    def open(self, path: Path | None) -> None:
        import sys

        self.stream: IO[str] = sys.stdout if path is None else open(path, "w", encoding="utf-8")
        self.owned = path is not None

    def write(self, row: dict[str, Any]) -> None:
        self.stream.write(json.dumps(row, default=_json_default, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self.owned:
            self.stream.close()
        else:
            self.stream.flush()

    def abort(self) -> None:
        if self.owned:
            self.stream.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    raise TypeError(f"not JSON: {type(value).__name__}")


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise ExportError("Parquet needs pyarrow: pip install 'treeflow[export]' (or use --format jsonl)") from None
    return pyarrow
