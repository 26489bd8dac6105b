"""Server-sent event frames (the text/event-stream format), as the gateway writes them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .events import TreeEvent

#: The frame sent when the stream fails after the response started (then it ends).
ERROR_EVENT = "error"
#: The frame sent when a stream asked to end with its tree (``until_closed``) does.
END_EVENT = "end"


def frame(data: str, *, event: str | None = None, id: str | None = None, retry: int | None = None) -> str:
    """One frame; `data` may span lines (each becomes a ``data:`` line).

    `retry` (milliseconds) tells the client how long to wait before reconnecting.
    """
    lines = [] if retry is None else [f"retry: {retry}"]
    if id is not None:
        lines.append(f"id: {id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return "\n".join(lines) + "\n\n"


def event_frame(event: TreeEvent[Any], retry: int | None = None) -> str:
    """``id`` the cursor, ``event`` the event type, ``data`` the event as JSON (workflow context included)."""
    return frame(event.to_json(), event=event.event_type.value, id=event.cursor, retry=retry)


def error_frame(error: BaseException, retry: int | None = None) -> str:
    return frame(json.dumps({"error": type(error).__name__, "message": str(error)}), event=ERROR_EVENT, retry=retry)


def end_frame(reason: str, retry: int | None = None) -> str:
    return frame(json.dumps({"reason": reason}), event=END_EVENT, retry=retry)


def comment(text: str = "keep-alive") -> str:
    """A line clients ignore; keeps proxies from closing an idle stream."""
    return f": {text}\n\n"


@dataclass(frozen=True)
class FrameFormat:
    """How a stream writes its frames: an event (None: not sent), a failure after the
    response started, and the end of a stream asked to end (None: the body just ends).
    Each takes the `retry` to send with the first frame written (None after it)."""

    event: Callable[[TreeEvent[Any], int | None], str | None]
    error: Callable[[BaseException, int | None], str]
    end: Callable[[int | None], str | None]


#: treeflow's own frames: the event as `TreeEvent` JSON, ``error`` and ``end`` frames.
TREEFLOW_FRAMES = FrameFormat(event_frame, error_frame, lambda retry: end_frame("tree closed", retry))
