"""Retries that outlast a downstream outage, with real consumer processes: a handler that fails for
far longer than MAX_DELIVERIES retries would have lasted dead-letters nothing, burns no deliveries,
keeps its Redis calls and log lines bounded, and resumes by itself; a SIGKILL mid-outage loses and
doubles nothing."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Script, run_script, script_env, wait_until
from redis.asyncio import Redis
from test_promises import ran, registered

from config import Settings
from core.schedule import retry_wait_s, schedule_text
from producer import publish_many, sample_orders
from status import caught_up
from tools.local_redis import LocalRedis

Start = Callable[..., Script]
STREAM = "orders"
GROUP = "email_group"
# The old limit: three deliveries 100 ms apart, under half a second. The outages below last 4 s.
FAST = {"RETRY_DELAY_MS": "100", "RETRY_MAX_DELAY_MS": "400", "MAX_DELIVERIES": "3", "BATCH_SIZE": "10"}


async def _calls(redis: Redis) -> Counter[str]:
    stats: Any = await redis.info("commandstats")
    return Counter(
        {name: int(value["calls"]) for name, value in stats.items() if name.startswith("cmdstat_")}
    )


async def _reported_outage(redis: Redis, consumer: str, over: bool = False) -> bool:
    """What the consumer says of itself in Redis (status and the dashboard show it)."""
    raw = await redis.get(f"{{orders}}:state:{GROUP}:{consumer}")
    state = json.loads(raw) if raw else {}
    if over:
        return state.get("outage_s", 1) is None and state.get("waiting") == 0
    return bool(state.get("outage_s") is not None and state.get("waiting", 0) > 0)


def _gone(status: str) -> str:
    """The consumers `status` says are gone."""
    return " ".join(line.split()[1] for line in status.splitlines() if "gone (its lease lapsed)" in line)


async def _lag(redis: Redis) -> int:
    groups: Any = await redis.xinfo_groups(STREAM)
    return int(next(g for g in groups if g["name"] == GROUP.encode())["lag"] or 0)


async def test_an_outage_longer_than_every_retry_dead_letters_nothing(
    own_server: LocalRedis, scripts: Start, tmp_path: Path
) -> None:
    flag = tmp_path / "down"
    flag.touch()
    env = script_env(own_server.url, CONSUMER_NAME="e1", DOWN_FLAG=str(flag), CLAIM_IDLE_MS="2000", **FAST)
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        consumer = scripts("tests.flaky_service", env)
        await wait_until(lambda: registered(redis, GROUP, "e1"), "the consumer to start")
        orders = sample_orders(50)
        await publish_many(redis, STREAM, orders)
        await wait_until(lambda: "downstream outage?" in consumer.output(), "the outage to be noticed")
        await wait_until(lambda: _reported_outage(redis, "e1"), "the consumer to report the outage")
        before_calls, before_lines = await _calls(redis), len(consumer.output().splitlines())
        lag = await _lag(redis)
        await asyncio.sleep(4)  # the outage goes on: what the consumer does meanwhile is measured
        calls = await _calls(redis) - before_calls
        lines = consumer.output().splitlines()[before_lines:]
        assert calls.total() < 4 * 40, f"Redis calls in 4 s of outage: {calls}"
        assert lines == [], lines  # nothing said while it goes on: once when it began, once when it ends
        assert await _lag(redis) == lag > 0  # new orders wait in the stream rather than burn deliveries
        shown = run_script("status", env)
        assert "its downstream is down, for" in shown.stdout, shown.stdout
        assert "waiting for a retry:" in shown.stdout
        assert "retries: a failed order is retried after 0.1s, 0.4s" in shown.stdout
        flag.unlink()
        await wait_until(lambda: caught_up(redis, STREAM, [GROUP]), "every order handled after it", 30)
        assert ran([consumer.output()]) == Counter({o.order_id: 1 for o in orders})
        assert await redis.xlen("orders:dead-letter") == 0
        assert consumer.output().count("succeeded again") == 1
        assert consumer.output().count("downstream outage?") == 1
        await wait_until(lambda: _reported_outage(redis, "e1", over=True), "the consumer to report its end")
    finally:
        await redis.aclose()


async def test_a_consumer_killed_mid_outage_loses_and_doubles_nothing(
    own_server: LocalRedis, scripts: Start, tmp_path: Path
) -> None:
    """Its entries, waiting for their retry, are found by the living consumer with their delivery
    counts intact (never reset, never burnt by the outage), and each order runs once."""
    flag = tmp_path / "down"
    flag.touch()
    env = script_env(own_server.url, DOWN_FLAG=str(flag), CLAIM_IDLE_MS="1000", **FAST)
    redis = Redis.from_url(own_server.url)
    try:
        assert run_script("initialization_stream", env).returncode == 0
        first = scripts("tests.flaky_service", {**env, "CONSUMER_NAME": "e1"})
        await wait_until(lambda: registered(redis, GROUP, "e1"), "the consumer to start")
        orders = sample_orders(20)
        await publish_many(redis, STREAM, orders)
        await wait_until(lambda: "downstream outage?" in first.output(), "the outage to be noticed")
        held: Any = await redis.xpending_range(STREAM, GROUP, "-", "+", 100)
        counts = {row["message_id"]: row["times_delivered"] for row in held}
        assert counts
        assert max(counts.values()) <= 3
        first.kill()
        await wait_until(
            lambda: "e1" in _gone(run_script("status", env).stdout), "status to say e1 is gone", 15
        )
        flag.unlink()
        second = scripts("tests.flaky_service", {**env, "CONSUMER_NAME": "e2"})
        await wait_until(lambda: caught_up(redis, STREAM, [GROUP]), "the living consumer to finish", 30)
        assert ran([first.output(), second.output()]) == Counter({o.order_id: 1 for o in orders})
        assert await redis.xlen("orders:dead-letter") == 0
    finally:
        await redis.aclose()


def test_the_default_schedule_rides_out_a_ten_minute_outage_before_dead_lettering() -> None:
    """With the defaults, an order failing alone (too few failures in a row to count as an outage)
    is dead-lettered only after its retries' waits add up to more than ten minutes."""
    defaults = Settings.from_env({})
    waits = [retry_wait_s(defaults, failure) for failure in range(1, defaults.max_deliveries)]
    assert sum(waits) > 600
    assert waits[0] <= 1  # a passing glitch is retried at once
    assert "11.8m in all" in schedule_text(defaults)
