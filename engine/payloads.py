"""User data (inputs, results, signal payloads) as JSON text, validated against type hints."""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import ApplicationError


def to_json(value: Any) -> str:
    """JSON text of a pydantic model, dataclass or JSON-able value."""
    return json.dumps(_plain(value), separators=(",", ":"))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def from_json(text: str | None, annotation: Any = Any) -> Any:
    """The value of JSON text, validated as `annotation` (anything when unannotated).

    Raises a non-retryable `ApplicationError` of type `PayloadValidationError` when
    the value does not fit: retrying cannot make bad input good.
    """
    value = None if text is None else json.loads(text)
    return validate(value, annotation)


def validate(value: Any, annotation: Any) -> Any:
    if annotation is Any or annotation is None:
        return value
    try:
        return _adapter(annotation).validate_python(value)
    except ValidationError as exc:
        raise ApplicationError(f"payload does not fit {_name(annotation)}: {exc}", type="PayloadValidationError",
                               non_retryable=True) from None


@cache
def _adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", repr(annotation))
