"""The base of the generated models: conversion to and from fastavro's data shapes."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any, ClassVar

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
        """Build the model from what fastavro read with `return_record_name=True`."""
        return cls.model_validate({key: _from_avro(value) for key, value in data.items()})


_FIELDS: dict[type, tuple[tuple[str, bool], ...]] = {}


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
        return MODELS_BY_AVRO_NAME[name].from_avro(record)
    if isinstance(value, list):
        return [_from_avro(item) for item in value]
    if isinstance(value, dict):
        return {key: _from_avro(item) for key, item in value.items()}
    return value
