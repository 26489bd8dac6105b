"""User data (inputs, results, signal payloads) as JSON text, validated against type hints."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Parameters:
    """The parameters of an entrypoint or a signal, query or update handler (`self`
    excluded), and how a JSON payload maps onto them.

    The payload may come in two forms, and both are accepted:

    - **raw** (treeflow's and Temporal's): the value of the one parameter;
    - **object** (Mistral's): a JSON object of the parameters by name,
      `{"item": "apple", "qty": 2}`; a parameter left out takes its default.

    A callable with several parameters takes the object form (or a JSON array, by
    position; or, when all but the first have defaults, a raw value that is neither an
    object nor an array, for the first). One with a single parameter `p` takes the object form only when the
    payload is an object whose one key is `"p"` and `p`'s annotation has no field
    named `p` (a pydantic model, dataclass or TypedDict that has one takes the payload
    raw); anything else is the raw value. So a handler `def add(self, item: dict)` sent
    `{"item": {...}}` gets the inner object; to send it a dict whose only key is
    `item`, wrap it once more. An empty object given to a single parameter that has a
    default and that ``{}`` does not fit is Mistral's object form with nothing given: the
    default. With no parameter, the payload is ignored. Each value is validated against its
    parameter's annotation.
    """

    names: tuple[str, ...]
    annotations: tuple[Any, ...]
    defaults: tuple[bool, ...]
    extra: bool = False

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> Parameters:
        """The parameters of `fn` (a function, method or bound method)."""
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        params = [p for p in signature.parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        extra = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        return cls(tuple(p.name for p in params), tuple(hints.get(p.name, Any) for p in params),
                   tuple(p.default is not p.empty for p in params), extra)

    @property
    def single_type(self) -> Any:
        """The annotation of the only parameter (None with none; a dict of them with several)."""
        if not self.names:
            return None
        if len(self.names) == 1:
            return self.annotations[0]
        return dict

    def bind(self, input_json: str | None) -> tuple[list[Any], dict[str, Any]]:
        """Positional and keyword arguments from `input_json`; raises a non-retryable
        `ApplicationError` (PayloadValidationError) when it does not fit."""
        value = None if input_json is None else json.loads(input_json)
        return self.bind_value(value)

    def bind_value(self, value: Any) -> tuple[list[Any], dict[str, Any]]:
        if not self.names:
            return [], {}
        if len(self.names) == 1 and not self.extra:
            name, annotation = self.names[0], self.annotations[0]
            if isinstance(value, dict) and set(value) == {name} and not _has_field(annotation, name):
                value = value[name]
            elif value is None and self.defaults[0]:
                return [], {}
            elif value == {} and self.defaults[0] and not _fits({}, annotation):
                return [], {}  # Mistral's object form with no parameter given: the default
            return [validate(value, annotation)], {}
        if value is None:
            value = {}
        if not isinstance(value, (dict, list)) and all(self.defaults[1:]):
            value = {self.names[0]: value}  # a raw value: the first parameter's, the others default
        if isinstance(value, list):
            if len(value) > len(self.names):
                raise _unfit(f"{len(value)} arguments for parameters {', '.join(self.names)}")
            value = dict(zip(self.names, value))
        if not isinstance(value, dict):
            raise _unfit(f"parameters {', '.join(self.names)} take a JSON object of them by name, "
                         f"got {type(value).__name__}")
        unknown = sorted(set(value) - set(self.names))
        if unknown and not self.extra:
            raise _unfit(f"unknown parameter(s) {', '.join(unknown)}; the parameters are {', '.join(self.names)}")
        missing = [n for n, has_default in zip(self.names, self.defaults) if not has_default and n not in value]
        if missing:
            raise _unfit(f"missing parameter(s) {', '.join(missing)}")
        kwargs = {n: validate(value[n], a) for n, a in zip(self.names, self.annotations) if n in value}
        kwargs.update({k: value[k] for k in unknown})
        return [], kwargs


def _has_field(annotation: Any, name: str) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return name in annotation.model_fields
    if dataclasses.is_dataclass(annotation):
        return name in {f.name for f in dataclasses.fields(annotation)}
    if typing.is_typeddict(annotation):
        return name in typing.get_type_hints(annotation)
    return False


def _fits(value: Any, annotation: Any) -> bool:
    if annotation is Any or annotation is None:
        return True
    try:
        _adapter(annotation).validate_python(value)
    except ValidationError:
        return False
    return True


def _unfit(message: str) -> ApplicationError:
    return ApplicationError(f"payload does not fit: {message}", type="PayloadValidationError", non_retryable=True)


def handler_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The JSON input of a handler called with `args`/`kwargs`: one positional value raw,
    keywords as an object, several positional values as an array (`Parameters.bind`)."""
    if kwargs:
        if args:
            raise TypeError("give the input as positional values or as keywords, not both")
        return to_json(kwargs)
    if not args or args == (None,):
        return None
    return to_json(args[0] if len(args) == 1 else list(args))


def handler_name(handler: str | Callable[..., Any], marker: str) -> str:
    """The handler name of `handler`: a name as it is, or a method's `marker` attribute."""
    if isinstance(handler, str):
        return handler
    name = getattr(handler, marker, None)
    if not name:
        kind = marker.strip("_").removeprefix("treeflow_")
        raise TypeError(f"{handler!r} is not a @workflow.{kind} method; pass its name or the decorated method")
    return name
