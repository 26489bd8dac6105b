"""Waiting on the broker in tests: poll until a condition holds, with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

X = TypeVar("X")


async def eventually(probe: Callable[[], Awaitable[X]], accept: Callable[[X], bool], timeout: float = 20,
                     interval: float = 0.05) -> X:
    """Poll `probe` until `accept` holds for its value (asserted on the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if accept(value) or time.monotonic() > deadline:
            assert accept(value), value
            return value
        await asyncio.sleep(interval)
