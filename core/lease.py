"""A consumer's sign of life: keys with a TTL that a thread refreshes while the process runs.

A consumer's pending entries are taken over only when their owner's lease has lapsed: the
process is gone (killed, stopped, cut off), not merely slow. A thread, not a task, refreshes
it, so a handler that blocks the event loop (a sync call, a long computation) cannot make a
live consumer look dead. The server's clock judges the TTL: clock skew does not matter.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from types import TracebackType

from redis.exceptions import RedisError

import redis
from config import Settings

log = logging.getLogger("lease")

MIN_TTL_MS = 100


class Lease:
    """Keep `keys` alive (PX `ttl_ms`, refreshed three times per TTL) inside `async with`.

    Every call to Redis happens on the lease's own thread; leaving the block asks the thread to
    delete the keys and end, and waits for that without blocking the event loop.
    """

    def __init__(
        self,
        settings: Settings,
        keys: list[str],
        ttl_ms: int,
        touch: Callable[[redis.Redis | redis.RedisCluster], None] | None = None,
    ) -> None:
        self.keys = keys
        self.touch = touch  # also called at each refresh, on the lease's thread
        self.ttl_ms = max(ttl_ms, MIN_TTL_MS)
        self.settings = settings
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lease", daemon=True)

    async def __aenter__(self) -> Lease:
        self.thread.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stopped.set()
        # Bounded: a refresh stuck on an unreachable Redis must not hold up the shutdown.
        await asyncio.to_thread(self.thread.join, self.ttl_ms / 3000 + 2)

    def _run(self) -> None:
        client = (redis.RedisCluster if self.settings.redis_cluster else redis.Redis).from_url(
            self.settings.redis_url,
            socket_timeout=self.ttl_ms / 3000 + 1,
            socket_connect_timeout=2,
            client_name=f"{self.settings.consumer_name}-lease",
        )
        try:
            self._refresh_until_stopped(client)
            client.delete(*self.keys)  # gone now: nobody needs to wait for the TTL
        except RedisError:
            pass  # it lapses by itself
        finally:
            client.close()

    def _refresh_until_stopped(self, client: redis.Redis | redis.RedisCluster) -> None:
        failing = False
        while not self.stopped.is_set():
            try:
                pipe = client.pipeline(transaction=False)
                for key in self.keys:
                    pipe.set(key, 1, px=self.ttl_ms)
                pipe.execute()
                if self.touch is not None:
                    self.touch(client)
                failing = False
            except RedisError as error:
                if not failing:  # the consumer loop reports outages; this is detail
                    log.debug("lease refresh failed (%s); retrying", type(error).__name__)
                failing = True
            self.stopped.wait(min(self.ttl_ms / 3000, 1.0) if failing else self.ttl_ms / 3000)
