"""The order schema: valid orders round-trip, every kind of bad payload is refused safely."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import orders
from core.messages import Schema
from orders import InvalidOrder, Item, Order, parse_order, serialize, serialize_all
from producer import sample_orders

CAP = 65536
FAST_PATH = Schema._canonical  # before the fixture below swaps it out
GOOD = {
    "order_id": "ord-42",
    "customer_email": "ann@example.com",
    "items": [{"sku": "A1", "qty": 2}],
    "total": 42.5,
    "created_at": "2026-11-25T10:00:00Z",
}

# Each is refused; the secret marker must never appear in the error message.
BAD_PAYLOADS: dict[str, bytes] = {
    "not json": b"hello SECRET",
    "json array": b'["SECRET"]',
    "json string": b'"SECRET"',
    "missing order_id": b'{"customer_email": "SECRET@example.com"}',
    "missing email": b'{"order_id": "SECRET"}',
    "bad email": b'{"order_id": "a", "customer_email": "SECRET"}',
    "extra field": b'{"order_id": "a", "customer_email": "a@b.co", "note": "SECRET"}',
    "extra field named like data": b'{"order_id": "a", "customer_email": "a@b.co", "SECRET@b.co": 1}',
    "wrong type id": b'{"order_id": 7, "customer_email": "a@b.co"}',
    "empty id": b'{"order_id": " ", "customer_email": "a@b.co"}',
    "bool total": b'{"order_id": "a", "customer_email": "a@b.co", "total": true}',
    "negative total": b'{"order_id": "a", "customer_email": "a@b.co", "total": -1}',
    "NaN": b'{"order_id": "a", "customer_email": "a@b.co", "total": NaN}',
    "Infinity": b'{"order_id": "a", "customer_email": "a@b.co", "total": Infinity}',
    "huge float": b'{"order_id": "a", "customer_email": "a@b.co", "total": 1e999}',
    "duplicate key": b'{"order_id": "a", "order_id": "SECRET", "customer_email": "a@b.co"}',
    "5000 digits": b'{"order_id": "a", "customer_email": "a@b.co", "total": ' + b"9" * 5000 + b"}",
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "lone surrogate": b'{"order_id": "\\ud800SECRET", "customer_email": "a@b.co"}',
    "invalid utf-8": b'{"order_id": "\xff\xfeSECRET", "customer_email": "a@b.co"}',
    "over the cap": b'{"order_id": "SECRET", "customer_email": "a@b.co", "x": "' + b"x" * CAP + b'"}',
    "bad item": b'{"order_id": "a", "customer_email": "a@b.co", "items": [{"sku": "SECRET"}]}',
    "zero qty": b'{"order_id": "a", "customer_email": "a@b.co", "items": [{"sku": "A", "qty": 0}]}',
    "bad time": b'{"order_id": "a", "customer_email": "a@b.co", "created_at": "SECRET"}',
    "control chars": b'{"order_id": "a\\u0000", "customer_email": "a@b.co"}',
    # Compact, as serialize() writes: these reach the msgspec fast path's own checks.
    "compact duplicate key": b'{"order_id":"a","order_id":"SECRET","customer_email":"a@b.co"}',
    "compact control chars": b'{"order_id":"SECRET\\u0000","customer_email":"a@b.co"}',
    "compact format char": '{"order_id":"SECRET\u200b","customer_email":"a@b.co"}'.encode(),
    "compact blank id": b'{"order_id":"   ","customer_email":"a@b.co"}',
    "compact blank sku": b'{"order_id":"a","customer_email":"a@b.co","items":[{"sku":" ","qty":1}]}',
    "compact bad email": b'{"order_id":"a","customer_email":"SECRET@b"}',
    "compact bad time": b'{"order_id":"a","customer_email":"a@b.co","created_at":"SECRET"}',
    "compact 21 digits": b'{"order_id":"a","customer_email":"a@b.co","total":123456789012345678901}',
    "compact float qty": b'{"order_id":"a","customer_email":"a@b.co","items":[{"sku":"A","qty":2.0}]}',
    "compact lone surrogate": b'{"order_id":"\\udc00SECRET","customer_email":"a@b.co"}',
    "compact long id": b'{"order_id":"' + b"S" * 129 + b'","customer_email":"a@b.co"}',
    "compact too many items": b'{"order_id":"a","customer_email":"a@b.co","items":['
    + b",".join([b'{"sku":"A","qty":1}'] * 1001)
    + b"]}",
}


# What the producer refuses but a consumer reads (it ignores fields it does not know).
READERS_ACCEPT = {"extra field", "extra field named like data"}


@pytest.fixture(autouse=True, params=["msgspec fast path", "strict path only"])
def parser_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test with the msgspec fast path and with the strict stdlib parser alone."""
    if request.param == "strict path only":
        monkeypatch.setattr(Schema, "_canonical", lambda self, raw: None)


def test_valid_order_parses_and_round_trips() -> None:
    order = parse_order(json.dumps(GOOD).encode(), CAP)
    assert order == Order("ord-42", "ann@example.com", (Item("A1", 2),), 42.5, "2026-11-25T10:00:00Z")
    assert parse_order(serialize(order), CAP) == order
    assert json.loads(serialize(order)) == GOOD


def test_minimal_order_needs_only_id_and_email() -> None:
    order = parse_order('{"order_id": "x", "customer_email": "b@c.io"}', CAP)
    assert order == Order("x", "b@c.io")
    assert json.loads(serialize(order)) == {"order_id": "x", "customer_email": "b@c.io"}


@pytest.mark.parametrize("name", list(BAD_PAYLOADS))
def test_bad_payload_is_refused_without_echoing_it(name: str) -> None:
    with pytest.raises(InvalidOrder) as refused:
        parse_order(BAD_PAYLOADS[name], CAP)
    assert "SECRET" not in str(refused.value)
    assert str(refused.value)


def test_what_serialize_writes_takes_the_fast_path() -> None:
    order = Order("ord-42", "ann@example.com", (Item("A1", 2),), 42.5, "2026-11-25T10:00:00Z")
    assert FAST_PATH(orders.ORDERS, serialize(order)) == order


@pytest.mark.parametrize("name", [name for name in BAD_PAYLOADS if name.startswith("compact")])
def test_the_fast_path_accepts_no_bad_compact_payload(name: str) -> None:
    assert FAST_PATH(orders.ORDERS, BAD_PAYLOADS[name]) is None


def test_valid_but_not_compact_json_is_accepted() -> None:
    spaced = b'{ "total": 42, "customer_email": "ann@example.com", "order_id": "ord-\\u00e9" }'
    assert parse_order(spaced, CAP) == Order("ord-\u00e9", "ann@example.com", total=42.0)


class Note(msgspec.Struct, frozen=True):
    """A message whose text may hold anything: newlines, U+2028, quotes."""

    note_id: str
    text: str
    tags: tuple[str, ...] = ()


NOTES = Schema(Note, id_field="note_id")


@given(
    st.lists(
        st.builds(Note, note_id=st.text(), text=st.text(), tags=st.lists(st.text()).map(tuple)), max_size=20
    )
)
@settings(derandomize=True, max_examples=200)
def test_serializing_messages_together_gives_each_as_alone(batch: list[Note]) -> None:
    """publish_many serializes a chunk in one call, split at newlines: any text (a newline, U+2028)
    is escaped or kept inside its string, never a line break between two messages."""
    assert NOTES.serialize_all(batch) == [NOTES.serialize(note) for note in batch]
    orders = sample_orders(5)
    assert serialize_all(orders) == [serialize(order) for order in orders]
