"""A message type on the stream: a msgspec Struct of yours, parsed strictly by writers, tolerantly by readers.

Payloads are untrusted: they are size-capped before decoding and parsed strictly as JSON (an
object, no NaN or Infinity, no duplicate keys, no number over 20 digits, no nesting too deep for
the parser), then checked against the Struct: its types and `Meta` bounds, and its
`__post_init__` for rules types cannot say (raise ValueError there). Readers (the consumers)
ignore fields they do not know, so a producer may add an optional field before every consumer
upgrades; writers (the producer) refuse them, so a typo never reaches the stream. Errors name
the field and the rule, never a value, so they are safe to log.

A Schema names the field that identifies a message (`order_id` for orders): the producer's
idempotency and partition routing, the consumers' dedupe guard and log lines use it.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec
import msgspec.inspect as types

M = TypeVar("M", bound=msgspec.Struct)

_BOM = b"\xef\xbb\xbf"
# An error names at most this many unknown fields, and only plain ones: a key like an e-mail
# address or a phone number may be personal data, as values are.
_NAMES_SHOWN = 5
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,39}")
_MAX_DIGITS = 20


class InvalidMessage(ValueError):
    """The payload is not a valid message; the text is safe to log (no value of the payload)."""


@dataclass(frozen=True)
class Schema(Generic[M]):
    """How messages of one Struct type travel: parsed, checked, serialized, identified."""

    type: type[M]
    id_field: str  # a required text field naming each message
    name: str = "message"  # in log lines: "order ord-42"
    _decoder: msgspec.json.Decoder[M] = field(init=False, repr=False, compare=False)
    _encoder: msgspec.json.Encoder = field(init=False, repr=False, compare=False)
    _info: types.StructType = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        info = types.type_info(self.type)
        if not isinstance(info, types.StructType):
            raise TypeError(f"{self.type.__name__} is not a msgspec Struct")
        if not any(f.name == self.id_field and f.required for f in info.fields):
            raise TypeError(f"{self.type.__name__} has no required field {self.id_field!r}")
        object.__setattr__(self, "_decoder", msgspec.json.Decoder(self.type))
        object.__setattr__(self, "_encoder", msgspec.json.Encoder())
        object.__setattr__(self, "_info", info)

    def serialize(self, message: M) -> bytes:
        """Compact UTF-8 JSON: the value of the entry's `data` field."""
        return self._encoder.encode(message)

    def serialize_all(self, messages: Sequence[M]) -> list[bytes]:
        """serialize() of each message, in one call: compact JSON has no raw newline to split on."""
        return self._encoder.encode_lines(messages).split(b"\n")[:-1]

    def id_of(self, message: M) -> str:
        value: str = getattr(message, self.id_field)
        return value

    def parse(self, payload: bytes | str, max_bytes: int, *, strict: bool = False) -> M:
        """One payload as a message; InvalidMessage (safe to log) when it is not one.

        `strict` (writers): a field the type does not know is refused too.
        """
        raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
        if raw.startswith(_BOM):  # editors on Windows start UTF-8 files with one; RFC 8259 allows skipping it
            raw = raw[len(_BOM) :]
        if len(raw) > max_bytes:
            raise InvalidMessage(f"payload is {len(raw):,} bytes, over the {max_bytes:,}-byte cap")
        message = self._canonical(raw)
        if message is not None:
            return message
        value = _json(raw)
        if type(value) is not dict:
            raise InvalidMessage(f"payload must be a JSON object, got {_json_type(value)}")
        if strict:
            unknown = list(_unknown(self._info, value, ""))
            if unknown:
                raise InvalidMessage(_unexpected(unknown, self._info))
        try:
            return msgspec.convert(value, self.type)
        except msgspec.ValidationError as error:
            raise InvalidMessage(str(error).replace(" - at `$`", "")) from None

    def id_in(self, payload: bytes | str, max_bytes: int) -> str | None:
        """The id field of a payload, valid or not, when it can be read unambiguously: a JSON object
        within the cap, no duplicate keys, its id plain text. None otherwise; never raises."""
        raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
        raw = raw.removeprefix(_BOM)
        if len(raw) > max_bytes:
            return None
        try:
            # Whole numbers read as floats (linear time, however many digits): only the id matters.
            text = raw.decode("utf-8")
            value = json.loads(text, object_pairs_hook=_object_without_duplicates, parse_int=float)
        except (ValueError, RecursionError):  # InvalidMessage and JSONDecodeError are ValueErrors too
            return None
        found = value.get(self.id_field) if type(value) is dict else None
        if type(found) is str and 0 < len(found) <= 128 and found.isprintable() and not found.isspace():
            return found
        return None

    def _canonical(self, raw: bytes) -> M | None:
        """The message, when `raw` is exactly what serialize() writes for a valid one; else None.

        msgspec checks types, bounds and __post_init__ while it parses, in C; a payload that
        re-encodes to the very same bytes had no duplicate keys, unknown fields, NaN, odd
        numbers or white space. Anything else takes the strict parser, which words the error.
        """
        try:
            message = self._decoder.decode(raw)
            return message if self._encoder.encode(message) == raw else None
        except (msgspec.MsgspecError, ValueError):  # ValueError: a string that cannot be encoded back
            return None


def _json(raw: bytes) -> object:
    """The reference JSON parser (stdlib, every check spelled out): the one that words errors."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage("payload is not valid UTF-8") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_reject_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as error:
        raise InvalidMessage(f"payload is not JSON ({error.msg} at char {error.pos})") from None
    except RecursionError:
        raise InvalidMessage("payload is nested too deeply") from None


def _unknown(info: Any, value: object, path: str) -> Iterator[str]:
    """The paths of the fields in `value` that the type `info` does not know (`$.items[0].color`)."""
    if isinstance(info, types.StructType) and type(value) is dict:
        known = {f.encode_name: f for f in info.fields}
        for name, item in value.items():
            if name not in known:
                yield f"{path}.{name}" if path else name
            else:
                yield from _unknown(known[name].type, item, f"{path}.{name}" if path else name)
    elif isinstance(info, types.UnionType):
        for option in info.types:
            yield from _unknown(option, value, path)
    elif isinstance(info, types.ListType | types.VarTupleType | types.SetType | types.FrozenSetType):
        if type(value) is list:
            for index, item in enumerate(value):
                yield from _unknown(info.item_type, item, f"{path}[{index}]")
    elif isinstance(info, types.DictType) and type(value) is dict:
        for key, item in value.items():
            yield from _unknown(info.value_type, item, f"{path}[{key!r}]")


def _unexpected(paths: list[str], info: types.StructType) -> str:
    """`unexpected field "note"`: plain names are shown; values, and names that could be data, never."""
    shown = sorted(p for p in paths if all(_PLAIN_NAME.fullmatch(part) for part in _parts(p)))
    what = "unexpected field" if len(paths) == 1 else f"{len(paths)} unexpected fields"
    if not shown:
        listed = " (name not shown)" if len(paths) == 1 else " (names not shown)"
    else:
        listed = " " + ", ".join(f'"{p}"' for p in shown[:_NAMES_SHOWN])
        if len(paths) > len(shown[:_NAMES_SHOWN]):
            listed += f" and {len(paths) - len(shown[:_NAMES_SHOWN])} more"
    allowed = ", ".join(sorted(f.encode_name for f in info.fields))
    return f"{what}{listed}; allowed: {allowed}"


def _parts(path: str) -> list[str]:
    return [part for part in re.split(r"[.\[\]]", path) if part and not part.isdigit()]


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise InvalidMessage("payload has a duplicate key")
    return obj


def _reject_constant(name: str) -> float:
    raise InvalidMessage(f"payload contains {name}, which is not JSON")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _MAX_DIGITS:
        raise InvalidMessage(f"payload contains a number with more than {_MAX_DIGITS} digits")
    return int(digits)


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise InvalidMessage("payload contains a number out of range")
    return number


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


@functools.cache
def schema_named(spec: str) -> Schema[Any]:
    """The Schema `module:name` names (MESSAGE_SCHEMA: orders:ORDERS); ValueError saying what is wrong."""
    module_name, _, attribute = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import {spec}: {error}") from None
    if not isinstance(found, Schema):
        raise ValueError(f"{spec} is not a Schema (core/messages.py)")
    return found
