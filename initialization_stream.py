"""Create the orders stream and every configured group, and load the function library; safe to run twice."""

from __future__ import annotations

import argparse
import logging
import re

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from config import ConfigError, Settings, run_script
from core import library
from core.groups import ensure_groups
from core.keys import keys_for, partitions
from redisPool import redis_connect

log = logging.getLogger("initialization_stream")


async def initialize(redis: Redis, settings: Settings, start: str | None = None) -> list[str]:
    """Load the function library and make sure every partition's stream and every configured group
    exist; return the groups created on some partition.

    `start` None: groups start at 0 on a stream no group reads yet; a group missing from a stream
    in use needs a start given (GroupWouldReplay, core/groups.py).
    """
    await library.load(redis)
    created: dict[str, None] = {}
    for part in partitions(settings):
        made = await ensure_groups(redis, part.stream_key, settings.groups, start)
        for group in settings.groups:
            state = f"created from {start or '0'}" if group in made else "already there"
            log.debug("group %s on stream %s: %s", group, part.stream_key, state)
        created.update(dict.fromkeys(made))
    return list(created)


async def retire(redis: Redis, settings: Settings, group: str) -> bool:
    """Delete a group that is no longer configured, so it stops holding back trimming; False if absent."""
    if group in settings.groups:
        raise ConfigError(
            f"{group} is still in CONSUMER_GROUPS ({','.join(settings.groups)}): remove it there first"
        )
    destroyed = False
    for part in partitions(settings):
        try:
            destroyed |= bool(await redis.xgroup_destroy(part.stream_key, group))
        except ResponseError as error:  # no such stream
            if "no such key" not in str(error).lower():
                raise
        keys = keys_for(part)
        await redis.delete(keys.done(group), keys.running(group))
    return destroyed


async def main(settings: Settings, args: argparse.Namespace) -> int:
    async with redis_connect(settings) as redis:
        if args.retire:
            gone = await retire(redis, settings, args.retire)
            print(f"group {args.retire}: {'deleted' if gone else 'was not there'}")
            return 0
        created = await initialize(redis, settings, "$" if args.start == "new" else args.start)
    for group in settings.groups:
        print(f"group {group}: {'created' if group in created else 'already there'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m initialization_stream",
        description="Create STREAM_KEY and every group in CONSUMER_GROUPS that is missing, and load the "
        "Redis function library the consumers call. Groups that exist are left as they are. "
        "Safe to run twice.",
    )
    parser.add_argument(
        "--start",
        metavar="0|new|ID",
        help="where groups created now start: 0 = every order still in the stream, new = only orders "
        "published from now on, or an entry id (default: 0 on a stream no group reads yet; a group "
        "missing from a stream other groups read needs --start, so nothing is replayed by accident)",
    )
    parser.add_argument(
        "--retire",
        metavar="GROUP",
        help="delete GROUP (already removed from CONSUMER_GROUPS), so it no longer holds back trimming",
    )
    return parser


if __name__ == "__main__":
    parser = build_parser()
    arguments = parser.parse_args()
    if arguments.start not in (None, "0", "new") and not re.fullmatch(r"\d+(-\d+)?", arguments.start):
        parser.error(f"--start must be 0, new or an entry id, got {arguments.start!r}")
    run_script("initialization_stream", lambda settings: main(settings, arguments))
