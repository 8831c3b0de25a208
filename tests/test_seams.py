"""Promises that broke where two mechanisms meet, each condition forced here: a very wide entry, a
staged write too large to commit, a full Redis, a handler holding the GIL, many dead letters on
Redis 8.4+, two processes with one name, a cluster whose every node restarts, multi-key writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Script, run_script, script_env, wait_until
from redis.asyncio import Redis
from test_pipeline import Recorder, dead_letters, running
from test_promises import holds, ran, registered

from config import Settings
from initialization_stream import initialize
from orders import Order
from producer import PublishError, publish_many, sample_orders
from status import caught_up
from tools.local_redis import LocalRedis
from tx import CrossSlotWrite, Tx, UncommittableWrite

STREAM = "orders"
Start = Callable[..., Script]


# --- 1. an entry too wide to copy whole ---------------------------------------------------


async def test_a_wide_entry_without_data_is_dead_lettered_at_once_and_the_group_goes_on(
    redis: Redis, settings: Settings
) -> None:
    """5,000 fields and no `data` between valid orders: one dead letter, every order handled once."""
    await initialize(redis, settings)
    before, after = sample_orders(30), sample_orders(30)
    await publish_many(redis, STREAM, before)
    wide = await redis.xadd(STREAM, {f"field{n}": "x" * 8 for n in range(5000)})
    await publish_many(redis, STREAM, after)
    recorder = Recorder()
    group = settings.email_group
    async with running(redis, settings, (group, "c", recorder.handler("c"))):
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "the group past the wide entry", 30)
    assert Counter(recorder.order_ids()) == Counter(o.order_id for o in before + after)
    letters = await dead_letters(redis, settings)
    assert [letter["source_id"] for letter in letters] == [wide.decode() if isinstance(wide, bytes) else wide]
    assert "no 'data' field" in letters[0]["error"]
    assert letters[0]["deliveries"] == "1"  # dead-lettered the first time it was seen
    assert "5,000 fields" in letters[0]["truncated"]
    pending: Any = await redis.xpending(STREAM, group)
    assert pending["pending"] == 0


# --- 2. a staged write too large to commit in one step ----------------------------------------


async def test_a_staged_write_too_large_to_commit_is_refused_where_it_is_staged(
    redis: Redis, settings: Settings
) -> None:
    """One order of 60 stages an SADD of 9,000 members: that order is dead-lettered with none of
    its writes; every other order's writes apply exactly once and nothing wedges."""
    await initialize(redis, settings)
    orders = sample_orders(60)
    big = orders[17]

    async def handle(order: Order, tx: Tx) -> None:
        tx.hincrby(tx.key("effects"), order.order_id, 1)
        if order.order_id == big.order_id:
            tx.call("SADD", tx.key("members"), *(f"m{n}" for n in range(9000)))

    await publish_many(redis, STREAM, orders)
    group = settings.fulfillment_group
    async with running(redis, settings, (group, "c", handle)):
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "every order settled", 30)
    effects = await redis.hgetall("{orders}:effects")
    assert effects == {o.order_id.encode(): b"1" for o in orders if o is not big}
    assert not await redis.exists("{orders}:members")
    letters = await dead_letters(redis, settings)
    assert len(letters) == 1
    assert "SADD with 9,002 arguments" in letters[0]["error"]
    assert "split it" in letters[0]["error"]


def test_every_key_of_a_staged_write_is_checked_against_the_slot() -> None:
    tx = Tx("orders")
    inside, outside = tx.key("a"), "b"
    for command, args in [
        ("SMOVE", (inside, outside, "member")),
        ("RENAME", (inside, outside)),
        ("LMOVE", (inside, outside, "LEFT", "RIGHT")),
        ("MSET", (inside, "1", outside, "2")),
        ("DEL", (inside, inside, outside)),
        ("ZUNIONSTORE", (inside, 2, inside, outside)),
    ]:
        with pytest.raises(CrossSlotWrite, match="'b'"):
            tx.call(command, *args)
    tx.call("SMOVE", inside, tx.key("b"), "member")
    tx.call("MSET", inside, "1", tx.key("b"), "2")
    assert len(tx.commands) == 2
    with pytest.raises(UncommittableWrite, match="does not know where EVAL's keys are"):
        tx.call("EVAL", "return 1", 0)


# --- 3. a full Redis ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("paused", [True, False], ids=["paused-during-the-fill", "started-after-it"])
async def test_a_full_redis_drains_and_frees_itself(
    own_server: LocalRedis, scripts: Start, paused: bool
) -> None:
    """maxmemory reached with noeviction: the producer is refused, the consumers still ack and
    trim, so Redis frees itself and takes new orders again."""
    env = script_env(own_server.url, BATCH_SIZE="200", MAINTENANCE_INTERVAL_MS="300")
    redis = Redis.from_url(own_server.url)
    services: list[Script] = []

    def start() -> None:
        services.append(scripts("consumer2", {**env, "CONSUMER_NAME": "e1"}))
        services.append(scripts("tests.slow_service", {**env, "CONSUMER_NAME": "f1"}))

    try:
        assert run_script("initialization_stream", env).returncode == 0
        if paused:
            start()
            for group, name in (("email_group", "e1"), ("fulfillment_group", "f1")):
                await wait_until(lambda g=group, n=name: registered(redis, g, n), f"{name} to start")  # type: ignore[misc]
            for service in services:
                service.process.send_signal(signal.SIGSTOP)
        await redis.config_set("maxmemory-policy", "noeviction")
        used = (await redis.info("memory"))["used_memory"]
        await redis.config_set("maxmemory", used + 3_000_000)
        published = await _fill(redis)
        assert published > 1000
        if paused:
            for service in services:
                service.process.send_signal(signal.SIGCONT)
        else:
            start()
        await wait_until(
            lambda: caught_up(redis, STREAM, ["email_group", "fulfillment_group"]), "both groups drained", 90
        )
        await wait_until(lambda: _length_below(redis, published // 10), "the acked entries trimmed", 30)
        await publish_many(redis, STREAM, sample_orders(100))  # taken again: Redis freed itself
        assert all(service.process.poll() is None for service in services)
    finally:
        for service in services:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGCONT)
        await redis.aclose()


async def _fill(redis: Redis) -> int:
    """Publish until Redis refuses for want of memory; how many orders it took."""
    published = 0
    for _ in range(200):
        try:
            published += len(await publish_many(redis, STREAM, sample_orders(500)))
        except PublishError as error:
            if "OutOfMemoryError" not in str(error):
                raise
            return published + error.published
    pytest.fail("Redis never filled up")


async def _length_below(redis: Redis, limit: int) -> bool:
    return int(await redis.xlen(STREAM)) < limit


# --- 4. a handler that holds the GIL -----------------------------------------------------------


@pytest.mark.slow
async def test_a_handler_holding_the_gil_keeps_its_lease(own_server: LocalRedis, scripts: Start) -> None:
    """One C call holds the GIL for 4 s, four times CLAIM_IDLE_MS, a second consumer waiting: the
    lease is kept by a process of its own, so the order runs once and is not dead-lettered."""
    env = script_env(own_server.url, CLAIM_IDLE_MS="1000", MAX_DELIVERIES="2")
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        owner = scripts("tests.gil_service", {**env, "CONSUMER_NAME": "owner", "HOLD_GIL_S": "4"})
        await wait_until(lambda: registered(redis, "fulfillment_group", "owner"), "the owner to start")
        orders = sample_orders(2)
        await publish_many(redis, STREAM, orders)
        await wait_until(lambda: holds(redis, "fulfillment_group", "owner", 2), "the owner to take both")
        other = scripts("tests.gil_service", {**env, "CONSUMER_NAME": "other", "HOLD_GIL_S": "0"})
        await wait_until(lambda: caught_up(redis, STREAM, ["fulfillment_group"]), "both orders acked", 40)
        assert ran([owner.output(), other.output()]) == Counter({o.order_id: 1 for o in orders})
        assert "ran order" not in other.output()
        assert await redis.xlen("orders:dead-letter") == 0
    finally:
        await redis.aclose()


# --- 5. dead letters on Redis 8.4+ do not make the lease's work grow ----------------------------


@pytest.mark.slow
async def test_a_consumers_background_work_does_not_grow_with_its_dead_letters(
    own_server: LocalRedis, scripts: Start
) -> None:
    """2,000 dead letters, then idle: the lease's touch (8.4+) costs Redis about one XPENDING per
    refresh, not one per entry ever dead-lettered (on 7.x there is no touch: the bound holds too)."""
    env = script_env(own_server.url, CLAIM_IDLE_MS="300", BATCH_SIZE="500")
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        pipe = redis.pipeline(transaction=False)
        for n in range(2000):
            pipe.xadd(STREAM, {"data": f'{{"order_id": "bad-{n}"'})
        await pipe.execute()
        scripts("consumer2", {**env, "CONSUMER_NAME": "e1"})
        await wait_until(lambda: caught_up(redis, STREAM, ["email_group"]), "every entry dead-lettered", 30)
        assert await redis.xlen("orders:dead-letter") == 2000
        before = await _calls(redis)
        await asyncio.sleep(1.5)  # the measured window: about 15 refreshes of a 300 ms lease
        after = await _calls(redis)
        assert after["xpending"] - before["xpending"] < 100, (before, after)
        assert after["xclaim"] - before["xclaim"] < 100, (before, after)
    finally:
        await redis.aclose()


async def _calls(redis: Redis) -> dict[str, int]:
    stats: Any = await redis.info("commandstats")
    return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("xpending", "xclaim")}


# --- 6. one consumer name, two processes ----------------------------------------------------------


@pytest.mark.slow
async def test_a_second_process_with_a_name_in_use_stops_and_the_first_runs_each_order_once(
    own_server: LocalRedis, scripts: Start
) -> None:
    env = script_env(own_server.url, CLAIM_IDLE_MS="1000", CONSUMER_NAME="pod-a")
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        first = scripts("tests.slow_service", env)
        await wait_until(lambda: registered(redis, "fulfillment_group", "pod-a"), "the first to start")
        second = scripts("tests.slow_service", env)
        assert second.wait(20) == 2
        lines = [line for line in second.output().splitlines() if "error" in line.lower()]
        assert len(lines) == 1
        assert "CONSUMER_NAME 'pod-a' is in use by another running process" in lines[0]
        assert "Traceback" not in second.output()
        orders = sample_orders(100)
        await publish_many(redis, STREAM, orders)
        await wait_until(lambda: caught_up(redis, STREAM, ["fulfillment_group"]), "every order acked", 30)
        assert ran([first.output(), second.output()]) == Counter({o.order_id: 1 for o in orders})
        assert first.process.poll() is None
    finally:
        await redis.aclose()


@pytest.mark.slow
async def test_a_restart_with_the_same_name_takes_over_what_the_killed_process_held(
    own_server: LocalRedis, scripts: Start
) -> None:
    """A stable name (a pod's): the process killed holding orders, a new one with its name takes
    the lease once it lapsed and finishes them from its own pending entries."""
    env = script_env(own_server.url, CLAIM_IDLE_MS="1000", CONSUMER_NAME="pod-a")
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        first = scripts("tests.slow_service", {**env, "HANDLER_MS": "60000"})
        await wait_until(lambda: registered(redis, "fulfillment_group", "pod-a"), "the first to start")
        orders = sample_orders(5)
        await publish_many(redis, STREAM, orders)
        await wait_until(lambda: holds(redis, "fulfillment_group", "pod-a", 5), "the first to take them")
        first.kill()
        again = scripts("tests.slow_service", env)
        await wait_until(lambda: caught_up(redis, STREAM, ["fulfillment_group"]), "the orders finished", 30)
        assert ran([again.output()]) == Counter({o.order_id: 1 for o in orders})
        assert again.process.poll() is None
    finally:
        await redis.aclose()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_the_lease_keeper_ends_with_its_consumer(own_server: LocalRedis, scripts: Start) -> None:
    """SIGKILL the consumer: its keeper process notices and ends (it never outlives its parent)."""
    env = script_env(own_server.url, CLAIM_IDLE_MS="600", CONSUMER_NAME="k1")
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        consumer = scripts("consumer2", env)
        await wait_until(lambda: _keeper_of(consumer.process.pid) is not None, "the keeper to start")
        keeper = _keeper_of(consumer.process.pid)
        assert keeper is not None
        consumer.kill()
        await wait_until(lambda: not _pid_alive(keeper), "the keeper to end", 10)
    finally:
        await redis.aclose()


def _keeper_of(parent: int) -> int | None:
    """The pid of the `python -m core.lease` child of `parent`, if it runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"core.lease" in command:
            return int(entry.name)
    return None


# --- the lease's touch (8.4+) and an ack a failover undid ------------------------------------


async def test_an_ack_undone_behind_the_consumers_back_is_found_and_settled(
    redis: Redis, settings: Settings
) -> None:
    """An entry pending on a live consumer that it does not know it holds (a failover undid its
    ack: the old master confirmed it, the replica never had it) is read again and acked, though
    its lease keeps it from ever looking idle on Redis 8.4+."""
    settings = dataclasses.replace(settings, claim_idle_ms=1000)
    await initialize(redis, settings)
    orders = sample_orders(3)
    ids = await publish_many(redis, STREAM, orders)
    recorder = Recorder()
    group = settings.email_group
    async with running(redis, settings, (group, "c", recorder.handler("c"))):
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "the orders acked")
        await redis.xclaim(STREAM, group, "c", 0, [ids[1]], force=True)  # pending on c again
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "the undone ack found and made again")
    assert Counter(recorder.order_ids())[orders[1].order_id] == 2  # at least once: it ran again
