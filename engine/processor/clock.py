"""The processor's clock: the one place where the processor reads the time.

Every decision time (the timestamp of every event), and so every timer, timeout,
backoff and retention the processor decides, comes from `Clock.now()`. The
processor uses the system's clock unless it is given another (`Processor(clock=...)`);
a time-skipping `treeflow.testing.Environment` gives it a `VirtualClock`.

What is not the processor's stays on the system's clock: the deadlines a client puts
on its own calls, and the start-to-close bound a worker keeps on a running activity.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone


class Clock:
    """The system's clock, in UTC."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


#: The clock of every processor not given another.
SYSTEM_CLOCK = Clock()


class VirtualClock(Clock):
    """The system's clock plus an offset that only grows: time flows as on the system's
    clock, and `advance` / `advance_to` jump it forward. It never goes back, so the
    decision times of a partition keep their order.
    """

    def __init__(self) -> None:
        self._offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(timezone.utc) + self._offset

    @property
    def skipped(self) -> timedelta:
        """How far ahead of the system's clock this clock is."""
        return self._offset

    def advance(self, delta: timedelta) -> None:
        """Jump `delta` forward (a negative one is refused: the clock never goes back)."""
        if delta < timedelta(0):
            raise ValueError(f"a clock only moves forward; cannot advance by {delta}")
        self._offset += delta

    def advance_to(self, moment: datetime) -> bool:
        """Jump to `moment` if it is ahead; returns whether the clock moved."""
        ahead = moment - self.now()
        if ahead <= timedelta(0):
            return False
        self._offset += ahead
        return True
