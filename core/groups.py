"""Consumer groups made where they are missing, all at once: no process sees some without the others."""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from core.replies import text
from redisPool import before_multi


async def ensure_groups(redis: Redis, stream: str, groups: Iterable[str], start: str = "0") -> list[str]:
    """Create every missing one of `groups` on `stream` (MKSTREAM) from `start`; return those created.

    One MULTI, so no process ever sees some of the groups without the others, and trimming
    (which never passes a group) cannot drop what a late group still needs. From id 0 by
    default: orders published before the groups existed are still delivered.
    """
    names = list(dict.fromkeys(groups))
    try:
        existing = {text(group["name"]) for group in await redis.xinfo_groups(stream)}
    except ResponseError as error:
        if "no such key" not in str(error):
            raise
        existing = set()
    # Only what is missing is created: with every group there (the usual case) this writes
    # nothing, so it works on a full Redis too (XGROUP CREATE is refused there; reading is not).
    names = [name for name in names if name not in existing]
    if not names:
        return []
    await before_multi(redis)
    pipe = redis.pipeline(transaction=True)
    for group in names:
        pipe.xgroup_create(stream, group, id=start, mkstream=True)
    created = []
    for group, result in zip(names, await pipe.execute(raise_on_error=False), strict=True):
        if isinstance(result, ResponseError):
            if str(result).startswith("BUSYGROUP"):
                continue
            raise result
        created.append(group)
    return created
