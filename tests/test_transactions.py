"""Transactional handlers: Redis writes staged on `tx` are applied with the commit, exactly once."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import tx_service
from conftest import Script, make_settings, script_env, wait_until
from redis.asyncio import Redis
from test_faults import ReplyDropper
from test_pipeline import running

from config import Settings
from initialization_stream import initialize
from orders import Order
from producer import publish_many, sample_orders
from redisPool import redis_connect
from status import caught_up
from tools.local_redis import LocalRedis
from tx import CrossSlotWrite, Tx

STREAM = "orders"
EFFECTS, OUTBOX = "{orders}:effects", "{orders}:outbox"
Start = Callable[..., Script]


async def effects(redis: Redis) -> dict[str, int]:
    """How many times each order's HINCRBY was applied."""
    raw: Any = await redis.hgetall(EFFECTS)
    return {key.decode(): int(value) for key, value in raw.items()}


async def exactly_once(redis: Redis, orders: list[Order]) -> bool:
    """Every order's effect applied once, and one outbox event each."""
    wanted = {o.order_id: 1 for o in orders}
    return await effects(redis) == wanted and await redis.xlen(OUTBOX) == len(orders)


@asynccontextmanager
async def published(
    server: LocalRedis, count: int, batch: int
) -> AsyncIterator[tuple[Redis, dict[str, str], list[Order]]]:
    """A pipeline on `server` with `count` orders published; the client, the services' env, the orders."""
    redis = Redis.from_url(server.url)
    try:
        await initialize(redis, make_settings(server.url))
        orders = sample_orders(count)
        await publish_many(redis, STREAM, orders)
        yield redis, script_env(server.url, CLAIM_IDLE_MS="300", BATCH_SIZE=str(batch)), orders
    finally:
        await redis.aclose()


def test_a_write_outside_the_streams_slot_is_refused_with_a_clear_message() -> None:
    tx = Tx("orders")
    tx.hincrby(tx.key("stock"), "A1", 2)
    assert tx.commands == [["HINCRBY", "{orders}:stock", "A1", 2]]
    with pytest.raises(CrossSlotWrite, match=r"name it '\{orders\}:stock'"):
        tx.hincrby("stock", "A1", 2)
    assert len(tx.commands) == 1


async def test_staged_writes_apply_once_and_a_failed_run_applies_nothing(
    redis: Redis, settings: Settings
) -> None:
    await initialize(redis, settings)
    orders = sample_orders(20)
    failing = {orders[3].order_id}

    async def handle(order: Order, tx: Tx) -> None:
        await tx_service.handle(order, tx)
        if order.order_id in failing:
            failing.discard(order.order_id)
            raise RuntimeError("fails once, after staging")

    await publish_many(redis, STREAM, orders)
    group = settings.fulfillment_group
    async with running(redis, settings, (group, "c", handle)):
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "every order committed")
    assert await exactly_once(redis, orders)


async def test_a_lost_commit_reply_applies_the_writes_once(own_server: LocalRedis) -> None:
    def commit_reply(name: bytes, reply: Any) -> bool:
        return name == b"FCALL" and isinstance(reply, list) and len(reply) == 4 and isinstance(reply[1], list)

    dropper = ReplyDropper(own_server.port, commit_reply)
    port = await dropper.start()
    settings = make_settings(f"redis://127.0.0.1:{port}/0", SOCKET_TIMEOUT_MS="500")
    direct = Redis.from_url(own_server.url)
    orders = sample_orders(10)

    try:
        await initialize(direct, settings)
        await publish_many(direct, STREAM, orders)
        async with (
            redis_connect(settings) as redis,
            running(redis, settings, ("email_group", "c", tx_service.handle)),
        ):
            await wait_until(lambda: caught_up(direct, STREAM, ["email_group"]), "every order committed")
        assert dropper.dropped == 1  # the commit was sent again on a new connection
        assert await exactly_once(direct, orders)
    finally:
        await direct.aclose()
        await dropper.close()


async def test_sigkill_between_the_handler_and_the_commit(own_server: LocalRedis, scripts: Start) -> None:
    async with published(own_server, 5, batch=5) as (redis, env, orders):
        victim = scripts("tests.tx_service", {**env, "CONSUMER_NAME": "victim", "HOLD_MS": "60000"})
        await wait_until(lambda: "staged order" in victim.output(), "the handler to stage its writes")
        victim.kill()  # after the handler's effects, before the commit
        assert await effects(redis) == {}
        assert await redis.xlen(OUTBOX) == 0
        scripts("tests.tx_service", {**env, "CONSUMER_NAME": "rescuer"})
        await wait_until(lambda: caught_up(redis, STREAM, ["fulfillment_group"]), "the rescuer", 20)
        assert await exactly_once(redis, orders)


async def test_a_slow_owner_and_a_claimer_racing_commit_once(own_server: LocalRedis, scripts: Start) -> None:
    """The owner is stopped past its lease, the claimer commits, the owner wakes and commits late."""
    async with published(own_server, 3, batch=3) as (redis, env, orders):
        owner = scripts("tests.tx_service", {**env, "CONSUMER_NAME": "owner", "HOLD_MS": "1500"})
        await wait_until(lambda: "staged order" in owner.output(), "the owner to stage its writes")
        owner.process.send_signal(signal.SIGSTOP)  # cut off: its lease lapses
        try:
            scripts("tests.tx_service", {**env, "CONSUMER_NAME": "claimer"})
            await wait_until(lambda: exactly_once(redis, orders), "the claimer's commit", 20)
        finally:
            owner.process.send_signal(signal.SIGCONT)
        await wait_until(
            lambda: "taken over by another consumer" in owner.output(), "the owner's late commit", 20
        )
        assert await exactly_once(redis, orders)  # the owner's commit was fenced out
        assert await redis.xpending(STREAM, "fulfillment_group") == {
            "pending": 0,
            "min": None,
            "max": None,
            "consumers": [],
        }


async def test_redis_killed_and_restarted_mid_batch(own_server: LocalRedis, scripts: Start) -> None:
    env = script_env(own_server.url, CLAIM_IDLE_MS="1000", BATCH_SIZE="50", SOCKET_TIMEOUT_MS="1000")
    redis = Redis.from_url(own_server.url)
    orders = sample_orders(2000)
    try:
        await initialize(redis, make_settings(own_server.url))
        await publish_many(redis, STREAM, orders)
        scripts("tests.tx_service", {**env, "CONSUMER_NAME": "c1"})
        await wait_until(lambda: _applied_over(redis, 200), "some commits")
        await redis.aclose()
        own_server.kill()  # AOF always: every confirmed commit survives
        own_server.start()
        redis = Redis.from_url(own_server.url)
        await wait_until(
            lambda: caught_up(redis, STREAM, ["fulfillment_group"]), "every order after the restart", 60
        )
        assert await exactly_once(redis, orders)
    finally:
        await redis.aclose()


async def _applied_over(redis: Redis, count: int) -> bool:
    return bool(await redis.hlen(EFFECTS) > count)


async def test_a_handler_with_one_argument_still_works(redis: Redis, settings: Settings) -> None:
    await initialize(redis, settings)
    seen: list[str] = []

    async def handle(order: Order) -> None:
        seen.append(order.order_id)

    orders = sample_orders(3)
    await publish_many(redis, STREAM, orders)
    async with running(redis, settings, ("email_group", "c", handle)):
        await wait_until(lambda: caught_up(redis, STREAM, ["email_group"]), "the orders")
    assert seen == [o.order_id for o in orders]


async def test_a_handler_whose_second_parameter_has_a_default_is_called_with_the_order_alone(
    redis: Redis, settings: Settings
) -> None:
    await initialize(redis, settings)
    seen: list[tuple[str, object]] = []

    async def handle(order: Order, note: object = "default") -> None:
        seen.append((order.order_id, note))

    order = sample_orders(1)[0]
    await publish_many(redis, STREAM, [order])
    async with running(redis, settings, ("email_group", "c", handle)):
        await wait_until(lambda: caught_up(redis, STREAM, ["email_group"]), "the order")
    assert seen == [(order.order_id, "default")]
