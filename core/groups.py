"""Consumer groups made where they are missing, all at once: no process sees some without the others.

Where a new group starts is never guessed on a stream already in use. On a stream with no group
yet (its first set-up, or after a FLUSHALL or a restart without persistence) every missing
group starts at id 0: orders published before the groups existed are still delivered. On a
stream that has groups and retained entries, a missing group is created only where the operator
says (`initialization_stream --start new` or `--start 0`): a typo in a group name must not
replay the stream's history through a service. Trimming waits for every configured group,
existing or not, so nothing is lost meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from config import ConfigError
from core.replies import text
from redisPool import before_multi


class GroupWouldReplay(ConfigError):
    """A group is missing from a stream in use, and no start was given for it."""

    def __init__(self, stream: str, missing: list[str], retained: int) -> None:
        names = ", ".join(missing)
        super().__init__(
            f"group {names} does not exist on stream {stream}, which other groups already read and "
            f"which holds {retained:,} entries: created from the start it would run them all again "
            f"(a replay). Create it where it should start: python3 -m initialization_stream --start new "
            f"(new orders only) or --start 0 (every order still in the stream); check the name for a typo"
        )
        self.missing = missing


async def ensure_groups(
    redis: Redis, stream: str, groups: Iterable[str], start: str | None = None
) -> list[str]:
    """Create every missing one of `groups` on `stream` (MKSTREAM); return those created.

    `start` None: from id 0 where the stream has no group yet or holds nothing, else raise
    GroupWouldReplay (see above); given: from there. One MULTI, so no process ever sees some of
    the groups without the others.
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
    if start is None:
        retained = int(await redis.xlen(stream)) if existing else 0
        if retained:
            raise GroupWouldReplay(stream, names, retained)
        start = "0"
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
