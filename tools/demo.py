"""Run the whole pipeline once and show who processed what: fan-out and load balancing.

The demo works in keys of its own (a stream `demo-<random hex>`, its dead-letter stream and the
keys named after that stream) and deletes them on every way out, so on a Redis where the real
pipeline runs it never touches the real stream, its groups or its consumers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import secrets
import shutil
import signal
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis
from redis.exceptions import RedisError

import consumer1
import consumer2
from config import CliError, Settings, run_script
from core.keys import hash_tag, partitions
from core.recovery import honour_cancellation
from initialization_stream import initialize
from orders import Order
from producer import publish, sample_orders
from redisPool import RedisRefused, RedisUnavailable, redis_connect
from redisPool import log as pool_log
from stream_consumer import AnyHandler, Hooks, TxHandler, consume, with_tx
from tools.local_redis import HOW_TO_GET_REDIS, start_local_cluster, start_local_redis
from tx import Tx

log = logging.getLogger("demo")

WAIT_S = 30.0
STOP_S = 10.0  # for the consumers to stop after the run, then again once cancelled
CLEANUP_S = 10.0  # for deleting the demo's keys
SCAN_CALLS = 100_000  # SCAN round trips at most while looking for the demo's keys
CLUSTER_PARTITIONS = 3  # demo --cluster: one per master of its throwaway cluster
PACE_S = 0.01  # between orders, so consumers are idle and Redis hands orders out in turn


async def _answers(settings: Settings) -> bool:
    """True if Redis answers at REDIS_URL within a second; a refusal (password, TLS) still ends the demo."""
    level = pool_log.level
    # Here no answer is an answer (start a server of our own), not a "not reachable yet" warning.
    pool_log.setLevel(logging.ERROR)
    try:
        async with redis_connect(settings, deadline_s=1.0):
            return True
    except RedisRefused:
        raise
    except RedisUnavailable:
        return False
    finally:
        pool_log.setLevel(level)


@asynccontextmanager
async def demo_redis(settings: Settings, cluster: bool = False) -> AsyncIterator[Settings]:
    """Settings pointing at REDIS_URL when it answers, else at a throwaway local redis-server
    (with `cluster`: a throwaway local Redis Cluster of 3 masters, 3 partitions)."""
    if cluster:
        settings = dataclasses.replace(
            settings,
            redis_cluster=True,
            stream_partitions=max(settings.stream_partitions, CLUSTER_PARTITIONS),
        )
    if await _answers(settings):
        print(f"using Redis at {settings.safe_redis_url}, in keys of the demo's own")
        yield settings
        return
    if shutil.which("redis-server") is None:
        raise CliError(f"nothing answers at {settings.safe_redis_url}; {HOW_TO_GET_REDIS}")
    if cluster:
        if shutil.which("redis-cli") is None:
            raise CliError("the demo's cluster needs redis-cli too (apt-get install redis-tools)")
        local = await asyncio.to_thread(start_local_cluster, 3)
        try:
            print(
                f"nothing answers at {settings.safe_redis_url}: started a throwaway Redis Cluster of 3 "
                f"masters on 127.0.0.1 ports {', '.join(map(str, local.ports))} (gone when the demo ends)"
            )
            yield dataclasses.replace(settings, redis_url=local.url)
        finally:
            local.close()
        return
    server = start_local_redis()
    try:
        print(
            f"nothing answers at {settings.safe_redis_url}: started a throwaway redis-server at "
            f"{server.url} (pid {server.pid}, files in {server.directory}; both go when the demo ends)"
        )
        yield dataclasses.replace(settings, redis_url=server.url)
    finally:
        server.close()


def own_namespace(settings: Settings) -> Settings:
    """Settings for a stream of the demo's own, read by the fulfillment and the email group only."""
    stream = f"demo-{secrets.token_hex(6)}"
    return dataclasses.replace(
        settings,
        stream_key=stream,
        dead_letter_stream=f"{stream}:dead-letter",
        groups=(settings.fulfillment_group, settings.email_group),
        # Three consumers block at once, plus the publisher: make room in the pool.
        redis_max_connections=max(settings.redis_max_connections, 8),
    )


async def remove_namespace(redis: Redis, settings: Settings) -> None:
    """Delete the demo's stream, its dead-letter stream and every key named after its stream."""
    if settings.partitioned:  # every partition's keys carry its tag (keys.py); SCAN each master
        for part in partitions(settings):
            named = [key async for key in redis.scan_iter(match="{" + hash_tag(part.stream_key) + "}:*")]
            await redis.delete(part.stream_key, part.dead_letter_stream, *named)
        return
    stream = settings.stream_key
    doomed: set[bytes | str] = {stream, settings.dead_letter_stream}
    # `{stream}:...` is the key scheme of keys.py; `stream:...` covers keys named the older way.
    for pattern in (f"{{{stream}}}:*", f"{stream}:*"):
        cursor = 0
        for _ in range(SCAN_CALLS):
            cursor, found = await redis.scan(cursor, match=pattern, count=1000)
            doomed.update(found)
            if cursor == 0:
                break
        else:
            log.warning("gave up looking for keys matching %s after %d SCAN calls", pattern, SCAN_CALLS)
    await redis.delete(*doomed)


async def clean_up(redis: Redis, settings: Settings) -> None:
    """`remove_namespace`, bounded in time; a failure is logged (naming what is left), not raised."""
    try:
        async with asyncio.timeout(CLEANUP_S):
            await remove_namespace(redis, settings)
    except (RedisError, TimeoutError) as error:
        stream = settings.stream_key
        log.error(
            "could not delete the demo's keys (%s and the keys starting with {%s}: or %s:): %s",
            stream,
            stream,
            stream,
            str(error) or type(error).__name__,
        )


async def stop_all(tasks: list[asyncio.Task[object]], stop: asyncio.Event) -> None:
    """Ask the consumers to stop, cancel any still running after STOP_S, and re-raise a consumer's crash."""
    stop.set()
    try:
        await asyncio.wait(tasks, timeout=STOP_S)
    finally:
        # Also when a second signal cut the wait short: nothing of the demo may run on.
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=STOP_S)
    for task in tasks:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error


async def run_pipeline(redis: Redis, settings: Settings, count: int) -> dict[str, dict[str, list[str]]]:
    """Publish `count` orders to three consumers; return group -> order_id -> consumers that handled it."""
    await initialize(redis, settings)
    orders = sample_orders(count)
    seen: dict[str, dict[str, list[str]]] = {g: {o.order_id: [] for o in orders} for g in settings.groups}
    left = len(seen) * count
    all_seen = asyncio.Event()

    def recording(group: str, name: str, handler: AnyHandler) -> TxHandler:
        run = with_tx(handler)

        async def handle(order: Order, tx: Tx) -> None:
            nonlocal left
            await run(order, tx)
            handlers = seen[group].get(order.order_id)
            if handlers is not None:  # not an order left over from an earlier run
                left -= not handlers
                handlers.append(name)
            if left == 0:
                all_seen.set()

        return handle

    team: list[tuple[str, str, AnyHandler]] = [
        (settings.fulfillment_group, "fulfillment-1", consumer1.handle),
        (settings.fulfillment_group, "fulfillment-2", consumer1.handle),
        (settings.email_group, "email-1", consumer2.handle),
    ]
    stop = asyncio.Event()
    ready = {name: asyncio.Event() for _, name, _ in team}  # a first turn done: it reads next
    tasks: list[asyncio.Task[object]] = [
        asyncio.create_task(
            consume(
                redis,
                settings,
                group,
                name,
                recording(group, name, handler),
                stop,
                Hooks(turned=ready[name].set),
            )
        )
        for group, name, handler in team
    ]
    try:
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*(event.wait() for event in ready.values()))
        for order in orders:
            honour_cancellation()
            await publish(redis, settings.stream_key, order, partitions=settings.stream_partitions)
            await asyncio.sleep(PACE_S)
        honour_cancellation()
        async with asyncio.timeout(WAIT_S):
            await all_seen.wait()
    except TimeoutError:
        raise CliError(
            f"not every order was processed within {WAIT_S:.0f}s; see the log lines above"
        ) from None
    finally:
        await stop_all(tasks, stop)
    return seen


def report(seen: dict[str, dict[str, list[str]]], count: int, batch_size: int) -> str:
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
    lines.append(
        "the orders went out one at a time, so each went to whichever consumer was waiting; under real load "
        f"each read takes up to BATCH_SIZE ({batch_size}) waiting orders, so whole batches go to one consumer"
    )
    return "\n".join(lines)


async def main(settings: Settings, args: argparse.Namespace) -> int:
    """Run the demo in keys of its own and print the table; keys and throwaway server go on every exit."""
    async with demo_redis(settings, args.cluster) as found:
        target = own_namespace(found)
        async with redis_connect(target) as redis:
            try:
                seen = await run_pipeline(redis, target, args.count)
            finally:
                await clean_up(redis, target)
    print(report(seen, args.count, target.batch_size))
    if target.partitioned:
        where = " on a Redis Cluster" if target.redis_cluster else ""
        print(
            f"partitions: {target.stream_partitions} streams{where}, each order in the one its order_id "
            "routes to (keys.partition_of); every consumer reads them all"
        )
    return 0


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """`main`; SIGTERM and SIGHUP end it as SIGINT does, through every clean-up, with 128 + the signal."""
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    task = asyncio.current_task()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if task is not None:
            task.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await main(settings, args)
    except asyncio.CancelledError:
        if not received:
            raise
        log.warning("stopped by %s", signal.Signals(received[0]).name)
        return 128 + received[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m tools.demo",
        description="Run the pipeline end to end: init, 2 fulfillment consumers + 1 email consumer, "
        "publish sample orders, print who processed what. Uses REDIS_URL when it answers, "
        "else starts a throwaway local redis-server.",
    )
    parser.add_argument("--count", type=int, default=12, help="sample orders to publish (default 12)")
    parser.add_argument("--verbose", action="store_true", help="show every consumer's log lines")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="partitioned, on a Redis Cluster: REDIS_URL's when it answers (any node), else a throwaway "
        "local one of 3 masters (needs redis-cli); STREAM_PARTITIONS at least 3",
    )
    return parser


if __name__ == "__main__":
    parser = build_parser()
    arguments = parser.parse_args()
    if not 1 <= arguments.count <= 10_000:
        parser.error("--count must be between 1 and 10000")
    run_script("tools.demo", lambda settings: run(settings, arguments))
