"""Housekeeping that never loses an order: lossless trimming and removal of stale consumers.

Consumers run it every MAINTENANCE_INTERVAL_MS; `python -m maintenance` runs it by hand.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from config import Settings, run_script
from redisPool import redis_connect
from replies import text

log = logging.getLogger("maintenance")

StreamId = tuple[int, int]


@dataclass(frozen=True)
class Capabilities:
    """What the connected Redis can do, from its version, detected once at start."""

    version: tuple[int, int, int]

    @property
    def acked_trim(self) -> bool:
        """XTRIM ... ACKED (Redis 8.2): the server itself keeps entries some group has not acked."""
        return self.version >= (8, 2, 0)

    @property
    def readgroup_claim(self) -> bool:
        """XREADGROUP ... CLAIM (Redis 8.4): reclaim and read in one call."""
        return self.version >= (8, 4, 0)

    @property
    def xadd_idmp(self) -> bool:
        """XADD ... IDMP (Redis 8.6): the server drops a repeated publish of one order."""
        return self.version >= (8, 6, 0)


def parse_version(text: str) -> tuple[int, int, int]:
    """'7.0.15' -> (7, 0, 15); missing or odd parts count as 0."""
    numbers = [int(part) if part.isdigit() else 0 for part in text.split(".")[:3]] + [0, 0, 0]
    return numbers[0], numbers[1], numbers[2]


async def detect(redis: Redis) -> Capabilities:
    info = await redis.info("server")
    return Capabilities(parse_version(str(info.get("redis_version", "0"))))


def parse_id(entry_id: bytes | str) -> StreamId:
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def format_id(entry_id: StreamId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


async def safe_trim_point(redis: Redis, stream: str) -> StreamId | None:
    """The lowest id some group still needs; every entry below it was delivered to and acked by all groups.

    None when the stream or its groups are missing: then nothing may be trimmed.
    """
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return None
    if not groups:
        return None
    needed = []
    for group in groups:
        ms, seq = parse_id(group["last-delivered-id"])
        first_undelivered = (ms, seq + 1)
        summary = await redis.xpending(stream, group["name"]) if group["pending"] else None
        if summary and summary["min"] is not None:  # it may have been acked since XINFO
            needed.append(min(first_undelivered, parse_id(summary["min"])))
        else:
            needed.append(first_undelivered)
    return min(needed)


async def retention_point(redis: Redis, settings: Settings, safe: StreamId) -> StreamId:
    """Move the trim point back to keep what the retention settings ask for; never past `safe`."""
    point = safe
    if settings.retention_keep_ms:
        point = min(point, (int(time.time() * 1000) - settings.retention_keep_ms, 0))
    if settings.retention_keep_entries:
        newest: Any = await redis.xrevrange(settings.stream_key, count=settings.retention_keep_entries)
        if newest:
            point = min(point, parse_id(newest[-1][0]))
    return point


async def trim(redis: Redis, settings: Settings, capabilities: Capabilities) -> int:
    """Trim entries every group has acked (and retention lets go); return how many went."""
    safe = await safe_trim_point(redis, settings.stream_key)
    if safe is None:
        return 0
    point = format_id(await retention_point(redis, settings, safe))
    if capabilities.acked_trim:
        removed = await redis.xtrim(settings.stream_key, minid=point, approximate=True, ref_policy="ACKED")
    else:
        # Approximate: Redis drops whole internal nodes only, so it stops at or before the point.
        removed = await redis.xtrim(settings.stream_key, minid=point, approximate=True)
    if removed:
        log.info("trimmed %d entries below %s from %s", removed, point, settings.stream_key)
    return int(removed)


# Removes the consumer only if it holds nothing, checked in the same atomic step.
DELETE_IF_IDLE_LUA = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return -1
end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


async def remove_stale_consumers(redis: Redis, settings: Settings) -> list[str]:
    """Delete consumers idle longer than STALE_CONSUMER_MS that hold no pending entries."""
    if not settings.stale_consumer_ms:
        return []
    try:
        groups = await redis.xinfo_groups(settings.stream_key)
    except ResponseError:
        return []
    script = redis.register_script(DELETE_IF_IDLE_LUA)
    removed: list[str] = []
    for group in groups:
        name = group["name"]
        for consumer in await redis.xinfo_consumers(settings.stream_key, name):
            if consumer["pending"] or consumer["idle"] < settings.stale_consumer_ms:
                continue
            try:
                result = await script(keys=[settings.stream_key], args=[name, consumer["name"]])
            except NoPermissionError:
                log.warning("not allowed to remove stale consumers (no scripting); skipping")
                return removed
            if result != -1:
                label = f"{name.decode()}/{consumer['name'].decode()}"
                log.info(
                    "removed stale consumer %s (idle %d s, nothing pending)", label, consumer["idle"] // 1000
                )
                removed.append(label)
    return removed


async def run_once(redis: Redis, settings: Settings, capabilities: Capabilities) -> tuple[int, list[str]]:
    """One round of housekeeping: trim, then remove stale consumers."""
    return await trim(redis, settings, capabilities), await remove_stale_consumers(redis, settings)


async def main(settings: Settings) -> int:
    async with redis_connect(settings) as redis:
        capabilities = await detect(redis)
        trimmed, removed = await run_once(redis, settings, capabilities)
    print(f"trimmed {trimmed} entries; removed {len(removed)} stale consumers {' '.join(removed)}".rstrip())
    return 0


if __name__ == "__main__":
    argparse.ArgumentParser(
        prog="python -m maintenance",
        description="Trim entries every group has acked (respecting RETENTION_KEEP_MS and "
        "RETENTION_KEEP_ENTRIES) and remove consumers idle longer than STALE_CONSUMER_MS that hold "
        "nothing. Consumers do this every MAINTENANCE_INTERVAL_MS; safe to run any time.",
    ).parse_args()
    run_script("maintenance", main)
