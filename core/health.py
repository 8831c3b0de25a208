"""A consumer's liveness and readiness for probes (Kubernetes, compose), served on HEALTH_PORT when set.

GET /livez: 200 while the consumer's loop turns, and while Redis does not answer (an outage the
consumer rides out: a restart would not help); 503 once the loop has not turned for
HEALTH_STUCK_MS while Redis answers (a handler or the loop is stuck: a restart helps, and what the
consumer held is taken over after its lease lapses). GET /readyz: 200 once the consumer is
consuming, is not stuck, and Redis answers it. A blocked event loop answers neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from config import CliError, Settings

log = logging.getLogger("health")

PING_TIMEOUT_S = 2.0  # below a probe's usual timeoutSeconds (5 in the manifests)


class Health:
    """What the consumer's hooks say (`turned`, `answered`), judged when a probe asks."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.stuck_s = settings.health_stuck_ms / 1000
        # An idle consumer hears from Redis every BLOCK_MS: a reply this recent needs no PING.
        self.fresh_s = max(2 * settings.block_ms / 1000, 1.0)
        self.turned_at = time.monotonic()  # starting (connecting, taking the lease) is not being stuck
        self.answered_at = -float("inf")
        self.consuming = False

    def turned(self) -> None:
        """The loop finished a turn."""
        self.turned_at = time.monotonic()
        self.consuming = True

    def answered(self) -> None:
        """Redis replied to the consumer."""
        self.answered_at = time.monotonic()

    async def redis_answers(self) -> bool:
        """True if Redis replied to the consumer just now, or answers a PING on its connections."""
        if time.monotonic() - self.answered_at <= self.fresh_s:
            return True
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                await self.redis.ping()
        except (RedisError, OSError, TimeoutError):
            return False
        return True

    async def judge(self) -> tuple[bool, bool, str]:
        """(live, ready, one line saying why)."""
        idle = time.monotonic() - self.turned_at
        answers = await self.redis_answers()
        if idle > self.stuck_s and answers:
            return False, False, f"stuck: no turn of the loop for {idle:.0f} s while Redis answers"
        if not answers:
            return True, False, f"Redis does not answer (last turn {idle:.0f} s ago); waiting for it"
        if not self.consuming:
            return True, False, "starting"
        return True, True, f"consuming: last turn {idle:.1f} s ago"


@contextlib.asynccontextmanager
async def serving(settings: Settings, redis: Redis) -> AsyncIterator[Health | None]:
    """Serve /livez and /readyz on HEALTH_HOST:HEALTH_PORT while inside; None when HEALTH_PORT is 0."""
    if not settings.health_port:
        yield None
        return
    # Here, not at the top: only a consumer that serves probes pays for aiohttp (about 11 MB).
    from aiohttp import web  # noqa: PLC0415 - on purpose, as said above

    health = Health(redis, settings)

    async def livez(request: web.Request) -> web.Response:
        live, _, why = await health.judge()
        return web.Response(status=200 if live else 503, text=why + "\n")

    async def readyz(request: web.Request) -> web.Response:
        _, ready, why = await health.judge()
        return web.Response(status=200 if ready else 503, text=why + "\n")

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)  # a probe every few seconds is not news
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, settings.health_host, settings.health_port).start()
        except OSError as error:  # aiohttp's own text repeats the address: the system's reason only
            reason = os.strerror(error.errno) if error.errno else str(error)
            where = f"{settings.health_host}:{settings.health_port}"
            raise CliError(f"cannot serve health probes on {where}: {reason}") from None
        log.info(
            "health probes on http://%s:%d/livez and /readyz", settings.health_host, settings.health_port
        )
        yield health
    finally:
        await runner.cleanup()
