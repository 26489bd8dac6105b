"""Resume cursors: where an event sits in the events topic, as one opaque token.

A tree lives in one partition of the events topic (every record of a tree is
keyed by its root id), so a partition and an offset place any of its events.
The token is the decimal integer ``partition * 2**48 + offset``:

- monotonic within a tree: a later event of the tree has a larger cursor;
- never reused: Kafka never gives an offset twice in a partition;
- arithmetic like Mistral's ``broker_sequence``: ``cursor + 1`` is the position
  just after an event, so an SSE client may resume with ``start_seq=last + 1``.

Treat it as opaque: only `Cursor.parse` should take it apart.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bits of the token that hold the offset; the partition sits above them.
OFFSET_BITS = 48
_OFFSET_MASK = (1 << OFFSET_BITS) - 1


class CursorError(ValueError):
    """A cursor is malformed, or does not belong to the stream it was given to."""


@dataclass(frozen=True, order=True)
class Cursor:
    """The position of one event: its partition of the events topic and its offset there."""

    partition: int
    offset: int

    def __post_init__(self) -> None:
        if self.partition < 0 or not 0 <= self.offset <= _OFFSET_MASK:
            raise CursorError(f"no such position: partition {self.partition}, offset {self.offset}")

    @property
    def token(self) -> int:
        """The cursor as an integer (what `str()` prints)."""
        return (self.partition << OFFSET_BITS) | self.offset

    def __str__(self) -> str:
        return str(self.token)

    def preceding(self) -> Cursor | None:
        """The position just before this one; None at the start of the partition.

        Turns an inclusive start (SSE ``start_seq``) into the exclusive cursor that
        `subscribe_tree` takes.
        """
        return Cursor(self.partition, self.offset - 1) if self.offset > 0 else None

    @classmethod
    def parse(cls, value: Cursor | str | int) -> Cursor:
        """Read a cursor from its token; raises `CursorError` when it is not one."""
        if isinstance(value, Cursor):
            return value
        if isinstance(value, bool):
            raise CursorError(f"not a cursor: {value!r}")
        if isinstance(value, str):
            text = value.strip()
            if not text.isdigit():
                raise CursorError(f"not a cursor: {value!r} (a cursor is a non-negative integer)")
            value = int(text)
        if not isinstance(value, int) or value < 0:
            raise CursorError(f"not a cursor: {value!r} (a cursor is a non-negative integer)")
        return cls(value >> OFFSET_BITS, value & _OFFSET_MASK)


def cursor_before(start_seq: Cursor | str | int, partition: int) -> Cursor | None:
    """The exclusive cursor that starts a stream of a tree in `partition` at `start_seq`, inclusive.

    Cursors compare as integers: ``start_seq=N`` keeps the tree's events whose cursor
    is at least N. N below every cursor of the partition (``0`` for instance) means
    from the beginning (None); N above them all is refused with `CursorError`.
    """
    start = Cursor.parse(start_seq)
    if start.partition < partition:
        return None
    if start.partition > partition:
        raise CursorError(f"start_seq {start} is past every position of partition {partition}: "
                          "it belongs to another tree")
    return start.preceding()
