"""Redis failures ridden out: said once per outage, backed off, and what a failure may have lost set up again.

A lost group or stream (a FLUSHALL, a restart without persistence) is said once as an error and
every configured group is made again; a lost function library is loaded again. Any other Redis
failure is said once, as a warning when Redis is unreachable, until Redis answers again. After
any failure the consumer reads its own pending entries again (a lost reply may have delivered
some) and sends again the commits whose replies were lost; what it had read but not yet
handled is dropped, not run while Redis may be away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.library import LibraryMissing

log = logging.getLogger("stream_consumer")

BACKOFF_START_S = 0.1
BACKOFF_CAP_S = 5.0

# Failures that end by themselves: an outage, a restart, a cluster failing over.
UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    RedisClusterException,
    ClusterDownError,
    MasterDownError,
    TryAgainError,
)


class Recovery:
    """One consumer's way through Redis failures."""

    def __init__(
        self,
        where: str,
        stop: asyncio.Event,
        after_failure: Callable[[], None],
        remake_groups: Callable[[], Awaitable[object]],
        reload_library: Callable[[], Awaitable[object]],
    ) -> None:
        self.where = where  # "group G on stream S", for the lines it says
        self.stop = stop
        self.after_failure = after_failure  # what the failure may have lost, set up again
        self.remake_groups = remake_groups
        self.reload_library = reload_library
        self.trouble_since: float | None = None
        self.backoff = BACKOFF_START_S

    def answered(self) -> None:
        """Redis replied: an outage, if one was on, is over."""
        if self.trouble_since is not None:
            log.warning("Redis is back after %.1f s; resuming", time.monotonic() - self.trouble_since)
            self.trouble_since, self.backoff = None, BACKOFF_START_S

    async def attempt(self, step: Awaitable[object]) -> bool:
        """Run one step; on a Redis failure say so (once per outage), set up again and back off.

        True when the step succeeded.
        """
        try:
            await step
            honour_cancellation()
            return True
        except (RedisError, RedisClusterException) as error:
            message = str(error)
            if isinstance(error, ResponseError) and message.startswith(("NOGROUP", "UNBLOCKED")):
                log.error(
                    "%s is gone (%s); making every configured group again",
                    self.where,
                    message.split(" ", 1)[0],
                )
                self.after_failure()
                await self.attempt(self.remake_groups())
                return False
            if isinstance(error, ResponseError) and "function not found" in message.lower():
                log.error("the Redis function library is gone; loading it again")
                self.after_failure()
                await self.attempt(self.reload_library())
                return False
            self._trouble(error)
        except LibraryMissing as error:
            self._trouble(error)
        self.after_failure()
        honour_cancellation()
        await pause(self.stop, self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_CAP_S)
        return False

    def _trouble(self, error: Exception) -> None:
        if self.trouble_since is not None:  # once per outage, not once per retry
            return
        self.trouble_since = time.monotonic()
        if isinstance(error, UNREACHABLE):
            log.warning("Redis unreachable (%s: %s); retrying with backoff", type(error).__name__, error)
        else:
            log.error("Redis error (%s: %s); retrying with backoff", type(error).__name__, error)


def honour_cancellation() -> None:
    """Raise CancelledError if this task was cancelled and the cancellation got lost on the way.

    On Python 3.11 `asyncio.wait_for` (redis-py connects with it) returns its result instead of
    raising when a cancellation lands just as it finishes: a second signal, or a test's
    teardown, would go unnoticed and the loop would run on.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, seconds)):
            await stop.wait()
