"""Promises that broke under adversarial tests, each forced here: late groups, slow owners, copies, skew."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Script, run_script, script_env, wait_until
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from test_pipeline import Recorder, dead_letters, running

from config import Settings
from core.keys import keys_for
from initialization_stream import initialize
from orders import Order, serialize
from producer import publish_many, sample_orders
from status import caught_up
from stream_consumer import StreamConsumer
from tools.local_redis import LocalRedis

STREAM = "orders"
Start = Callable[..., Script]
RAN = re.compile(r"ran order (\S+)")
FULFILLED = re.compile(r"fulfilling order (\S+):")
EMAILED = re.compile(r"sending confirmation e-mail for order (\S+)$", re.M)


def ran(outputs: list[str], pattern: re.Pattern[str] = RAN) -> Counter[str]:
    """How many times each order's handler ran, from the processes' log lines."""
    return Counter(order_id for output in outputs for order_id in pattern.findall(output))


async def holds(redis: Redis, group: str, consumer: str, count: int) -> bool:
    """True when `consumer` has exactly `count` entries pending."""
    rows = await redis.xpending_range(STREAM, group, "-", "+", 1000, consumername=consumer)
    return len(rows) == count


async def held_over(redis: Redis, group: str, ms: int) -> bool:
    """True when the group's oldest pending entry was appended more than `ms` ago (by Redis's clock).

    Not its idle time: on Redis 8.4+ a live owner keeps that near 0 (reads claim by idle time).
    """
    rows: Any = await redis.xpending_range(STREAM, group, "-", "+", 1)
    if not rows:
        return False
    seconds, micros = await redis.time()
    appended_ms = int(rows[0]["message_id"].split(b"-")[0])
    return seconds * 1000 + micros // 1000 - appended_ms > ms


async def gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def registered(redis: Redis, group: str, consumer: str) -> bool:
    """True once `consumer` has read from `group` (it shows in XINFO CONSUMERS)."""
    try:
        consumers = await redis.xinfo_consumers(STREAM, group)
    except ResponseError:  # no stream or group yet
        return False
    return any(c["name"] == consumer.encode() for c in consumers)


# --- 1. late or missing groups ------------------------------------------------------


async def test_a_service_started_late_gets_every_order(
    own_server: LocalRedis, scripts: Start, tmp_path: Path
) -> None:
    """No initialization_stream: consumer1 alone, its orders acked and trimmed, then consumer2 starts."""
    env = script_env(own_server.url, MAINTENANCE_INTERVAL_MS="100")
    redis = Redis.from_url(own_server.url)
    try:
        fulfillment = scripts("consumer1", {**env, "CONSUMER_NAME": "f1"})
        await wait_until(lambda: redis.exists(STREAM), "consumer1 to create the stream and groups")
        orders = sample_orders(600)
        await publish_many(redis, STREAM, orders)
        await wait_until(lambda: caught_up(redis, STREAM, ["fulfillment_group"]), "fulfillment", 30)
        assert run_script("maintenance", env).returncode == 0  # a pass on top of consumer1's own
        assert await redis.xlen(STREAM) == 600  # the email group has not read them: nothing trimmed
        email = scripts("consumer2", {**env, "CONSUMER_NAME": "e1"})
        await wait_until(lambda: caught_up(redis, STREAM, ["email_group"]), "the late email service", 30)
        assert set(ran([email.output()], EMAILED)) == {o.order_id for o in orders}
        assert fulfillment.process.poll() is None
    finally:
        await redis.aclose()


async def test_a_flush_while_a_service_is_down_loses_it_nothing(
    own_server: LocalRedis, scripts: Start
) -> None:
    env = script_env(own_server.url, MAINTENANCE_INTERVAL_MS="100")
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        scripts("consumer1", {**env, "CONSUMER_NAME": "f1"})
        await wait_until(lambda: holds(redis, "fulfillment_group", "f1", 0), "consumer1 to start")
        await redis.flushall()  # the email service is down meanwhile
        orders = sample_orders(300)
        await publish_many(redis, STREAM, orders)
        await wait_until(lambda: caught_up(redis, STREAM, ["fulfillment_group"]), "fulfillment", 30)
        assert run_script("maintenance", env).returncode == 0
        email = scripts("consumer2", {**env, "CONSUMER_NAME": "e1"})
        await wait_until(lambda: caught_up(redis, STREAM, ["email_group"]), "the email service", 30)
        assert set(ran([email.output()], EMAILED)) == {o.order_id for o in orders}
    finally:
        await redis.aclose()


# --- 3. stale means gone ----------------------------------------------------------------


async def test_an_idle_running_consumer_is_not_removed_as_stale(
    own_server: LocalRedis, scripts: Start
) -> None:
    env = script_env(own_server.url, CLAIM_IDLE_MS="500", MAINTENANCE_INTERVAL_MS="0")
    redis = Redis.from_url(own_server.url)
    lease = keys_for(Settings.from_env(env)).lease("email_group", "idle-1")
    try:
        consumer = scripts("consumer2", {**env, "CONSUMER_NAME": "idle-1"})
        await wait_until(lambda: registered(redis, "email_group", "idle-1"), "the consumer to start")
        # STALE_CONSUMER_MS=1: idle time alone would condemn it (a blocked read on 7.0 never resets it).
        result = run_script("maintenance", {**env, "STALE_CONSUMER_MS": "1"})
        assert result.returncode == 0, result.stderr
        names = [c["name"] for c in await redis.xinfo_consumers(STREAM, "email_group")]
        assert names == [b"idle-1"]
        consumer.kill()  # SIGKILL: its lease lapses within CLAIM_IDLE_MS
        await wait_until(lambda: gone(redis, lease), "the lease to lapse")
        assert run_script("maintenance", {**env, "STALE_CONSUMER_MS": "1"}).returncode == 0
        assert await redis.xinfo_consumers(STREAM, "email_group") == []
    finally:
        await redis.aclose()


# --- 4, 5, 7. a live owner keeps its work ----------------------------------------------------


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking-handler", "async-handler"])
async def test_a_batch_slower_than_the_claim_time_runs_once(
    own_server: LocalRedis, scripts: Start, blocking: bool
) -> None:
    """Ten orders of 150 ms each with CLAIM_IDLE_MS=300: a second consumer waits, never re-runs them."""
    env = script_env(own_server.url, CLAIM_IDLE_MS="300", BATCH_SIZE="10", HANDLER_MS="150")
    env["HANDLER_BLOCKING"] = "1" if blocking else "0"
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        owner = scripts("tests.slow_service", {**env, "CONSUMER_NAME": "owner"})
        await wait_until(lambda: registered(redis, "fulfillment_group", "owner"), "the owner to start")
        orders = sample_orders(10)
        await publish_many(redis, STREAM, orders)
        await wait_until(
            lambda: holds(redis, "fulfillment_group", "owner", 10), "the owner to take the batch"
        )
        claimer = scripts("tests.slow_service", {**env, "CONSUMER_NAME": "claimer", "HANDLER_MS": "0"})
        await wait_until(lambda: caught_up(redis, STREAM, ["fulfillment_group"]), "the batch to be acked", 30)
        assert ran([owner.output(), claimer.output()]) == Counter({o.order_id: 1 for o in orders})
        assert "ran order" not in claimer.output()
    finally:
        await redis.aclose()


async def test_a_consumer_never_runs_an_entry_left_to_its_live_owner(
    redis: Redis, settings: Settings
) -> None:
    """The claimer's own-pending re-read (after a failure of its own) must not run the owner's entry."""
    settings = dataclasses.replace(settings, claim_idle_ms=100)
    group = settings.fulfillment_group
    await initialize(redis, settings)
    runs: list[tuple[str, str]] = []
    started, release = asyncio.Event(), asyncio.Event()
    failed_once: set[str] = set()

    async def slow(order: Order) -> None:
        runs.append(("owner", order.order_id))
        started.set()
        await release.wait()

    async def flaky(order: Order) -> None:
        runs.append(("claimer", order.order_id))
        if order.order_id not in failed_once:
            failed_once.add(order.order_id)
            raise RuntimeError("first try fails")

    first, second = sample_orders(2)
    await publish_many(redis, STREAM, [first])
    async with running(redis, settings, (group, "owner", slow)):
        async with asyncio.timeout(10):
            await started.wait()
        claimer = StreamConsumer(redis, settings, group, "claimer", flaky)
        claiming = asyncio.create_task(claimer.run())
        await wait_until(
            lambda: held_over(redis, group, 400), "the owner to hold its entry past the claim time"
        )
        await publish_many(redis, STREAM, [second])
        await wait_until(lambda: ("claimer", second.order_id) in runs[-1:], "the claimer's retry")
        await wait_until(lambda: claimer.stats.processed == 1, "the claimer's retry to succeed")
        release.set()
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "both orders acked")
        claimer.stop.set()
        await claiming
    assert [who for who, order_id in runs if order_id == first.order_id] == ["owner"]
    assert claimer.stats.reclaimed == 0


async def test_a_batch_read_ahead_stays_with_its_live_owner(redis: Redis, settings: Settings) -> None:
    """The batch read while the one before it waits past CLAIM_IDLE_MS is not claimed from its owner.

    Batches of five: the owner runs the first, reads the second with its commit, then sends
    the read of the third and blocks in the second's first handler. The third is then pending
    on the owner, unhandled and idle past the claim time, a second consumer there: the owner's
    lease keeps it (from 8.4, where reads claim idle entries, the lease's keeper also keeps
    every entry the owner holds fresh).
    """
    settings = dataclasses.replace(settings, claim_idle_ms=1000, batch_size=5)
    group = settings.fulfillment_group
    await initialize(redis, settings)
    orders = sample_orders(15)
    runs: list[tuple[str, str]] = []
    started, release = asyncio.Event(), asyncio.Event()

    async def owner(order: Order) -> None:
        runs.append(("owner", order.order_id))
        if order.order_id == orders[5].order_id:
            started.set()
            await release.wait()

    async def claimer(order: Order) -> None:
        runs.append(("claimer", order.order_id))

    await publish_many(redis, STREAM, orders)
    async with running(redis, settings, (group, "owner", owner)):
        async with asyncio.timeout(10):
            await started.wait()
        held = 10
        await wait_until(lambda: holds(redis, group, "owner", held), f"the owner to hold {held} entries")
        async with running(redis, settings, (group, "claimer", claimer)):
            await wait_until(lambda: held_over(redis, group, 2500), "claim passes over the idle entries")
            assert await holds(redis, group, "owner", held)
            release.set()
            await wait_until(lambda: caught_up(redis, STREAM, [group]), "every order acked")
    assert Counter(order_id for _, order_id in runs) == Counter({o.order_id: 1 for o in orders})
    assert {who for who, _ in runs} == {"owner"}


async def test_live_slow_work_is_not_dead_lettered(redis: Redis, settings: Settings) -> None:
    """MAX_DELIVERIES=1: claims of a live owner's entry must not count as deliveries."""
    settings = dataclasses.replace(settings, claim_idle_ms=100, max_deliveries=1)
    group = settings.fulfillment_group
    await initialize(redis, settings)
    started, release = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    async def slow(order: Order) -> None:
        runs.append("owner")
        started.set()
        await release.wait()

    async def quick(order: Order) -> None:
        runs.append("claimer")

    await publish_many(redis, STREAM, sample_orders(1))
    async with running(redis, settings, (group, "owner", slow)):
        async with asyncio.timeout(10):
            await started.wait()
        async with running(redis, settings, (group, "claimer", quick)):
            await wait_until(lambda: held_over(redis, group, 600), "several claim passes over the live entry")
            release.set()
            await wait_until(lambda: caught_up(redis, STREAM, [group]), "the owner to commit")
    assert runs == ["owner"]
    assert await dead_letters(redis, settings) == []


# --- 6. concurrent copies ------------------------------------------------------------------


async def test_two_copies_delivered_to_two_waiting_consumers_run_once(
    redis: Redis, settings: Settings
) -> None:
    """Each order appended twice; the second copy reaches the other consumer while the first still runs."""
    group = settings.email_group
    await initialize(redis, settings)
    runs: list[str] = []
    gate = asyncio.Event()

    def handler(name: str) -> Any:
        async def handle(order: Order) -> None:
            runs.append(order.order_id)
            await gate.wait()  # still running when the copy is delivered

        return handle

    async with running(redis, settings, (group, "a", handler("a")), (group, "b", handler("b"))):
        for order in sample_orders(20):
            gate.clear()
            await redis.xadd(STREAM, {"data": serialize(order)})
            await wait_until(lambda: len(runs) and runs[-1] == order.order_id, "the first copy to run")  # noqa: B023
            copy_id = await redis.xadd(STREAM, {"data": serialize(order)})
            assert isinstance(copy_id, bytes)
            await wait_until(
                lambda: _delivered(redis, group, copy_id),  # noqa: B023
                "the copy to reach the other consumer",
            )
            gate.set()
            await wait_until(lambda: caught_up(redis, STREAM, [group]), "both copies settled")
    assert Counter(runs) == Counter(dict.fromkeys(set(runs), 1))
    assert len(set(runs)) == 20


async def _delivered(redis: Redis, group: str, entry_id: bytes) -> bool:
    infos = {g["name"]: g for g in await redis.xinfo_groups(STREAM)}
    return bool(infos[group.encode()]["last-delivered-id"] == entry_id)


# --- 8. the server's clock ----------------------------------------------------------------


async def test_consumer_clock_skew_does_not_break_the_dedupe_window(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = settings.fulfillment_group
    await initialize(redis, settings)
    recorder = Recorder()
    real_time = time.time

    async def consume_all(name: str, skew_s: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real_time() + skew_s)
        try:
            async with running(redis, settings, (group, name, recorder.handler(name))):
                await wait_until(lambda: caught_up(redis, STREAM, [group]), f"{name} to catch up")
        finally:
            monkeypatch.setattr(time, "time", real_time)

    early, late, behind = sample_orders(3)
    await redis.xadd(STREAM, {"data": serialize(early)})
    await consume_all("on-time", 0)
    await redis.xadd(STREAM, {"data": serialize(late)})
    await consume_all("two-hours-ahead", 7200)  # its commit must not expire the others' marks
    await redis.xadd(STREAM, {"data": serialize(behind)})
    await consume_all("two-hours-behind", -7200)  # its marks must not look expired to the others
    for order in (early, late, behind):
        await redis.xadd(STREAM, {"data": serialize(order)})  # a copy of each, from another client
    await consume_all("on-time", 0)
    assert Counter(recorder.order_ids()) == Counter({early.order_id: 1, late.order_id: 1, behind.order_id: 1})


# --- 14. foreign redrive_for values --------------------------------------------------------


@pytest.mark.parametrize("value", ["", "nosuch_group"])
async def test_a_foreign_redrive_for_is_dead_lettered_not_dropped(
    redis: Redis, settings: Settings, value: str
) -> None:
    await initialize(redis, settings)
    order = sample_orders(1)[0]
    await redis.xadd(STREAM, {"data": serialize(order), "redrive_for": value})
    recorder = Recorder()
    groups = list(settings.groups)
    async with running(redis, settings, *[(g, g, recorder.handler(g)) for g in groups]):
        await wait_until(lambda: caught_up(redis, STREAM, groups), "both groups")
    letters = await dead_letters(redis, settings)
    assert sorted(letter["group"] for letter in letters) == sorted(groups)
    assert all("redrive_for" in letter["error"] for letter in letters)
    assert recorder.handled == []


# --- adding and retiring a service --------------------------------------------------------


async def test_a_third_service_by_configuration_and_its_retirement(
    own_server: LocalRedis, scripts: Start
) -> None:
    three = "fulfillment_group,email_group,shipping_group"
    env = script_env(own_server.url, CONSUMER_GROUPS=three, MAINTENANCE_INTERVAL_MS="0")
    redis = Redis.from_url(own_server.url)
    try:
        result = run_script("initialization_stream", env)
        assert result.returncode == 0, result.stderr
        assert "group shipping_group: created" in result.stdout
        early = sample_orders(50)
        await publish_many(redis, STREAM, early)
        shipping = scripts(
            "tests.slow_service", {**env, "SERVICE_GROUP": "shipping_group", "CONSUMER_NAME": "s1"}
        )
        scripts("consumer1", {**env, "CONSUMER_NAME": "f1"})
        scripts("consumer2", {**env, "CONSUMER_NAME": "e1"})
        groups = three.split(",")
        await wait_until(lambda: caught_up(redis, STREAM, groups), "all three services", 30)
        assert set(ran([shipping.output()])) == {o.order_id for o in early}
        shipping.kill()
        late = sample_orders(50)
        await publish_many(redis, STREAM, late)
        await wait_until(lambda: caught_up(redis, STREAM, groups[:2]), "the other two", 30)
        assert run_script("maintenance", env).returncode == 0
        assert await redis.xlen(STREAM) >= 50  # the stopped shipping service still needs them
        # A configured group cannot be retired; one removed from CONSUMER_GROUPS can.
        refused = run_script("initialization_stream", env, "--retire", "shipping_group")
        assert refused.returncode == 2
        assert "still in CONSUMER_GROUPS" in refused.stderr
        two = script_env(own_server.url, CONSUMER_GROUPS="fulfillment_group,email_group")
        retired = run_script("initialization_stream", two, "--retire", "shipping_group")
        assert retired.returncode == 0, retired.stderr
        assert run_script("maintenance", two).returncode == 0
        assert await redis.xlen(STREAM) < 50  # nothing holds trimming back now
    finally:
        await redis.aclose()


async def test_a_new_group_can_start_with_new_orders_only(redis: Redis, redis_url: str) -> None:
    await publish_many(redis, STREAM, sample_orders(5))
    env = script_env(redis_url, CONSUMER_GROUPS="fulfillment_group,email_group,audit_group")
    result = run_script("initialization_stream", env, "--start", "new")
    assert result.returncode == 0, result.stderr
    groups = {g["name"]: g for g in await redis.xinfo_groups(STREAM)}
    last = (await redis.xinfo_stream(STREAM))["last-generated-id"]
    assert groups[b"audit_group"]["last-delivered-id"] == last


def test_a_service_whose_group_is_not_configured_stops_with_one_line(redis_url: str) -> None:
    env = script_env(redis_url, SERVICE_GROUP="unlisted_group")
    result = run_script("tests.slow_service", env)
    assert result.returncode == 2
    assert "unlisted_group is not in CONSUMER_GROUPS" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_copy_is_reported_after_its_order_ran(
    redis: Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Two copies in one batch: the log says the order ran before it says the copy was skipped."""
    await initialize(redis, settings)
    order = sample_orders(1)[0]
    for _ in range(2):
        await redis.xadd(STREAM, {"data": serialize(order)})
    caplog.set_level("INFO")
    log = logging.getLogger("test_handler")

    async def handle(order: Order) -> None:
        log.info("ran order %s", order.order_id)

    group = settings.email_group
    async with running(redis, settings, (group, "c", handle)):
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "both copies")
    lines = [record.getMessage() for record in caplog.records]
    ran_at = lines.index(f"ran order {order.order_id}")
    skipped_at = next(i for i, line in enumerate(lines) if "acked, not run again" in line)
    assert ran_at < skipped_at


async def test_a_typo_in_a_group_name_replays_nothing(own_server: LocalRedis, scripts: Start) -> None:
    """EMAIL_GROUP=emial_group on a stream in use: the service stops with one line saying how to
    create the group, instead of creating it from 0 and sending every retained order's e-mail
    again; a peer configured with it starts and leaves it alone; created with --start new, the
    service handles new orders only."""
    env = script_env(own_server.url, MAINTENANCE_INTERVAL_MS="0")
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        history = sample_orders(20)
        await publish_many(redis, STREAM, history)
        scripts("consumer2", {**env, "CONSUMER_NAME": "e1"})
        await wait_until(lambda: caught_up(redis, STREAM, ["email_group"]), "the e-mails of the history")
        typo = {**env, "EMAIL_GROUP": "emial_group", "CONSUMER_NAME": "e2"}
        stopped = run_script("consumer2", typo)
        assert stopped.returncode == 2
        errors = [line for line in stopped.stderr.splitlines() if "error" in line]
        assert len(errors) == 1
        assert "group emial_group does not exist on stream orders" in errors[0]
        assert "20 entries" in errors[0]
        assert "--start new" in errors[0]
        assert "sending confirmation" not in stopped.stderr
        peer = scripts("consumer1", {**typo, "CONSUMER_NAME": "f1"})  # CONSUMER_GROUPS names emial_group too
        await wait_until(lambda: caught_up(redis, STREAM, ["fulfillment_group"]), "the peer to run")
        await wait_until(lambda: "emial_group are missing" in peer.output(), "the peer's warning")
        assert b"emial_group" not in {g["name"] for g in await redis.xinfo_groups(STREAM)}
        created = run_script("initialization_stream", typo, "--start", "new")
        assert created.returncode == 0, created.stderr
        refused = run_script("initialization_stream", {**env, "CONSUMER_GROUPS": "email_group,audit_group"})
        assert refused.returncode == 2
        assert "audit_group does not exist" in refused.stderr
        service = scripts("consumer2", typo)
        await wait_until(lambda: registered(redis, "emial_group", "e2"), "the service to start")
        later = sample_orders(3)
        await publish_many(redis, STREAM, later)
        await wait_until(lambda: caught_up(redis, STREAM, ["emial_group"]), "the new orders")
        assert set(ran([service.output()], EMAILED)) == {o.order_id for o in later}
    finally:
        await redis.aclose()
