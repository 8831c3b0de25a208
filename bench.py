"""Benchmark: publish, consume and end-to-end rates against a ceiling and a baseline, in one run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

import producer
from config import Settings, configure_logging, load_settings
from local_redis import start_local_redis
from orders import Item, Order
from redisPool import redis_connect
from replies import entries_of
from status import caught_up
from stream_consumer import StreamConsumer, serve

STREAM = "bench:orders"
PAYLOAD_110 = "x" * 110  # redis-benchmark's value: the size of a typical order


@dataclasses.dataclass
class Sizes:
    publish: int
    baseline: int
    e2e: int
    latency_s: float
    repeat: int


FULL = Sizes(publish=500_000, baseline=20_000, e2e=1_000_000, latency_s=10.0, repeat=3)
QUICK = Sizes(publish=50_000, baseline=3_000, e2e=50_000, latency_s=2.0, repeat=1)


def bench_orders(count: int) -> list[Order]:
    """Orders of about 110 bytes of JSON, each with a unique id."""
    run = uuid.uuid4().hex[:6]
    return [
        Order(f"o-{run}-{n}", f"c{n}@example.com", (Item(f"SKU-{n % 9}", 1 + n % 3),), 9.5 + n % 40)
        for n in range(count)
    ]


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


# --- publishing ---------------------------------------------------------------------


def ceiling(url: str, count: int) -> float | None:
    """redis-benchmark's pipelined XADD rate (8 connections, pipeline 128), or None without the binary."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    parts = urlsplit(url)
    command = [binary, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
    command += ["-c", "8", "-P", "128", "-n", str(count), "--csv", "XADD", "bench:ceiling", "*", "data"]
    env = {**os.environ, **({"REDISCLI_AUTH": parts.password} if parts.password else {})}
    result = subprocess.run(
        [*command, PAYLOAD_110], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    for line in result.stdout.splitlines():
        cells = [cell.strip('"') for cell in line.split('","')]
        if cells[0].startswith("XADD"):
            return float(cells[1])
    return None


async def baseline(redis: Redis, orders: list[Order]) -> float:
    """The seed's style: one awaited XADD per order, stdlib json."""
    started = time.perf_counter()
    for order in orders:
        data = json.dumps({"order_id": order.order_id, "customer_email": order.customer_email})
        await redis.xadd(STREAM, {"data": data})
    return rate(len(orders), time.perf_counter() - started)


async def publish_rate(redis: Redis, orders: list[Order]) -> float:
    started = time.perf_counter()
    await producer.publish_many(redis, STREAM, orders)
    return rate(len(orders), time.perf_counter() - started)


# --- consuming in worker processes --------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def worker_ours(settings: Settings, group: str) -> dict[str, Any]:
    """This project's consumer loop, every safety feature on, with a no-op handler."""
    samples: list[float] = []
    count = 0

    async def handle(order: Order) -> None:
        nonlocal count
        count += 1
        if count % 20_000 == 0:
            samples.append(rss_mb())

    await serve(settings, group, handle)
    return {"processed": count, "rss_mb": samples or [rss_mb()]}


async def worker_bare(settings: Settings, group: str) -> dict[str, Any]:
    """A hand-written loop: XREADGROUP, json.loads, one XACK per batch; no validation, no recovery."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    loads: Callable[[bytes], Any] = json.loads
    with contextlib.suppress(ImportError):
        import orjson  # noqa: PLC0415 - the same JSON library as ours, for a fair comparison

        loads = orjson.loads
    count = 0
    async with redis_connect(settings) as redis:
        while not stop.is_set():
            reply = await redis.xreadgroup(
                group, settings.consumer_name, {STREAM: ">"}, count=settings.batch_size, block=100
            )
            entries = entries_of(reply)
            if entries:
                for _, fields in entries:
                    loads(fields[b"data"])
                await redis.xack(STREAM, group, *[entry_id for entry_id, _ in entries])
                count += len(entries)
    return {"processed": count, "rss_mb": [rss_mb()]}


def worker_main(args: argparse.Namespace) -> None:
    settings = dataclasses.replace(load_settings(), consumer_name=args.name, stream_key=STREAM)
    configure_logging("WARNING")
    if args.worker == "ours-no-dedupe":
        settings = dataclasses.replace(settings, dedupe_window_ms=0)
    work = worker_bare if args.worker == "bare" else worker_ours
    report = asyncio.run(work(settings, args.group))
    print(json.dumps(report), flush=True)


@asynccontextmanager
async def workers(url: str, kind: str, per_group: int, batch: int) -> AsyncIterator[list[dict[str, Any]]]:
    """Run consumer processes for both groups; on exit SIGTERM them and collect their reports."""
    env = {**os.environ, "REDIS_URL": url, "BATCH_SIZE": str(batch), "BLOCK_MS": "100"}
    processes = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bench", "--worker", kind, "--group", group, "--name", f"{group}-{n}"),
            env=env,
            stdout=subprocess.PIPE,
        )
        for group in GROUPS
        for n in range(per_group)
    ]
    reports: list[dict[str, Any]] = []
    try:
        yield reports
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            async with asyncio.timeout(30):
                out, _ = await process.communicate()
            lines = out.decode().strip().splitlines()
            reports.append(json.loads(lines[-1]) if lines else {})


GROUPS = ("bench-fulfillment", "bench-email")


async def wait_groups(redis: Redis, total: int, timeout: float) -> float:
    """Wait until both groups have read and acked `total` entries; return when that happened."""
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 5
    while time.monotonic() < deadline:
        if await caught_up(redis, STREAM, GROUPS):
            return time.perf_counter()
        if time.monotonic() > next_note:
            infos = await redis.xinfo_groups(STREAM)
            progress("  " + ", ".join(f"{g['name'].decode()} read {g['entries-read']}" for g in infos))
            next_note += 5
        await asyncio.sleep(0.005)
    raise TimeoutError(f"the groups did not finish {total} orders within {timeout:.0f}s")


async def reset(redis: Redis) -> None:
    await redis.delete(STREAM)
    for group in GROUPS:
        await redis.xgroup_create(STREAM, group, id="0", mkstream=True)


async def end_to_end(
    redis: Redis, url: str, orders: list[Order], kind: str, per_group: int, batch: int
) -> tuple[float, list[dict[str, Any]]]:
    """Publish `orders` while consumers of both groups run; rate = orders / (first publish .. last ack)."""
    await reset(redis)
    async with workers(url, kind, per_group, batch) as reports:
        await asyncio.sleep(0.5)  # let the workers start and block on XREADGROUP
        started = time.perf_counter()
        await producer.publish_many(redis, STREAM, orders)
        finished = await wait_groups(redis, len(orders), timeout=600)
    return rate(len(orders), finished - started), reports


async def consume_only(redis: Redis, url: str, orders: list[Order], batch: int) -> float:
    """One consumer per group draining a preloaded stream (groups in parallel processes)."""
    await reset(redis)
    await producer.publish_many(redis, STREAM, orders)
    async with workers(url, "ours", 1, batch):
        # Start the clock when both workers are reading, so process start-up is not counted.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = await redis.xinfo_groups(STREAM)
            if all(g["entries-read"] for g in infos):
                break
            await asyncio.sleep(0.001)
        started, already = time.perf_counter(), max(g["entries-read"] for g in infos)
        finished = await wait_groups(redis, len(orders), timeout=600)
    return rate(len(orders) - already, finished - started)


# --- latency ------------------------------------------------------------------------


class _TimedConsumer(StreamConsumer):
    """Records publish-to-ack latency: the time its acks return, minus each order's publish time."""

    published: dict[str, float]
    unacked: list[str]
    latencies: list[float]

    async def _commit(self) -> None:
        await super()._commit()
        now = time.time()
        self.latencies.extend(now - self.published[order_id] for order_id in self.unacked)
        self.unacked.clear()


async def latency(redis: Redis, settings: Settings, per_second: int, seconds: float) -> list[float]:
    """Publish at a steady rate with both groups consuming in this process; return latencies in ms."""
    await reset(redis)
    published: dict[str, float] = {}
    latencies: list[float] = []
    stop = asyncio.Event()
    consumers = []
    for group in GROUPS:
        unacked: list[str] = []

        async def handle(order: Order, unacked: list[str] = unacked) -> None:
            unacked.append(order.order_id)

        consumer = _TimedConsumer(redis, settings, group, f"{group}-latency", handle, stop)
        consumer.published, consumer.unacked, consumer.latencies = published, unacked, latencies
        consumers.append(consumer)
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    total = int(per_second * seconds)
    orders = bench_orders(total)
    tick = 0.002  # publish a few orders every 2 ms: a steady stream, not bursts
    per_tick = max(1, int(per_second * tick))
    started = time.perf_counter()
    for n in range(0, total, per_tick):
        for order in orders[n : n + per_tick]:
            published[order.order_id] = time.time()
            await producer.publish(redis, STREAM, order)
        await asyncio.sleep(max(0.0, started + (n + per_tick) / per_second - time.perf_counter()))
    await wait_groups(redis, total, timeout=60)
    stop.set()
    await asyncio.gather(*tasks)
    return [seconds * 1000 for seconds in latencies]


# --- the run ------------------------------------------------------------------------


async def run(url: str, sizes: Sizes, batch: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "batch_size": batch,
        "date": datetime.now(UTC).date().isoformat(),
    }
    settings = Settings.from_env(
        {"REDIS_URL": url, "STREAM_KEY": STREAM, "BLOCK_MS": "100", "BATCH_SIZE": str(batch)}
    )
    async with redis_connect(dataclasses.replace(settings, redis_max_connections=16)) as redis:
        info = await redis.info("server")
        results["redis_version"] = info["redis_version"]
        progress(f"ceiling: redis-benchmark XADD x{sizes.publish * 2}")
        results["ceiling_per_s"] = ceiling(url, sizes.publish * 2)
        await redis.delete("bench:ceiling")

        progress(f"baseline: {sizes.baseline} awaited XADDs x{sizes.repeat}")
        runs = []
        for _ in range(sizes.repeat):
            await redis.delete(STREAM)
            runs.append(await baseline(redis, bench_orders(sizes.baseline)))
        results["baseline_per_s"] = statistics.median(runs)

        progress(f"publish_many of {sizes.publish} x{sizes.repeat}")
        runs = []
        for _ in range(sizes.repeat):
            await redis.delete(STREAM)
            runs.append(await publish_rate(redis, bench_orders(sizes.publish)))
        results["publish_per_s"] = statistics.median(runs)

        progress(f"consume: {sizes.publish} preloaded, one consumer per group")
        results["consume_per_s"] = await consume_only(redis, url, bench_orders(sizes.publish), batch)

        progress(f"end to end: {sizes.e2e} orders, 2 groups x 1 consumer (memory sampled)")
        e2e, reports = await end_to_end(redis, url, bench_orders(sizes.e2e), "ours", 1, batch)
        results["e2e_per_s"] = e2e
        rss = [r["rss_mb"] for r in reports if r.get("rss_mb")]
        results["consumer_rss_mb_first"] = max(samples[0] for samples in rss)
        results["consumer_rss_mb_last"] = max(samples[-1] for samples in rss)
        memory = await redis.info("memory")
        results["redis_used_mb"] = memory["used_memory"] / 1e6
        results["redis_entries"] = await redis.xlen(STREAM)

        half = max(sizes.e2e // 2, 1)
        progress(f"end to end: {half} orders, 2 groups x 2 consumers")
        results["e2e_2x2_per_s"], _ = await end_to_end(redis, url, bench_orders(half), "ours", 2, batch)
        progress(f"end to end: {half} orders, hand-written loop without safety features, 2 groups x 1")
        results["e2e_bare_per_s"], _ = await end_to_end(redis, url, bench_orders(half), "bare", 1, batch)
        progress(f"end to end: {half} orders, ours again, for the safety cost")
        results["e2e_safety_on_per_s"], _ = await end_to_end(redis, url, bench_orders(half), "ours", 1, batch)
        progress(f"end to end: {half} orders, ours with the dedupe guard off")
        results["e2e_no_dedupe_per_s"], _ = await end_to_end(
            redis, url, bench_orders(half), "ours-no-dedupe", 1, batch
        )

        progress(f"latency: 5000 orders/s for {sizes.latency_s:.0f}s")
        lat = await latency(redis, dataclasses.replace(settings, batch_size=batch), 5000, sizes.latency_s)
        cuts = statistics.quantiles(lat, n=100)
        results["latency_p50_ms"], results["latency_p99_ms"] = cuts[49], cuts[98]
        await redis.delete(STREAM, "bench:ceiling")
    return results


def table(r: dict[str, Any]) -> str:
    ceiling_rate = r.get("ceiling_per_s")
    base = r["baseline_per_s"]
    safety = r["e2e_safety_on_per_s"] / r["e2e_bare_per_s"]
    no_dedupe = r["e2e_no_dedupe_per_s"] / r["e2e_bare_per_s"]

    def row(name: str, value: float) -> str:
        vs_ceiling = f"{value / ceiling_rate:>6.0%}" if ceiling_rate else "     -"
        return f"{name:<58} {value:>12,.0f} {vs_ceiling}  {value / base:>7.1f}x"

    lines = [
        f"bench: {r['date']}, {r['cores']} cores, redis-server {r['redis_version']}, "
        f"batch size {r['batch_size']}",
        f"{'path (orders/s)':<58} {'rate':>12} {'/ceil':>6}  {'/base':>8}",
    ]
    if ceiling_rate:
        lines.append(row("ceiling: redis-benchmark XADD, 8 connections, pipeline 128", ceiling_rate))
    lines += [
        row("baseline: one awaited XADD per order (the seed's style)", base),
        row("publish_many: idempotent append, 500 per FCALL, two in flight", r["publish_per_s"]),
        row("consume: preloaded, 1 consumer per group, both groups", r["consume_per_s"]),
        row("end to end: 2 groups x 1 consumer, all safety on", r["e2e_per_s"]),
        row("end to end: 2 groups x 2 consumers", r["e2e_2x2_per_s"]),
        row("end to end: hand-written loop, no safety features", r["e2e_bare_per_s"]),
        row("end to end: ours again (same size as the line above)", r["e2e_safety_on_per_s"]),
        row("end to end: ours with the dedupe guard off (same size)", r["e2e_no_dedupe_per_s"]),
        f"safety features: ours runs at {safety:.0%} of the hand-written loop's rate "
        f"(they cost {1 - safety:.0%}); without the dedupe guard at {no_dedupe:.0%}",
        f"latency publish -> ack at 5000/s: p50 {r['latency_p50_ms']:.2f} ms, "
        f"p99 {r['latency_p99_ms']:.2f} ms",
        f"memory: consumer RSS {r['consumer_rss_mb_first']:.1f} MB early -> "
        f"{r['consumer_rss_mb_last']:.1f} MB at the end; redis used_memory "
        f"{r['redis_used_mb']:.0f} MB for {r['redis_entries']:,} entries",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure publish, consume, end-to-end, latency and memory in one run, against "
        "redis-benchmark's XADD (the ceiling) and a one-await-per-order loop (the baseline). Uses "
        "REDIS_URL when it is set (keys bench:*, deleted after), else a throwaway local redis-server.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: a smoke run in under a minute (default: full sizes)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document instead of the table (default: the table)",
    )
    parser.add_argument(
        "--orders",
        type=int,
        metavar="N",
        help=f"orders for the end-to-end and memory run, at least 1000 (default: {FULL.e2e:,}; "
        f"{QUICK.e2e:,} with --quick)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        metavar="N",
        help="entries per XREADGROUP (default: %(default)s)",
    )
    parser.add_argument("--worker", choices=["ours", "ours-no-dedupe", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    sizes = dataclasses.replace(QUICK if args.quick else FULL)
    if args.orders is not None:
        if args.orders < 1000:
            parser.error("--orders must be at least 1000")
        sizes.e2e = args.orders
    if not 1 <= args.batch_size <= 10_000:
        parser.error("--batch-size must be between 1 and 10000")
    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        server = start_local_redis("--appendonly", "no")
        url = server.url
    try:
        results = asyncio.run(run(url, sizes, args.batch_size))
    finally:
        if server is not None:
            server.close()
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
