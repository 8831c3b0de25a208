"""Your own messages: a second message type end to end, tolerant readers, strict writers, a rolling
deploy of a new optional field, and handlers tested without Redis (core/testing.py)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from conftest import Script, run_script, script_env, wait_until
from orders_v2 import ORDERS_V2, OrderV2
from payments import PAYMENTS, Payment, settle
from redis.asyncio import Redis
from test_pipeline import Recorder, dead_letters, running
from test_promises import EMAILED, FULFILLED, ran

import consumer1
import consumer2
from config import Settings
from core.messages import InvalidMessage, Schema
from core.testing import deliver
from initialization_stream import initialize
from orders import ORDERS, Item, Order, parse_order, serialize
from producer import publish_many, sample_orders
from status import caught_up
from stream_consumer import Reject, consume
from tools.local_redis import LocalRedis

STREAM = "orders"
GROUPS = ["fulfillment_group", "email_group"]
Start = Callable[..., Script]
CAP = 65536
V1 = {"order_id": "ord-1", "customer_email": "ann@example.com", "items": [{"sku": "A1", "qty": 2}]}


# --- handlers tested without Redis -------------------------------------------------------------


async def test_the_fulfillment_handler_stages_its_stock_and_its_shipment() -> None:
    outcome = await deliver(consumer1.handle, json.dumps(V1))
    assert outcome.acked
    assert outcome.writes == [
        ["HINCRBY", "{orders}:stock-booked", "A1", 2],
        ["XADD", "{orders}:shipments", "MAXLEN", "~", 100_000, "*", "order_id", "ord-1", "units", 2],
    ]


async def test_the_email_handler_acks_and_stages_nothing() -> None:
    outcome = await deliver(consumer2.handle, V1)
    assert (outcome.acked, outcome.writes, outcome.dead_letter) == (True, [], None)


async def test_what_would_be_dead_lettered_or_retried_says_so() -> None:
    missing = await deliver(consumer1.handle, {"order_id": "ord-1"})
    assert missing.dead_letter is not None
    assert "customer_email" in missing.dead_letter
    assert not missing.acked

    async def reject(order: Order) -> None:
        raise Reject("no such customer")

    async def flaky(order: Order) -> None:
        raise ConnectionError("the provider is down")

    assert (await deliver(reject, V1)).dead_letter == "rejected: no such customer"
    failed = await deliver(flaky, V1)
    assert isinstance(failed.error, ConnectionError)
    assert failed.dead_letter is None
    assert not failed.acked


async def test_a_handler_of_another_message_type() -> None:
    outcome = await deliver(
        settle, {"payment_id": "p-1", "order_id": "ord-1", "cents": 1250}, schema=PAYMENTS
    )
    assert outcome.message == Payment("p-1", "ord-1", 1250)
    assert outcome.writes == [["HINCRBY", "{orders}:paid-cents", "ord-1", 1250]]


# --- tolerant readers, strict writers ------------------------------------------------------------


def test_readers_ignore_a_field_they_do_not_know_and_writers_refuse_it() -> None:
    with_coupon = {**V1, "coupon": "SUMMER", "items": [{"sku": "A1", "qty": 2, "gift_wrap": True}]}
    payload = json.dumps(with_coupon)
    assert parse_order(payload, CAP, strict=False) == parse_order(json.dumps(V1), CAP)
    with pytest.raises(InvalidMessage, match=r'2 unexpected fields "coupon", "items\[0\].gift_wrap"'):
        parse_order(payload, CAP)  # the producer's check


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ({"customer_email": "a@b.co"}, "order_id"),
        ({"order_id": 7, "customer_email": "a@b.co"}, "$.order_id"),
        ({"order_id": "a", "customer_email": "a@b.co", "items": [{"sku": "A"}]}, "qty"),
        ({"order_id": "a", "customer_email": "a@b.co", "total": "12"}, "$.total"),
        ({"order_id": "a", "customer_email": "SECRET"}, "customer_email"),
    ],
)
def test_a_missing_or_mistyped_field_is_named_by_readers_too(payload: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidMessage) as refused:
        parse_order(json.dumps(payload), CAP, strict=False)
    assert named in str(refused.value)
    assert "SECRET" not in str(refused.value)


def test_a_schema_needs_a_struct_with_a_required_id_field() -> None:
    class NoId(msgspec.Struct):
        name: str

    with pytest.raises(TypeError, match="no required field 'payment_id'"):
        Schema(NoId, id_field="payment_id")


# --- end to end ----------------------------------------------------------------------------------


async def test_a_second_message_type_end_to_end(redis: Redis, settings: Settings, redis_url: str) -> None:
    """Payments on the stream: the consumer hands the handler Payment messages; each is settled
    once; an invalid one is dead-lettered naming its payment_id."""
    await initialize(redis, settings)
    payments = [Payment(f"p-{n}", f"ord-{n % 3}", 100 * n) for n in range(1, 10)]
    await publish_many(redis, STREAM, payments, schema=PAYMENTS)  # the producer, with the message's own id
    bad = b'{"payment_id": "p-bad", "order_id": "ord-1", "cents": 0}'
    await redis.xadd(STREAM, {"data": bad})
    group = settings.fulfillment_group
    stop = asyncio.Event()
    task = asyncio.create_task(consume(redis, settings, group, "c", settle, stop, schema=PAYMENTS))
    try:
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "every payment settled")
    finally:
        stop.set()
        await task
    paid: Any = await redis.hgetall("{orders}:paid-cents")
    expected = Counter[str]()
    for payment in payments:
        expected[payment.order_id] += payment.cents
    assert {key.decode(): int(value) for key, value in paid.items()} == dict(expected)
    [letter] = await dead_letters(redis, settings)
    assert "invalid payment" in letter["error"]
    assert "cents" in letter["error"]
    # The operator's tools read the same type: the dead letter shows its payment_id.
    tools = script_env(redis_url, MESSAGE_SCHEMA="tests.payments:PAYMENTS")
    [row] = json.loads(run_script("deadletter", tools, "list", "--json").stdout)
    assert row["order_id"] == "p-bad"
    assert (
        json.loads(run_script("status", tools, "--json").stdout)["newest_dead_letters"][0]["order_id"]
        == "p-bad"
    )


async def test_an_order_with_a_field_the_consumers_do_not_know_is_handled_not_dead_lettered(
    redis: Redis, settings: Settings
) -> None:
    """A producer ahead of its consumers adds `coupon`: every group handles the order, and the
    field is still in the entry (a dead letter or a redrive of it would keep it)."""
    await initialize(redis, settings)
    payload = json.dumps({**V1, "coupon": "SUMMER"})
    entry = await redis.xadd(STREAM, {"data": payload})
    recorder = Recorder()
    groups = settings.groups
    async with running(
        redis, settings, *((group, f"c-{group}", recorder.handler(group)) for group in groups)
    ):
        await wait_until(lambda: caught_up(redis, STREAM, groups), "both groups")
    assert Counter(name for name, _ in recorder.handled) == Counter(dict.fromkeys(groups, 1))
    assert await dead_letters(redis, settings) == []
    entries: Any = await redis.xrange(STREAM, entry, entry)
    assert json.loads(entries[0][1][b"data"])["coupon"] == "SUMMER"


def test_orders_still_serialize_as_before() -> None:
    order = Order("ord-42", "ann@example.com", (Item("A1", 2),), 42.5, "2026-11-25T10:00:00Z")
    assert serialize(order) == (
        b'{"order_id":"ord-42","customer_email":"ann@example.com","items":[{"sku":"A1","qty":2}],'
        b'"total":42.5,"created_at":"2026-11-25T10:00:00Z"}'
    )
    assert ORDERS.id_of(order) == "ord-42"


@pytest.mark.slow
async def test_a_rolling_deploy_of_a_new_optional_field(own_server: LocalRedis, scripts: Start) -> None:
    """Producer v2 (orders with a coupon) while consumers v1 run; then consumers v2 reading the v1
    orders still in the stream: every order handled by every group, none dead-lettered."""
    env = script_env(own_server.url, MAINTENANCE_INTERVAL_MS="0")
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        v1_consumers = [
            scripts("consumer1", {**env, "CONSUMER_NAME": "f-v1"}),
            scripts("consumer2", {**env, "CONSUMER_NAME": "e-v1"}),
        ]
        with_coupons = [
            OrderV2(o.order_id, o.customer_email, o.items, coupon="SUMMER") for o in sample_orders(20)
        ]
        await publish_many(redis, STREAM, with_coupons, schema=ORDERS_V2)  # the producer, upgraded first
        await wait_until(lambda: caught_up(redis, STREAM, GROUPS), "the v1 consumers to handle v2 orders")
        for consumer in v1_consumers:
            consumer.process.send_signal(signal.SIGTERM)
            assert consumer.wait() == 0
        old = sample_orders(10)
        await publish_many(redis, STREAM, old)  # an old producer's, still in the stream at the upgrade
        v2_consumers = [
            scripts("tests.orders_v2", {**env, "CONSUMER_NAME": f"{group}-v2", "SERVICE_GROUP": group})
            for group in GROUPS
        ]
        await wait_until(lambda: caught_up(redis, STREAM, GROUPS), "the v2 consumers to handle v1 orders")
        assert await redis.xlen("orders:dead-letter") == 0
        v1 = [c.output() for c in v1_consumers]
        assert ran(v1, FULFILLED) == Counter({o.order_id: 1 for o in with_coupons})
        assert ran(v1, EMAILED) == Counter({o.order_id: 1 for o in with_coupons})
        v2 = [c.output() for c in v2_consumers]
        assert ran(v2, V2_RAN) == Counter({o.order_id: 2 for o in old})  # once per group
        assert all(f"order {o.order_id} with coupon -" in "".join(v2) for o in old)
    finally:
        await redis.aclose()


V2_RAN = re.compile(r"ran order (\S+) with coupon")
