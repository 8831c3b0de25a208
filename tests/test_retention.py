"""Trimming and stale-consumer removal under forced conditions, against real redis-servers."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import make_settings, need_redis_server, run_script, script_env, wait_until
from redis.asyncio import Redis

from config import Settings
from core.capabilities import Capabilities, detect
from core.keys import keys_for
from core.replies import LARGEST_PART, entries_of, next_id
from maintenance import remove_stale_consumers, safe_trim_point, trim, trim_limit
from tools.local_redis import LocalRedis, start_local_redis

STREAM = "orders"
NODE = 10  # entries per stream node: Redis's default XTRIM ~ limit is then 100 x 10 = 1,000 entries


@pytest.fixture
def small_server() -> Iterator[LocalRedis]:
    need_redis_server()
    server = start_local_redis("--stream-node-max-entries", str(NODE))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def small(small_server: LocalRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(small_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def fill(redis: Redis, count: int, stream: str = STREAM) -> list[bytes]:
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            pipe.xadd(stream, {"data": f'{{"order_id": "ord-{n}"}}'})
        ids: list[bytes] = await pipe.execute()
    return ids


async def all_acked(redis: Redis, *groups: str) -> None:
    """Each group reads and acks everything in the stream (created at 0 if missing)."""
    for group in groups:
        await redis.xgroup_create(STREAM, group, id="0", mkstream=True)
        while entries := entries_of(await redis.xreadgroup(group, "c", {STREAM: ">"}, count=1000)):
            await redis.xack(STREAM, group, *[entry_id for entry_id, _ in entries])


async def xtrim_calls(redis: Redis) -> int:
    stats: Any = await redis.info("commandstats")
    return int(stats.get("cmdstat_xtrim", {}).get("calls", 0))


@pytest.mark.parametrize("path", ["without ACKED", "detected"])
async def test_one_pass_trims_everything_acked_in_bounded_calls(
    small: Redis, small_server: LocalRedis, path: str
) -> None:
    settings = make_settings(small_server.url)
    capabilities = Capabilities((7, 0, 15)) if path == "without ACKED" else await detect(small)
    total = 5000  # five times the default limit of one call
    await fill(small, total)
    await all_acked(small, *settings.groups)
    await small.config_resetstat()
    removed = await trim(small, settings, capabilities)
    left = await small.xlen(STREAM)
    assert left <= NODE  # at most about one node: what approximate trimming may keep
    assert removed == total - left
    assert await xtrim_calls(small) >= total // (100 * NODE)  # calls of bounded work, not one
    assert await trim(small, settings, capabilities) == 0  # nothing left to do


async def test_a_missing_configured_group_stops_all_trimming(
    small: Redis, small_server: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(small_server.url, CONSUMER_GROUPS="fulfillment_group,email_group,audit,billing")
    await fill(small, 500)
    await all_acked(small, "fulfillment_group", "email_group")
    with caplog.at_level(logging.WARNING, logger="maintenance"):
        assert await trim(small, settings, await detect(small)) == 0
    assert await small.xlen(STREAM) == 500
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per pass, naming every missing group
    assert "audit, billing" in warnings[0]
    assert await safe_trim_point(small, STREAM, settings.groups) is None
    await all_acked(small, "audit", "billing")
    assert await trim(small, settings, await detect(small)) >= 500 - NODE


async def test_an_unconfigured_group_still_holds_trimming_back(
    small: Redis, small_server: LocalRedis
) -> None:
    settings = make_settings(small_server.url)
    ids = await fill(small, 500)
    await all_acked(small, *settings.groups)
    await small.xgroup_create(STREAM, "legacy", id=ids[99])  # has yet to get entries[100:]
    await trim(small, settings, await detect(small))
    remaining: Any = await small.xrange(STREAM)
    assert [entry_id for entry_id, _ in remaining][-400:] == ids[100:]


def test_the_id_after_the_largest_sequence() -> None:
    assert next_id((5, 7)) == (5, 8)
    assert next_id((5, LARGEST_PART)) == (6, 0)
    assert next_id((LARGEST_PART, LARGEST_PART)) == (LARGEST_PART, LARGEST_PART)


async def test_maintenance_after_a_group_read_the_largest_sequence(
    redis: Redis, redis_url: str, settings: Settings
) -> None:
    for seq in (1, 2, LARGEST_PART):
        await redis.xadd(STREAM, {"data": b"{}"}, id=f"5-{seq}")
    await all_acked(redis, *settings.groups)
    assert await safe_trim_point(redis, STREAM, settings.groups) == (6, 0)
    result = run_script("maintenance", script_env(redis_url))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("trimmed ")
    # One group holds the entry at the largest sequence pending, the other acked it.
    await redis.xadd(STREAM, {"data": b"{}"}, id=f"6-{LARGEST_PART}")
    holder, done = settings.groups
    await redis.xreadgroup(holder, "c", {STREAM: ">"})
    await redis.xreadgroup(done, "c", {STREAM: ">"})
    await redis.xack(STREAM, done, f"6-{LARGEST_PART}")
    assert await safe_trim_point(redis, STREAM, settings.groups) == (6, LARGEST_PART)
    assert run_script("maintenance", script_env(redis_url)).returncode == 0
    assert await redis.xlen(STREAM) >= 1


async def idle_at_least(redis: Redis, group: str, ms: int) -> bool:
    return all(c["idle"] >= ms for c in await redis.xinfo_consumers(STREAM, group))


async def test_stale_consumer_removal_spares_consumers_with_a_lease(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dataclasses.replace(settings, stale_consumer_ms=1)
    group = settings.groups[1]
    await redis.xgroup_create(STREAM, group, id="0", mkstream=True)
    for name in ("running", "gone", "starting"):
        await redis.xgroup_createconsumer(STREAM, group, name)
    leases = keys_for(settings)
    await redis.set(leases.lease(group, "running"), 1, px=60_000)
    await wait_until(lambda: idle_at_least(redis, group, 5), "the consumers to be idle a little")

    listed = redis.xinfo_consumers

    async def lease_appears_after_listing(*args: Any, **kwargs: Any) -> Any:
        """'starting' takes its lease after the listing: the delete itself must see it."""
        consumers = await listed(*args, **kwargs)
        await redis.set(leases.lease(group, "starting"), 1, px=60_000)
        return consumers

    monkeypatch.setattr(redis, "xinfo_consumers", lease_appears_after_listing)
    removed = await remove_stale_consumers(redis, settings)
    assert removed == [f"{group}/gone"]
    names = sorted(c["name"] for c in await listed(STREAM, group))
    assert names == [b"running", b"starting"]
    await redis.delete(leases.lease(group, "running"))
    assert await remove_stale_consumers(redis, settings) == [f"{group}/running"]


async def test_one_pass_trims_everything_without_config_access(
    small: Redis, small_server: LocalRedis
) -> None:
    """A user refused CONFIG gets Redis's own bound per call, and the pass still trims everything."""
    await small.acl_setuser("trimmer", enabled=True, nopass=True, keys=["*"], commands=["+@all", "-config"])
    settings = make_settings(small_server.url.replace("//", "//trimmer@"))
    await fill(small, 3000)
    await all_acked(small, *settings.groups)
    trimmer = Redis.from_url(settings.redis_url)
    try:
        assert await trim_limit(trimmer) is None
        removed = await trim(trimmer, settings, await detect(trimmer))
    finally:
        await trimmer.aclose()
    assert removed >= 3000 - NODE
    assert await small.xlen(STREAM) <= NODE
