"""Create the orders stream and both consumer groups; safe to run twice."""

from __future__ import annotations

import argparse
import logging

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from config import Settings, run_script
from redisPool import redis_connect

log = logging.getLogger("initialization_stream")


async def create_group(redis: Redis, stream: str, group: str) -> bool:
    """Create `group` on `stream` from id 0 (MKSTREAM); return False if it already existed."""
    try:
        # From id 0, so orders published before the group existed are still delivered.
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as error:
        if str(error).startswith("BUSYGROUP"):
            return False
        raise
    return True


async def initialize(redis: Redis, settings: Settings) -> None:
    """Make sure the stream and both groups exist; touch nothing that is already there."""
    for group in settings.groups:
        created = await create_group(redis, settings.stream_key, group)
        log.info(
            "group %s on stream %s: %s", group, settings.stream_key, "created" if created else "already there"
        )


async def main(settings: Settings) -> int:
    async with redis_connect(settings) as redis:
        await initialize(redis, settings)
    return 0


if __name__ == "__main__":
    argparse.ArgumentParser(
        prog="python -m initialization_stream",
        description="Create STREAM_KEY and both consumer groups (from id 0). Safe to run twice.",
    ).parse_args()
    run_script("initialization_stream", main)
