"""The order: the pipeline's message type, and the worked example of yours. No Redis here.

A message type is a msgspec Struct: its fields' types and `Meta` bounds are checked as it is
decoded (in C), `__post_init__` checks what types cannot say, and a Schema (core/messages.py)
says which field identifies a message. The producer parses strictly (a field the Struct does
not know is refused); consumers tolerantly (it is ignored), so a producer may add an optional
field before the consumers upgrade. docs/services.md says which changes are compatible.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from core.messages import InvalidMessage, Schema

MAX_ITEMS = 1000
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

InvalidOrder = InvalidMessage  # the payload is not a valid order; the message is safe to log


def _is_text(value: str) -> bool:
    """Printable (lone surrogates are not) and not blank."""
    return value.isprintable() and not value.isspace()


# gc=False: an order holds only text, numbers and items, never a cycle, so the garbage collector
# need not track the thousands made per second.
class Item(msgspec.Struct, frozen=True, gc=False):
    sku: Annotated[str, Meta(min_length=1, max_length=64)]
    qty: Annotated[int, Meta(ge=1, le=1_000_000)]

    def __post_init__(self) -> None:
        if not _is_text(self.sku):
            raise ValueError("item sku must be printable text, not blank")


class Order(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """One order as it travels on the stream."""

    order_id: Annotated[str, Meta(min_length=1, max_length=128)]
    customer_email: Annotated[str, Meta(min_length=1, max_length=254)]
    items: Annotated[tuple[Item, ...], Meta(max_length=MAX_ITEMS)] = ()
    total: Annotated[float, Meta(ge=0, le=sys.float_info.max)] | None = None
    created_at: Annotated[str, Meta(min_length=1, max_length=64)] | None = None

    def __post_init__(self) -> None:
        if not _is_text(self.order_id):
            raise ValueError("order_id must be printable text, not blank")
        if not (self.customer_email.isprintable() and _EMAIL.fullmatch(self.customer_email)):
            raise ValueError("customer_email does not look like an e-mail address")
        if self.created_at is not None and not _is_time(self.created_at):
            raise ValueError("created_at must be an ISO 8601 time")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form; optional fields that are unset are left out."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        return data


def _is_time(value: str) -> bool:
    if not _is_text(value):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


ORDERS = Schema(Order, id_field="order_id", name="order")


def serialize(order: Order) -> bytes:
    """Compact UTF-8 JSON, the value of the stream entry's `data` field (fields in schema order)."""
    return ORDERS.serialize(order)


def serialize_all(orders: Sequence[Order]) -> list[bytes]:
    """serialize() of each order, in one call."""
    return ORDERS.serialize_all(orders)


def parse_order(payload: bytes | str, max_bytes: int, *, strict: bool = True) -> Order:
    """Parse and validate one payload; InvalidOrder (safe to log) when it is not an order.

    `strict` (the producer's default): a field an order does not have is refused; consumers
    pass False and ignore it.
    """
    return ORDERS.parse(payload, max_bytes, strict=strict)


def readable_order_id(payload: bytes | str, max_bytes: int) -> str | None:
    """The `order_id` of a payload, valid order or not, when it can be read unambiguously; else None
    (support finds an order by it even when another field made it invalid). Never raises."""
    return ORDERS.id_in(payload, max_bytes)
