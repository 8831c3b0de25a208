"""Run the whole pipeline once and show who processed what: fan-out and load balancing."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

import consumer1
import consumer2
from config import CliError, Settings, run_script
from initialization_stream import initialize
from local_redis import HOW_TO_GET_REDIS, start_local_redis
from orders import Order
from producer import publish, sample_orders
from redisPool import RedisRefused, RedisUnavailable, redis_connect
from stream_consumer import Handler, consume

log = logging.getLogger("demo")

WAIT_S = 30.0
PACE_S = 0.01  # between orders, so consumers are idle and Redis hands orders out in turn


async def _answers(settings: Settings) -> bool:
    """True if Redis answers at REDIS_URL within a second; a refusal (password, TLS) still ends the demo."""
    try:
        async with redis_connect(settings, deadline_s=1.0):
            return True
    except RedisRefused:
        raise
    except RedisUnavailable:
        return False


@asynccontextmanager
async def demo_redis(settings: Settings) -> AsyncIterator[Settings]:
    """Settings pointing at REDIS_URL when it answers, else at a throwaway local redis-server."""
    if await _answers(settings):
        print(f"using Redis at {settings.safe_redis_url}")
        yield settings
        return
    if shutil.which("redis-server") is None:
        raise CliError(f"nothing answers at {settings.safe_redis_url}; {HOW_TO_GET_REDIS}")
    server = start_local_redis()
    print(f"nothing answers at {settings.safe_redis_url}: started a throwaway redis-server at {server.url}")
    try:
        yield dataclasses.replace(settings, redis_url=server.url)
    finally:
        server.close()


async def run_pipeline(redis: Redis, settings: Settings, count: int) -> dict[str, dict[str, list[str]]]:
    """Publish `count` orders to three consumers; return group -> order_id -> consumers that handled it."""
    await initialize(redis, settings)
    orders = sample_orders(count)
    seen: dict[str, dict[str, list[str]]] = {g: {o.order_id: [] for o in orders} for g in settings.groups}
    left = len(seen) * count
    all_seen = asyncio.Event()

    def recording(group: str, name: str, handler: Handler) -> Handler:
        async def handle(order: Order) -> None:
            nonlocal left
            await handler(order)
            handlers = seen[group].get(order.order_id)
            if handlers is not None:  # not an order left over from an earlier run
                left -= not handlers
                handlers.append(name)
            if left == 0:
                all_seen.set()

        return handle

    team = [
        (settings.fulfillment_group, "fulfillment-1", consumer1.handle),
        (settings.fulfillment_group, "fulfillment-2", consumer1.handle),
        (settings.email_group, "email-1", consumer2.handle),
    ]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(consume(redis, settings, group, name, recording(group, name, handler), stop))
        for group, name, handler in team
    ]
    try:
        for order in orders:
            await publish(redis, settings.stream_key, order)
            await asyncio.sleep(PACE_S)
        async with asyncio.timeout(WAIT_S):
            await all_seen.wait()
    except TimeoutError:
        raise CliError(
            f"not every order was processed within {WAIT_S:.0f}s; see the log lines above"
        ) from None
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return seen


def report(seen: dict[str, dict[str, list[str]]], count: int) -> str:
    """A table of orders by group, then one summary line per group."""
    groups = list(seen)
    order_ids = list(next(iter(seen.values())))
    width = max([len("order"), *map(len, order_ids)])
    lines = ["", f"{'order':<{width}}  " + "  ".join(f"{group:<18}" for group in groups)]
    for order_id in order_ids:
        cells = [",".join(seen[group].get(order_id, ["-"])) for group in groups]
        lines.append(f"{order_id:<{width}}  " + "  ".join(f"{cell:<18}" for cell in cells))
    lines.append("")
    for group in groups:
        shares = Counter(name for names in seen[group].values() for name in names)
        done = sum(1 for names in seen[group].values() if names)
        twice = sum(1 for names in seen[group].values() if len(names) > 1)
        split = ", ".join(f"{name} {n}" for name, n in sorted(shares.items()))
        lines.append(f"{group}: {done}/{count} orders ({split}); handled twice: {twice}")
    lines.append(
        "fan-out: every group saw every order; "
        "load balancing: inside a group, each order went to one consumer"
    )
    return "\n".join(lines)


async def main(settings: Settings, args: argparse.Namespace) -> int:
    async with demo_redis(settings) as found:
        # Three consumers block at once, plus the publisher: make room in the pool.
        target = dataclasses.replace(found, redis_max_connections=max(found.redis_max_connections, 8))
        async with redis_connect(target) as redis:
            seen = await run_pipeline(redis, target, args.count)
    print(report(seen, args.count))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Run the pipeline end to end: init, 2 fulfillment consumers + 1 email consumer, "
        "publish sample orders, print who processed what. Uses REDIS_URL when it answers, "
        "else starts a throwaway local redis-server.",
    )
    parser.add_argument("--count", type=int, default=12, help="sample orders to publish (default 12)")
    parser.add_argument("--verbose", action="store_true", help="show every consumer's log lines")
    return parser


if __name__ == "__main__":
    parser = build_parser()
    arguments = parser.parse_args()
    if not 1 <= arguments.count <= 10_000:
        parser.error("--count must be between 1 and 10000")

    async def run(settings: Settings) -> int:
        if not arguments.verbose:
            logging.getLogger().setLevel(logging.WARNING)
        return await main(settings, arguments)

    run_script("demo", run)
