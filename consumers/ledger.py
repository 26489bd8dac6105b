"""Which offsets of a partition may be committed: those before the first one not yet done.

Handlers finish out of order (trees run in parallel), but a Kafka commit is a
single position per partition. The ledger remembers the offsets handed out, in
order, and which are done; the committable position is the first offset not
done, so a crash never skips an event whose handler had not succeeded.
"""

from __future__ import annotations

from collections import deque


class OffsetLedger:
    """The offsets of one partition handed to handlers, and which of them are done."""

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._next: int | None = None

    def add(self, offset: int) -> None:
        """An offset read from the partition (offsets come in increasing order)."""
        if self._next is not None and offset < self._next:
            raise ValueError(f"offset {offset} comes after {self._next - 1}: offsets must increase")
        self._pending.append(offset)
        self._next = offset + 1

    def done(self, offset: int) -> None:
        """The record at `offset` needs no more work (handled, filtered or dead-lettered)."""
        self._done.add(offset)
        while self._pending and self._pending[0] in self._done:
            self._done.discard(self._pending.popleft())

    @property
    def outstanding(self) -> int:
        """Offsets read and not done yet."""
        return len(self._pending)

    def committable(self) -> int | None:
        """The position to commit: every offset before it is done. None before any offset was read."""
        return self._pending[0] if self._pending else self._next
