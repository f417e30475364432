"""The record codec of the key schema: a value record is a frozen dataclass whose fields are read back from JSON
field by field against their annotations.

``Record.encode()`` writes compact JSON with the schema version (``keys.encode``); ``Record.read(key, raw)`` and
``Record.from_kv(kv)`` validate what they read and raise BadKeyData naming the key and the field: a bad value is
never half-read. Fields a record does not know are ignored; fields without a default (or marked ``required``) are
required; fields marked ``omitted_when_none`` are not written while None; fields marked ``kv_field`` come from the
KV (its revisions, its lease), ``stored_as`` names a field's JSON key; ``Word`` is an enum stored as its word. The
records themselves are ``values.py``. Pure: imports ``errors`` and ``schema.keys`` only; never ``etcd/`` or anything
above.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from typing import Any, ClassVar, NamedTuple

from ..errors import BadKeyData
from .keys import decode, encode


def kv_field(default: int = 0):
    """A field that comes from the KV (a revision, a lease), not from the stored value."""
    return dataclasses.field(default=default, metadata={"kv": True})


def stored_as(name: str, **kwargs):
    """A field stored under another JSON name (``RoundInfo.number`` is ``round``)."""
    return dataclasses.field(metadata={"json": name}, **kwargs)


def omitted_when_none():
    """A field left out of the stored value while it is None (a field added later: older values stay as they were)."""
    return dataclasses.field(default=None, metadata={"omit_none": True})


def required(default: Any):
    """A field that every written value has, though the class gives it a default (for positional builders)."""
    return dataclasses.field(default=default, metadata={"required": True})


class Word(str, enum.Enum):
    """An enum whose members are the words stored in etcd (``str()`` and f-strings give the word)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class _Spec(NamedTuple):
    name: str  # the attribute
    json: str  # the name in the stored value
    kind: Any  # the resolved annotation
    required: bool
    omit_none: bool = False  # left out of the stored value while None


def _describe(kind) -> str:
    args = typing.get_args(kind)
    if args and type(None) in args:
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(m.value for m in kind)
    if isinstance(kind, type) and issubclass(kind, Record):
        return "an object"
    words = {int: "a whole number", float: "a finite number", str: "a string", bool: "true or false"}
    return words.get(kind, str(kind))


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer beyond any float
        return False


@functools.cache
def _shape(kind) -> tuple[Any, tuple]:
    """``kind``'s origin and arguments, worked out once per annotation (every field of every value read asks)."""
    return typing.get_origin(kind), typing.get_args(kind)


def convert(key: str, field: str, kind, value):
    """``value`` as ``kind``, or BadKeyData naming the key and the field."""
    if kind is str and isinstance(value, str) or kind is int and type(value) is int:  # most fields: checked at once
        return value
    origin, args = _shape(kind)
    if args and (origin in (typing.Union, types.UnionType)):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and value is not None:
            try:
                return convert(key, field, others[0], value)
            except BadKeyData as exc:
                if not (isinstance(others[0], type) and issubclass(others[0], Record) and isinstance(value, dict)):
                    raise BadKeyData(key, f"{field} must be {_describe(kind)}, not {value!r}") from exc
                raise
    elif origin is tuple and isinstance(value, list):
        item = args[0]
        return tuple(convert(key, f"{field}[{i}]", item, v) for i, v in enumerate(value))
    elif kind is int and type(value) is int:
        return value
    elif kind is float and type(value) in (int, float) and _finite(value):  # JSON's Infinity and NaN are no time
        return float(value)
    elif kind is str and isinstance(value, str):
        return value
    elif kind is bool and type(value) is bool:
        return value
    elif isinstance(kind, type) and issubclass(kind, enum.Enum) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    elif isinstance(kind, type) and issubclass(kind, Record) and isinstance(value, dict):
        try:
            return kind.from_json(key, value)
        except BadKeyData as exc:
            raise BadKeyData(key, f"{field}: {exc.problem}") from exc
    raise BadKeyData(key, f"{field} must be {_describe(kind)}, not {value!r}")


class Record:
    """Base of the value records (frozen dataclasses)."""

    OMIT_NONE: ClassVar[bool] = False  # leave fields that are None out of the stored value

    @classmethod
    @functools.cache
    def _specs(cls) -> tuple[_Spec, ...]:
        hints = typing.get_type_hints(cls)
        return tuple(_Spec(f.name, f.metadata.get("json", f.name), hints[f.name],
                           f.metadata.get("required", False) or (f.default is dataclasses.MISSING
                                                                 and f.default_factory is dataclasses.MISSING),
                           f.metadata.get("omit_none", False))
                     for f in dataclasses.fields(cls) if not f.metadata.get("kv"))

    def to_json(self) -> dict[str, Any]:
        out = {}
        for s in self._specs():
            value = getattr(self, s.name)
            if value is None and (self.OMIT_NONE or s.omit_none) and not s.required:
                continue
            out[s.json] = value.to_json() if isinstance(value, Record) else list(value) if isinstance(value, tuple) \
                else value
        return out

    def encode(self) -> bytes:
        return encode(self.to_json())

    @classmethod
    def from_json(cls, key: str, obj: dict[str, Any], **kv):
        """The record in ``obj`` (decoded from ``key``), with the KV fields ``kv``; validated."""
        if not isinstance(obj, dict):
            raise BadKeyData(key, "not a JSON object")
        missing = [s.json for s in cls._specs() if s.required and s.json not in obj]
        if missing:
            raise BadKeyData(key, f"missing field(s) {', '.join(missing)}")
        fields = {s.name: convert(key, s.json, s.kind, obj[s.json]) for s in cls._specs() if s.json in obj}
        record = cls(**fields, **kv)
        record.check(key)
        return record

    @classmethod
    def read(cls, key: str, raw: bytes, **kv):
        return cls.from_json(key, decode(key, raw), **kv)

    @classmethod
    @functools.cache
    def _kv_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("kv"))

    @classmethod
    def from_kv(cls, kv):
        """The record in an etcd KV, with the KV fields the record has (mod_revision, create_revision, lease)."""
        return cls.read(kv.key, kv.value, **{name: getattr(kv, name) for name in cls._kv_fields()})

    def check(self, key: str) -> None:
        """Rules between fields or on ranges; raises BadKeyData naming ``key``."""
