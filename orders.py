"""The order schema: strict parsing, validation and serialization. No Redis here.

Payloads are untrusted: they are size-capped before decoding, parsed strictly (a JSON
object, no NaN/Infinity, no duplicate keys, no huge numbers) and validated. Error
messages name the problem, never the payload's values, so they are safe to log.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, TypeGuard

import msgspec
from msgspec import Meta

MAX_ITEMS = 1000
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_FIELDS = frozenset(("order_id", "customer_email", "items", "total", "created_at"))
# An error names at most this many unexpected fields, and only plain ones: a key like an
# e-mail address or a phone number may be personal data, as values are.
_NAMES_SHOWN = 5
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,39}")
_BOM = b"\xef\xbb\xbf"


class InvalidOrder(ValueError):
    """The payload is not a valid order; the message is safe to log."""


# The bounds below are the validation rules, checked by msgspec's decoder as it parses (they
# do not apply when a program builds an Order itself); order_from_dict states the same rules.
# gc=False: an order holds only text, numbers and items, never a cycle, so the garbage
# collector need not track the thousands made per second.
class Item(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    sku: Annotated[str, Meta(min_length=1, max_length=64)]
    qty: Annotated[int, Meta(ge=1, le=1_000_000)]


class Order(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """One order as it travels on the stream (a frozen msgspec Struct: decoded and encoded in C)."""

    order_id: Annotated[str, Meta(min_length=1, max_length=128)]
    customer_email: Annotated[str, Meta(min_length=1, max_length=254)]
    items: Annotated[tuple[Item, ...], Meta(max_length=MAX_ITEMS)] = ()
    total: Annotated[float, Meta(ge=0, le=sys.float_info.max)] | None = None
    created_at: Annotated[str, Meta(min_length=1, max_length=64)] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form; optional fields that are unset are left out."""
        data: dict[str, Any] = {"order_id": self.order_id, "customer_email": self.customer_email}
        if self.items:
            data["items"] = [{"sku": item.sku, "qty": item.qty} for item in self.items]
        if self.total is not None:
            data["total"] = self.total
        if self.created_at is not None:
            data["created_at"] = self.created_at
        return data


_decoder = msgspec.json.Decoder(Order)
_encoder = msgspec.json.Encoder()


def serialize(order: Order) -> bytes:
    """Compact UTF-8 JSON, the value of the stream entry's `data` field (fields in schema order)."""
    return _encoder.encode(order)


def serialize_all(orders: Sequence[Order]) -> list[bytes]:
    """serialize() of each order, in one call: compact JSON has no raw newline to split on."""
    return _encoder.encode_lines(orders).split(b"\n")[:-1]


def parse_order(payload: bytes | str, max_bytes: int) -> Order:
    """Parse and validate one payload; raise InvalidOrder (safe to log) when it is not an order."""
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    if raw.startswith(_BOM):
        # Editors on Windows start UTF-8 files with a byte order mark; RFC 8259 lets a parser ignore it.
        raw = raw[len(_BOM) :]
    if len(raw) > max_bytes:
        raise InvalidOrder(f"payload is {len(raw)} bytes, over the {max_bytes}-byte cap")
    order = _canonical_order(raw)
    if order is not None:
        return order
    return _strict_order(raw)


def _canonical_order(raw: bytes) -> Order | None:
    """The order, when `raw` is exactly what serialize() writes for a valid one; else None.

    msgspec checks the types and bounds while it parses; a payload that re-encodes to the very
    same bytes had no duplicate keys, NaN, odd numbers or whitespace, so what is left are the
    checks on text the decoder cannot express. Anything else, valid or not, takes the strict
    parser, which also words the error.
    """
    try:
        order = _decoder.decode(raw)
        if _encoder.encode(order) != raw:
            return None
    except (msgspec.MsgspecError, ValueError):  # ValueError: a string that cannot be encoded back
        return None
    return order if _text_is_valid(order) else None


def _text_is_valid(order: Order) -> bool:
    """What the decoder leaves (it did types and lengths): printable, not blank, an address, a time."""
    # _is_text's remainder, spelled out: this runs once per order consumed.
    order_id, email = order.order_id, order.customer_email
    # An e-mail address has no white space in it, so it is never blank.
    if not (order_id.isprintable() and not order_id.isspace() and email.isprintable()):
        return False
    if not _EMAIL.fullmatch(email):
        return False
    for item in order.items:
        if not item.sku.isprintable() or item.sku.isspace():
            return False
    return order.created_at is None or _is_time(order.created_at)


def _strict_order(raw: bytes) -> Order:
    """The reference parser (stdlib json with every check spelled out): the one that words errors."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidOrder("payload is not valid UTF-8") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_reject_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as error:
        raise InvalidOrder(f"payload is not JSON ({error.msg} at char {error.pos})") from None
    except RecursionError:
        raise InvalidOrder("payload is nested too deeply") from None
    return order_from_dict(value)


def order_from_dict(value: object) -> Order:
    """Validate an already-decoded JSON value as an order."""
    if type(value) is not dict:
        raise InvalidOrder(f"payload must be a JSON object, got {_json_type(value)}")
    if not value.keys() <= _FIELDS:
        raise InvalidOrder(_unexpected(value.keys() - _FIELDS))
    order_id = value.get("order_id")
    if not _is_text(order_id, 128):
        raise InvalidOrder(_text_problem("order_id", order_id, 128))
    email = value.get("customer_email")
    if not _is_text(email, 254):
        raise InvalidOrder(_text_problem("customer_email", email, 254))
    if not _EMAIL.fullmatch(email):
        raise InvalidOrder("customer_email does not look like an e-mail address")
    items = value.get("items")
    total = value.get("total")
    # The comparison is false for NaN and infinities too.
    if total is not None and (type(total) not in (int, float) or not 0 <= total <= sys.float_info.max):
        raise InvalidOrder("total must be a finite number, not negative")
    created_at = value.get("created_at")
    if created_at is not None and not _is_time(created_at):
        raise InvalidOrder("created_at must be an ISO 8601 time")
    return Order(
        order_id,
        email,
        () if items is None else _items(items),
        None if total is None else float(total),
        created_at,
    )


def _unexpected(names: set[str]) -> str:
    """`unexpected field "note"`: plain names are shown; values, and names that could be data, never."""
    shown = sorted(name for name in names if _PLAIN_NAME.fullmatch(name))[:_NAMES_SHOWN]
    what = "unexpected field" if len(names) == 1 else f"{len(names)} unexpected fields"
    if not shown:
        listed = " (name not shown)" if len(names) == 1 else " (names not shown)"
    else:
        listed = " " + ", ".join(f'"{name}"' for name in shown)
        if len(names) > len(shown):
            listed += f" and {len(names) - len(shown)} more"
    return f"{what}{listed}; allowed: {', '.join(sorted(_FIELDS))}"


def _is_text(value: object, max_len: int) -> TypeGuard[str]:
    """A non-blank printable string (lone surrogates are not printable) of at most `max_len`."""
    return type(value) is str and 0 < len(value) <= max_len and value.isprintable() and not value.isspace()


def _text_problem(name: str, value: object, max_len: int) -> str:
    if type(value) is not str or not value.strip():
        return f"{name} must be a non-empty string"
    if len(value) > max_len:
        return f"{name} is longer than {max_len} characters"
    return f"{name} contains control characters or lone surrogates"


def _is_time(value: object) -> bool:
    if not _is_text(value, 64):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _items(value: object) -> tuple[Item, ...]:
    if type(value) is not list:
        raise InvalidOrder("items must be a list")
    if len(value) > MAX_ITEMS:
        raise InvalidOrder(f"items has more than {MAX_ITEMS} entries")
    items = []
    for item in value:
        if type(item) is not dict or len(item) != 2:
            raise InvalidOrder('each item must be an object with exactly "sku" and "qty"')
        sku, qty = item.get("sku"), item.get("qty")
        if not _is_text(sku, 64):
            raise InvalidOrder(_text_problem("item sku", sku, 64))
        if type(qty) is not int or not 1 <= qty <= 1_000_000:
            raise InvalidOrder("item qty must be a whole number from 1 to 1000000")
        items.append(Item(sku, qty))
    return tuple(items)


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise InvalidOrder("payload has a duplicate key")
    return obj


def _reject_constant(name: str) -> float:
    raise InvalidOrder(f"payload contains {name}, which is not JSON")


def _bounded_int(digits: str) -> int:
    if len(digits) > 20:
        raise InvalidOrder("payload contains a number with more than 20 digits")
    return int(digits)


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise InvalidOrder("payload contains a number out of range")
    return number


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
