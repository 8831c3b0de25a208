"""Housekeeping that never loses an order: lossless trimming, removal of stale consumers, and each
group's lag in Redis set right where Redis's own count went wrong (core/lag.py).

Consumers run it every MAINTENANCE_INTERVAL_MS; `python3 -m maintenance` runs it by hand.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Collection
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from config import Settings, run_script
from core import library
from core.capabilities import Capabilities, detect
from core.keys import keys_for, partitions
from core.lag import group_lags
from core.replies import StreamId, format_id, next_id, parse_id, text
from redisPool import redis_connect

log = logging.getLogger("maintenance")


async def safe_trim_point(redis: Redis, stream: str, required: Collection[str]) -> StreamId | None:
    """The lowest id some group still needs; every entry below it was delivered to and acked by all groups.

    Every existing group counts, configured or not. None when the stream, every group, or any
    of the `required` (configured) groups is missing: then nothing may be trimmed, since a
    missing group has yet to get every entry. Warns naming the missing groups.
    """
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return None
    existing = {text(group["name"]) for group in groups}
    missing = [name for name in required if name not in existing]
    if missing:
        log.warning(
            "not trimming %s: configured groups %s do not exist (run python3 -m initialization_stream)",
            stream,
            ", ".join(missing),
        )
        return None
    if not groups:
        return None
    needed = []
    for group in groups:
        first_undelivered = next_id(parse_id(group["last-delivered-id"]))
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
        point = min(point, (max(0, int(time.time() * 1000) - settings.retention_keep_ms), 0))
    if settings.retention_keep_entries:
        newest: Any = await redis.xrevrange(settings.stream_key, count=settings.retention_keep_entries)
        if newest:
            point = min(point, parse_id(newest[-1][0]))
    return point


async def trim_limit(redis: Redis) -> int | None:
    """Entries one XTRIM call may remove: Redis's own bound for `~` (100 nodes' worth), made explicit.

    None when CONFIG is refused (an ACL user): Redis then applies that same bound itself.
    """
    try:
        reply = await redis.config_get("stream-node-max-entries")
    except ResponseError:
        return None
    node_entries = int(next(iter(reply.values()), 0) or 0)
    # The clamps Redis applies to its default: 0 means nodes bounded by bytes only.
    return min(100 * node_entries, 1_000_000) if node_entries > 0 else 10_000


async def trim(redis: Redis, settings: Settings, capabilities: Capabilities) -> int:
    """Trim entries every group has acked (and retention lets go); return how many went.

    One pass trims everything below that point (down to a node: trimming is approximate, so it
    stops at or before the point) in calls of bounded work, never one long block of the server.
    """
    stream = settings.stream_key
    safe = await safe_trim_point(redis, stream, settings.groups)
    if safe is None:
        return 0
    point = format_id(await retention_point(redis, settings, safe))
    limit = await trim_limit(redis)
    # ACKED (Redis 8.2+): the server itself also keeps entries some group has not acked.
    policy: Literal["ACKED"] | None = "ACKED" if capabilities.acked_trim else None
    # Every call that removes anything frees a node or the entries below the point in one, so
    # the node count bounds the calls a pass needs.
    try:
        nodes = int((await redis.xinfo_stream(stream))["radix-tree-keys"])
    except ResponseError:  # deleted meanwhile: nothing to trim
        return 0
    removed = calls = 0
    while calls < nodes + 2:
        calls += 1
        step = int(await redis.xtrim(stream, minid=point, approximate=True, limit=limit, ref_policy=policy))
        removed += step
        if not step:
            break
    else:
        log.warning("trimming %s stopped after %d calls; the next pass goes on", stream, calls)
    if removed:
        log.info("trimmed %d entries below %s from %s in %d calls", removed, point, stream, calls)
    return removed


# Removes the consumer only if its process is gone (no lease) and it holds nothing, both checked
# in the same atomic step as the delete. KEYS: the stream, the consumer's lease; ARGV: group, consumer.
HELD, ALIVE = -1, -2


async def remove_stale_consumers(redis: Redis, settings: Settings) -> list[str]:
    """Delete consumers idle longer than STALE_CONSUMER_MS whose process is gone and that hold nothing.

    Idle time alone proves nothing (on Redis 7.0 a blocked read does not reset it): a running
    consumer keeps its lease key alive, and a consumer with a lease is never removed.
    """
    if not settings.stale_consumer_ms:
        return []
    try:
        groups = await redis.xinfo_groups(settings.stream_key)
    except ResponseError:
        return []
    keys = keys_for(settings)
    await library.ensure_loaded(redis)
    removed: list[str] = []
    for group in groups:
        name = group["name"]
        for consumer in await redis.xinfo_consumers(settings.stream_key, name):
            if consumer["pending"] or consumer["idle"] < settings.stale_consumer_ms:
                continue
            label = f"{text(name)}/{text(consumer['name'])}"
            lease = keys.lease(text(name), text(consumer["name"]))
            try:
                result = await redis.fcall(
                    library.function("remove_consumer"), 2, settings.stream_key, lease, name, consumer["name"]
                )
            except ResponseError as error:  # refused by the ACL, at the call or inside it
                if not isinstance(error, NoPermissionError) and "no permissions" not in str(error).lower():
                    raise
                log.warning("not allowed to remove stale consumers (the admin's job); skipping")
                return removed
            if result == ALIVE:
                log.debug("kept idle consumer %s: its lease says it is running", label)
            elif result != HELD:
                log.info(
                    "removed stale consumer %s (idle %d s, no lease, nothing pending)",
                    label,
                    consumer["idle"] // 1000,
                )
                removed.append(label)
    return removed


async def correct_lags(redis: Redis, settings: Settings) -> list[str]:
    """Set each group's lag in Redis (XINFO GROUPS, what autoscalers read) to the counted one where it
    differs and Redis can take it; the groups corrected. Run after trimming, which may move it."""
    await library.ensure_loaded(redis)
    try:
        lags = await group_lags(redis, settings.stream_key, fix=True)
    except ResponseError as error:  # refused by the ACL (XGROUP SETID), at the call or inside it
        if not isinstance(error, NoPermissionError) and "no permissions" not in str(error).lower():
            raise
        log.warning("not allowed to correct groups' lag (the admin's job); skipping")
        return []
    corrected = []
    for group, lag in lags.items():
        if lag.corrected:
            said = "NULL" if lag.redis_lag_before is None else lag.redis_lag_before
            log.info(
                "corrected group %s's lag on %s: Redis said %s, it is %d",
                group,
                settings.stream_key,
                said,
                lag.lag,
            )
            corrected.append(group)
    return corrected


async def run_once(redis: Redis, settings: Settings, capabilities: Capabilities) -> tuple[int, list[str]]:
    """One round of housekeeping: trim, remove stale consumers, correct the groups' lag in Redis."""
    trimmed = await trim(redis, settings, capabilities)
    removed = await remove_stale_consumers(redis, settings)
    await correct_lags(redis, settings)
    return trimmed, removed


async def main(settings: Settings) -> int:
    async with redis_connect(settings) as redis:
        capabilities = await detect(redis)
        trimmed, removed, corrected = 0, list[str](), list[str]()
        for part in partitions(settings):
            trimmed += await trim(redis, part, capabilities)
            removed += await remove_stale_consumers(redis, part)
            corrected += [f"{group}@{part.stream_key}" for group in await correct_lags(redis, part)]
    print(
        f"trimmed {trimmed} entries; removed {len(removed)} stale consumers {' '.join(removed)}".rstrip()
        + f"; corrected the lag of {len(corrected)} groups {' '.join(corrected)}".rstrip()
    )
    return 0


if __name__ == "__main__":
    argparse.ArgumentParser(
        prog="python3 -m maintenance",
        description="Trim entries every group has acked (respecting RETENTION_KEEP_MS and "
        "RETENTION_KEEP_ENTRIES), remove consumers idle longer than STALE_CONSUMER_MS that hold "
        "nothing, and set each group's lag in Redis (XINFO GROUPS, what autoscalers read) to the "
        "counted one where Redis's own count went wrong. Consumers do this every "
        "MAINTENANCE_INTERVAL_MS; safe to run any time.",
    ).parse_args()
    run_script("maintenance", main)
