"""The base of the generated models: conversion to and from fastavro's data shapes."""

from __future__ import annotations

import types
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict


def _millisecond_utc(value: datetime) -> datetime:
    # Avro timestamp-millis keeps milliseconds: truncate here so that a model
    # equals its own decoded copy.
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (use datetime.now(timezone.utc))")
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


#: An Avro timestamp-millis: timezone-aware, truncated to milliseconds.
Timestamp = Annotated[datetime, AfterValidator(_millisecond_utc)]

#: Every generated record model by its full Avro name; filled by `models.py`.
MODELS_BY_AVRO_NAME: dict[str, type[AvroModel]] = {}


class AvroModel(BaseModel):
    """A pydantic model generated from one Avro record (see `codegen.py`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    __avro_name__: ClassVar[str]
    #: Fields whose Avro type is a union of several records (or an array of one).
    #: fastavro needs to be told which branch such a value takes.
    __avro_record_unions__: ClassVar[frozenset[str]] = frozenset()

    def to_avro(self) -> dict[str, Any]:
        """This record as fastavro writes it (union branches named)."""
        values = self.__dict__
        return {name: _to_avro(values[name], union) for name, union in _fields_of(type(self))}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> AvroModel:
        """Build the model from what fastavro read with `return_record_name=True` and this
        record's schema as the reader schema: the shapes are the schema's, so the model is
        built without pydantic's validation (the decode hot path; `model_validate` was
        most of a task's decoding): each field is converted by its annotation (enums,
        nested records, named union branches), the rest taken as fastavro gave it."""
        converters = _CONVERTERS.get(cls)
        if converters is None:
            converters = _CONVERTERS[cls] = {name: convert for name, field in cls.model_fields.items()
                                             if (convert := _converter(field.annotation)) is not None}
        values = {key: (convert(value) if value is not None and (convert := converters.get(key)) else value)
                  for key, value in data.items()}
        return cls.model_construct(**values)

    @classmethod
    def from_avro_validated(cls, data: dict[str, Any]) -> AvroModel:
        """`from_avro` with pydantic's validation of every field (the reference the fast path is tested against)."""
        return cls.model_validate({key: _from_avro(value) for key, value in data.items()})


_FIELDS: dict[type, tuple[tuple[str, bool], ...]] = {}
_CONVERTERS: dict[type, dict[str, Callable[[Any], Any]]] = {}


def _named(value: Any) -> Any:
    """A branch of a union of records, as fastavro names it: (full name, record)."""
    if isinstance(value, tuple):
        name, record = value
        return MODELS_BY_AVRO_NAME[name].from_avro(record)
    return value


def _converter(annotation: Any) -> Callable[[Any], Any] | None:
    """How to turn fastavro's value of a field of this annotation into the model's (None: as is)."""
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _converter(members[0])  # None is passed through before converting
        if any(isinstance(a, type) and issubclass(a, AvroModel) for a in members):
            return _named
        return None
    if origin is list:
        item = _converter(get_args(annotation)[0])
        return None if item is None else (lambda values: [item(v) for v in values])
    if isinstance(annotation, type):
        if issubclass(annotation, AvroModel):
            return lambda value: _named(value) if isinstance(value, tuple) else annotation.from_avro(value)
        if issubclass(annotation, Enum):
            return annotation
    return None


def _fields_of(model: type[AvroModel]) -> tuple[tuple[str, bool], ...]:
    fields = _FIELDS.get(model)
    if fields is None:
        fields = _FIELDS[model] = tuple((name, name in model.__avro_record_unions__) for name in model.model_fields)
    return fields


def _to_avro(value: Any, named_union: bool) -> Any:
    if isinstance(value, AvroModel):
        record = value.to_avro()
        return (value.__avro_name__, record) if named_union else record
    if isinstance(value, list):
        return [_to_avro(item, named_union) for item in value]
    if isinstance(value, Enum):
        return value.value
    return value


def _from_avro(value: Any) -> Any:
    if isinstance(value, tuple):
        name, record = value
        return MODELS_BY_AVRO_NAME[name].from_avro_validated(record)
    if isinstance(value, list):
        return [_from_avro(item) for item in value]
    if isinstance(value, dict):
        return {key: _from_avro(item) for key, item in value.items()}
    return value
