"""Benchmark: publish, consume and end-to-end rates against a ceiling and a baseline, in one run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

import consumer1
import producer
from config import DEFAULTS, Settings, configure_logging, load_settings
from core import library, tracing
from core.capabilities import detect
from core.keys import hash_tag, keys_for, partitions
from core.replies import entries_of, text
from initialization_stream import initialize
from maintenance import trim
from orders import Item, Order, parse_order, serialize
from producer import plural
from redisPool import is_cluster, redis_connect
from status import caught_up
from stream_consumer import Hooks, serve
from tools.local_redis import start_local_redis
from tx import Tx

STREAM = "bench:orders"
MEMORY_STREAM = "bench:memory"
# The template's least-privilege users may touch only the default stream's keys.
PRODUCTION_STREAM = DEFAULTS["STREAM_KEY"]
GROUPS = ("bench-fulfillment", "bench-email")
PAYLOAD_110 = "x" * 110  # redis-benchmark's value: the size of a typical order
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
START_SH = Path(__file__).resolve().parent.parent / "redis" / "start.sh"
# Orders through the pipeline before memory is first read: keys, groups and consumers exist.
WARM_UP = 4000
# Idempotence per order, to compare with ours (one check per chunk), each in a function call of
# CHUNK orders as ours: Redis 8.6's own XADD ... IDMP <producer> <order id> (the stream's IDMP
# window as a producer's two chunks in flight need it), and the library's append before issue 29
# (a producer's last 2,000 order ids in a hash and a list: HGET, XADD, HSET, LPUSH per order).
# KEYS: the stream, the id map, its list. ARGV: the producer, then order id and payload pairs.
REFERENCE_LIBRARY = """#!lua name=bench_reference
redis.register_function('bench_idmp', function(keys, args)
  local ids = {}
  for i = 2, #args, 2 do
    ids[#ids + 1] = redis.call('XADD', keys[1], 'IDMP', args[1], args[i], '*',
      'data', args[i + 1], 'producer', args[1])
  end
  return ids
end)
redis.register_function('bench_id_map', function(keys, args)
  local stream, map, recent = keys[1], keys[2], keys[3]
  local ids = {}
  for i = 2, #args, 2 do
    local id = redis.call('HGET', map, args[i])
    if not id then
      id = redis.call('XADD', stream, '*', 'data', args[i + 1], 'producer', args[1])
      redis.call('HSET', map, args[i], id)
      redis.call('LPUSH', recent, args[i])
    end
    ids[#ids + 1] = id
  end
  local old = redis.call('LRANGE', recent, 2000, -1)
  if #old > 0 then
    redis.call('HDEL', map, unpack(old))
    redis.call('LTRIM', recent, 0, 1999)
  end
  redis.call('PEXPIRE', map, 600000)
  redis.call('PEXPIRE', recent, 600000)
  return ids
end)
"""


@dataclasses.dataclass
class Sizes:
    publish: int
    baseline: int
    e2e: int
    latency_s: float
    repeat: int
    memory: int
    one: int  # publish() calls of one order each, for its latency


FULL = Sizes(
    publish=500_000, baseline=20_000, e2e=1_000_000, latency_s=10.0, repeat=3, memory=100_000, one=5000
)
QUICK = Sizes(publish=50_000, baseline=3_000, e2e=50_000, latency_s=2.0, repeat=1, memory=10_000, one=1000)


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


def bench_settings(url: str, stream: str, batch: int) -> Settings:
    """The settings of the bench's consumers of `stream`: its own groups, short blocking reads."""
    return Settings.from_env(
        {
            "REDIS_URL": url,
            "STREAM_KEY": stream,
            "DEAD_LETTER_STREAM": f"{stream}:dead-letter",
            "CONSUMER_GROUPS": ",".join(GROUPS),
            "BLOCK_MS": "100",
            "BATCH_SIZE": str(batch),
        }
    )


async def forget(redis: Redis, settings: Settings) -> None:
    """Delete each partition's stream and every key the pipeline keeps beside it (guard, dead
    letters, the producer's record of its calls, the reference paths' id map), one partition (one
    hash slot) per call."""
    for part in partitions(settings):
        keys = keys_for(part)
        guard = [key for group in GROUPS for key in (keys.done(group), keys.running(group))]
        effects = [f"{keys.tag}:stock-booked", f"{keys.tag}:shipments"]  # consumer1's transactional writes
        producer_keys = [*keys.producer(part.producer_id), *reference_keys(keys.stream)]
        await redis.delete(keys.stream, keys.dead_letter, *guard, *effects, *producer_keys)


async def reset(redis: Redis, settings: Settings) -> None:
    """An empty stream set up as in production by initialization_stream (groups, library, IDMP window)."""
    await forget(redis, settings)
    await initialize(redis, settings)


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


async def redis_cpu_s(redis: Redis) -> float:
    """The CPU time Redis has used so far, its own threads' user and system time."""
    cpu = await redis.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def publish_rate(redis: Redis, stream: str, orders: list[Order]) -> float:
    started = time.perf_counter()
    await producer.publish_many(redis, stream, orders)
    return rate(len(orders), time.perf_counter() - started)


async def reference_rate(redis: Redis, stream: str, orders: list[Order], function: str) -> float:
    """A function of REFERENCE_LIBRARY, CHUNK orders per call, two in flight on one connection."""
    await redis.function_load(REFERENCE_LIBRARY, replace=True)
    if function == "bench_idmp":
        await redis.execute_command(  # type: ignore[no-untyped-call]
            "XCFGSET", stream, "IDMP-DURATION", 600, "IDMP-MAXSIZE", 2 * producer.CHUNK
        )
    keys = (stream, *reference_keys(stream))
    pool = redis.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    started = time.perf_counter()
    try:
        in_flight = 0
        for start in range(0, len(orders), producer.CHUNK):
            if in_flight == 2:
                [text(entry_id) for entry_id in await connection.read_response()]
                in_flight -= 1
            args: list[str | bytes] = []
            for order in orders[start : start + producer.CHUNK]:
                args += [order.order_id, serialize(order)]
            await connection.send_command("FCALL", function, len(keys), *keys, "bench", *args)
            in_flight += 1
        for _ in range(in_flight):
            [text(entry_id) for entry_id in await connection.read_response()]
    finally:
        await pool.release(connection)
    return rate(len(orders), time.perf_counter() - started)


def reference_keys(stream: str) -> tuple[str, str]:
    """The id map and its list of REFERENCE_LIBRARY's bench_id_map, in the stream's slot."""
    tag = "{" + hash_tag(stream) + "}"
    return f"{tag}:bench:ids", f"{tag}:bench:recent"


async def publish_one_latency(redis: Redis, stream: str, count: int) -> tuple[float, float]:
    """p50 and p99 (ms) of publish() of one order, awaited one after another (a web request's path)."""
    latencies = []
    for order in bench_orders(count):
        started = time.perf_counter()
        await producer.publish(redis, stream, order)
        latencies.append((time.perf_counter() - started) * 1000)
    quantiles = statistics.quantiles(latencies, n=100)
    return quantiles[49], quantiles[98]


async def append_plain(redis: Redis, stream: str, orders: Sequence[Order]) -> None:
    """Orders appended by another client: XADD of `data` only, 1000 per pipeline."""
    for start in range(0, len(orders), 1000):
        pipe = redis.pipeline(transaction=False)
        for order in orders[start : start + 1000]:
            pipe.xadd(stream, {"data": serialize(order)})
        await pipe.execute()


# --- the production users -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Users:
    """URLs of the template's least-privilege users, on the bench's own server."""

    producer_url: str = dataclasses.field(repr=False)
    consumer_url: str = dataclasses.field(repr=False)


def with_user(url: str, user: str, password: str) -> str:
    """`url` logged in as `user`."""
    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def render_users(passwords: dict[str, str]) -> list[list[str]]:
    """The lines of redis/users.acl.template as redis/start.sh renders them, split into words."""
    with tempfile.TemporaryDirectory(prefix="bench-acl-") as directory:
        acl = Path(directory) / "users.acl"
        env = {**os.environ, **passwords, "ACL_FILE": str(acl), "RENDER_ONLY": "1"}
        subprocess.run(["sh", str(START_SH)], env=env, check=True, timeout=30)
        return [line.split() for line in acl.read_text().splitlines() if line.strip()]


async def add_template_users(redis: Redis, url: str) -> Users:
    """Create the users of redis/users.acl.template with made-up passwords; only on the bench's own server.

    Its `user default off` is left out: the bench's own connection (the admin rows,
    redis-benchmark) stays the default user.
    """
    passwords = {
        name: secrets.token_urlsafe(16)
        for name in ("REDIS_ADMIN_PASSWORD", "PRODUCER_PASSWORD", "CONSUMER_PASSWORD")
    }
    for _, name, *rules in await asyncio.to_thread(render_users, passwords):
        if name != "default":
            # Words as in an ACL file: Redis joins a selector's "(~key", "+cmd)" itself.
            await redis.execute_command("ACL", "SETUSER", name, *rules)  # type: ignore[no-untyped-call]
    return Users(
        producer_url=with_user(url, "producer", passwords["PRODUCER_PASSWORD"]),
        consumer_url=with_user(url, "consumer", passwords["CONSUMER_PASSWORD"]),
    )


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


async def worker_tx(settings: Settings, group: str) -> dict[str, Any]:
    """This project's consumer loop with consumer1's transactional handler (stock + outbox per order)."""
    count = 0

    async def handle(order: Order, tx: Tx) -> None:
        nonlocal count
        count += 1
        await consumer1.handle(order, tx)

    await serve(settings, group, handle)
    return {"processed": count, "rss_mb": [rss_mb()]}


async def worker_bare(settings: Settings, group: str, timed: bool = False) -> dict[str, Any]:
    """A hand-written loop: XREADGROUP, a JSON decode, one XACK per batch; no validation, no recovery.
    `timed`: also report each order's publish-to-ack time (ms), as worker_timed does for ours."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    loads = msgspec.json.Decoder().decode  # the same JSON library as ours, for a fair comparison
    count = 0
    latencies: list[float] = []
    stream = settings.stream_key
    async with redis_connect(settings) as redis:
        while not stop.is_set():
            reply = await redis.xreadgroup(
                group, settings.consumer_name, {stream: ">"}, count=settings.batch_size, block=100
            )
            entries = entries_of(reply)
            if entries:
                orders = [loads(fields[b"data"]) for _, fields in entries]
                await redis.xack(stream, group, *[entry_id for entry_id, _ in entries])
                count += len(entries)
                if timed:
                    now = time.time()
                    latencies.extend(
                        (now - datetime.fromisoformat(o["created_at"]).timestamp()) * 1000 for o in orders
                    )
    return {"processed": count, "rss_mb": [rss_mb()], "latencies_ms": latencies}


def worker_main(args: argparse.Namespace) -> None:
    settings = dataclasses.replace(load_settings(), consumer_name=args.name)
    configure_logging("WARNING")
    if args.worker == "ours-no-dedupe":
        settings = dataclasses.replace(settings, dedupe_window_ms=0)
    if args.worker == "ours-traced":
        trace_with_sdk()
    work: dict[str, Callable[[Settings, str], Coroutine[Any, Any, dict[str, Any]]]] = {
        "bare": worker_bare,
        "bare-timed": functools.partial(worker_bare, timed=True),
        "ours-tx": worker_tx,
        "ours-timed": worker_timed,
    }
    report = asyncio.run(work.get(args.worker, worker_ours)(settings, args.group))
    print(json.dumps(report), flush=True)


@asynccontextmanager
async def workers(
    redis: Redis, settings: Settings, kind: str, per_group: int
) -> AsyncIterator[list[dict[str, Any]]]:
    """Run consumer processes for both groups, reading once `redis` (an admin) sees them read; on
    exit SIGTERM them and collect their reports."""
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "STREAM_KEY": settings.stream_key,
        "CONSUMER_GROUPS": ",".join(settings.groups),
        "REDIS_CLUSTER": str(settings.redis_cluster).lower(),
        "STREAM_PARTITIONS": str(settings.stream_partitions),
        "BATCH_SIZE": str(settings.batch_size),
        "BLOCK_MS": str(settings.block_ms),
    }
    processes = [
        await asyncio.create_subprocess_exec(
            *(
                sys.executable,
                "-m",
                "tools.bench",
                "--worker",
                kind,
                "--group",
                group,
                "--name",
                f"{group}-{n}",
            ),
            env=env,
            stdout=subprocess.PIPE,
        )
        for group in GROUPS
        for n in range(per_group)
    ]
    reports: list[dict[str, Any]] = []
    try:
        await registered(
            redis, settings, {group: [f"{group}-{n}" for n in range(per_group)] for group in GROUPS}
        )
        yield reports
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            async with asyncio.timeout(30):
                out, _ = await process.communicate()
            lines = out.decode().strip().splitlines()
            reports.append(json.loads(lines[-1]) if lines else {})


async def registered(
    redis: Redis, settings: Settings, names: dict[str, list[str]], timeout: float = 60
) -> None:
    """Wait until every worker reads: its group lists it (it has read once), or, on one Redis, its
    connection is blocked in XREADGROUP (Redis 7.0 lists a consumer only once a read returns)."""
    stream = partitions(settings)[0].stream_key
    expected = {name for group_names in names.values() for name in group_names}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reading: set[str] = set()
        with contextlib.suppress(ResponseError):  # no stream or group yet
            for group in names:
                reading |= {c["name"].decode() for c in await redis.xinfo_consumers(stream, group)}
        if not is_cluster(redis):
            reading |= {c["name"] for c in await redis.client_list() if c["cmd"] == "xreadgroup"}
        if reading >= expected:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"the bench's consumers did not start within {timeout:.0f}s")


async def wait_groups(redis: Redis, stream: str, total: int, timeout: float) -> float:
    """Wait until both groups have read and acked `total` entries; return when that happened."""
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 5
    while time.monotonic() < deadline:
        if await caught_up(redis, stream, GROUPS):
            return time.perf_counter()
        if time.monotonic() > next_note:
            infos = await redis.xinfo_groups(stream)
            progress("  " + ", ".join(f"{g['name'].decode()} read {g['entries-read']}" for g in infos))
            next_note += 5
        await asyncio.sleep(0.005)
    raise TimeoutError(f"the groups did not finish {total} orders within {timeout:.0f}s")


async def end_to_end(
    redis: Redis, publisher: Redis, settings: Settings, orders: list[Order], kind: str, per_group: int
) -> tuple[float, list[dict[str, Any]]]:
    """Publish `orders` with `publisher` while consumers of both groups run (as `settings` say).

    Rate = orders / (first publish .. last ack); `redis` (an admin) sets up and watches.
    """
    await reset(redis, settings)
    async with workers(redis, settings, kind, per_group) as reports:
        started = time.perf_counter()
        await producer.publish_many(publisher, settings.stream_key, orders)
        finished = await wait_groups(redis, settings.stream_key, len(orders), timeout=600)
    return rate(len(orders), finished - started), reports


async def consume_only(redis: Redis, settings: Settings, orders: list[Order]) -> float:
    """One consumer per group draining a preloaded stream (groups in parallel processes)."""
    await reset(redis, settings)
    await producer.publish_many(redis, settings.stream_key, orders)
    async with workers(redis, settings, "ours", 1):
        # Start the clock when both workers are reading, so process start-up is not counted.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = await redis.xinfo_groups(settings.stream_key)
            if all(g["entries-read"] for g in infos):
                break
            await asyncio.sleep(0.001)
        started, already = time.perf_counter(), max(g["entries-read"] or 0 for g in infos)
        finished = await wait_groups(redis, settings.stream_key, len(orders), timeout=600)
    return rate(len(orders) - already, finished - started)


# --- memory at steady state ---------------------------------------------------------


async def bytes_per_order(
    redis: Redis, settings: Settings, count: int, *, foreign: bool
) -> tuple[float, int]:
    """Redis's used_memory growth per order once both groups acked `count` orders; the stream's length.

    Own orders are published with producer.publish_many; foreign ones by plain XADD of `data`
    (the dedupe guard keeps a done mark per order and group for those). Memory is read at two
    quiet moments, consumers and publisher gone and the stream trimmed: after a warm-up round
    (so keys, groups and consumers exist in both readings), and after `count` more orders.
    """
    await reset(redis, settings)
    capabilities = await detect(redis)

    async def round_of(orders: list[Order]) -> int:
        async with workers(redis, settings, "ours", 1):
            # A client of its own, closed before memory is read: its buffers are not counted.
            async with redis_connect(settings) as publisher:
                if foreign:
                    await append_plain(publisher, settings.stream_key, orders)
                else:
                    await producer.publish_many(publisher, settings.stream_key, orders)
            await wait_groups(redis, settings.stream_key, len(orders), timeout=600)
        await trim(redis, settings, capabilities)
        return int((await redis.info("memory"))["used_memory"])

    before = await round_of(bench_orders(WARM_UP))
    after = await round_of(bench_orders(count))
    return (after - before) / count, int(await redis.xlen(settings.stream_key))


# --- latency ------------------------------------------------------------------------


async def worker_timed(settings: Settings, group: str) -> dict[str, Any]:
    """This project's consumer with a no-op handler, in its own process as consumer1 and consumer2
    run; reports each order's publish-to-ack time (ms): the time its commit's reply is back, minus
    its publish time, which the bench writes into the order's `created_at` as it publishes it."""
    published: list[str] = []
    latencies: list[float] = []

    async def handle(order: Order) -> None:
        published.append(order.created_at or "")

    def committed(count: int) -> None:  # the first `count` orders handled: every one is acked
        now = time.time()
        latencies.extend((now - datetime.fromisoformat(at).timestamp()) * 1000 for at in published[:count])
        del published[:count]

    await serve(settings, group, handle, Hooks(committed=committed))
    return {"processed": len(latencies), "latencies_ms": latencies, "rss_mb": [rss_mb()]}


async def latency(
    redis: Redis, settings: Settings, per_second: int, seconds: float, kind: str = "ours-timed"
) -> tuple[list[float], float]:
    """Publish at a steady rate, each order stamped with its publish time, while one consumer
    process per group acks them; return the latencies (ms) of both groups and the rate reached.

    Every 2 ms the orders due go out in one publish_many call: one awaited publish() per order
    costs this machine a round trip each, about 0.5 ms, so a loop of them falls behind 5000/s.
    """
    await reset(redis, settings)
    total = int(per_second * seconds)
    orders = bench_orders(total)
    tick = 0.002  # a steady stream, not bursts
    per_tick = max(1, int(per_second * tick))
    async with workers(redis, settings, kind, 1) as reports:
        started = time.perf_counter()
        for n in range(0, total, per_tick):
            now = datetime.now(UTC).isoformat()
            due = [msgspec.structs.replace(order, created_at=now) for order in orders[n : n + per_tick]]
            await producer.publish_many(redis, settings.stream_key, due)
            await asyncio.sleep(max(0.0, started + (n + per_tick) / per_second - time.perf_counter()))
        reached = rate(total, time.perf_counter() - started)
        await wait_groups(redis, settings.stream_key, total, timeout=60)
    return [ms for report in reports for ms in report["latencies_ms"]], reached


# --- the run ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Streams:
    """The settings of each stream the bench uses; `production` is the stream the template's users may use."""

    bench: Settings
    memory: Settings
    production: Settings


async def run(url: str, sizes: Sizes, batch: int, own_server: bool) -> dict[str, Any]:
    """Every measurement; the template's users only on the bench's `own_server` (never a user's ACLs)."""
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "batch_size": batch,
        "date": datetime.now(UTC).date().isoformat(),
    }
    streams = Streams(
        bench=bench_settings(url, STREAM, batch),
        memory=bench_settings(url, MEMORY_STREAM, batch),
        production=bench_settings(url, PRODUCTION_STREAM, batch),
    )
    async with redis_connect(dataclasses.replace(streams.bench, redis_max_connections=16)) as redis:
        try:
            info = await redis.info("server")
            results["redis_version"] = info["redis_version"]
            users = await add_template_users(redis, url) if own_server else None
            await measure_publishing(redis, results, streams, sizes, users)
            await measure_consuming(redis, results, streams, sizes, users)
            await measure_memory(redis, results, streams.memory, sizes.memory)
            results.update(decode_us(sizes.one * 10))
            await measure_tracing(redis, results, streams.bench, max(sizes.e2e // 2, 1))  # last: see there
        finally:
            await redis.delete("bench:ceiling")
            with contextlib.suppress(ResponseError):  # not loaded: Redis before 8.6
                await redis.function_delete("bench_reference")
            for bench_stream in (streams.bench, streams.memory):
                await forget(redis, bench_stream)
    return results


def as_user(settings: Settings, url: str) -> Settings:
    return dataclasses.replace(settings, redis_url=url, redis_max_connections=16)


async def measure_publishing(
    redis: Redis, results: dict[str, Any], streams: Streams, sizes: Sizes, users: Users | None
) -> None:
    """The ceiling, the baseline, publish_many as the admin and as the producer user, XADD IDMP (8.6),
    publish() of one order."""
    url = streams.bench.redis_url
    progress(f"baseline: {sizes.baseline} awaited XADDs x{sizes.repeat}")
    runs = []
    for _ in range(sizes.repeat):
        await redis.delete(STREAM)
        runs.append(await baseline(redis, bench_orders(sizes.baseline)))
    results["baseline_per_s"] = statistics.median(runs)

    # The ceiling, ours as the admin and, where the bench made them, as the template's producer
    # user, and XADD IDMP where Redis has it, in turn: this machine's speed drifts, so neighbours
    # in time are compared.
    idmp = (await detect(redis)).xadd_idmp
    who = "as the admin and the template's producer user" if users else "as the admin"
    progress(
        f"ceiling (redis-benchmark XADD x{sizes.publish * 2}), publish_many of {sizes.publish} {who}"
        f"{', XADD IDMP' if idmp else ''}, in turn x{sizes.repeat}"
    )
    rates: dict[str, list[float]] = {"ceiling": [], "ours": [], "production": [], "id_map": [], "idmp": []}
    cpu: dict[str, list[float]] = {path: [] for path in rates}  # Redis's CPU time per order (us)

    async def measure(path: str, count: int, run: Coroutine[Any, Any, float | None]) -> None:
        started = await redis_cpu_s(redis)
        measured = await run
        if measured is not None:
            rates[path].append(measured)
            cpu[path].append((await redis_cpu_s(redis) - started) / count * 1e6)

    production = (
        redis_connect(as_user(streams.production, users.producer_url)) if users else contextlib.nullcontext()
    )
    async with production as publisher:
        for _ in range(sizes.repeat):
            await measure("ceiling", sizes.publish * 2, asyncio.to_thread(ceiling, url, sizes.publish * 2))
            await redis.delete("bench:ceiling")
            await reset(redis, streams.bench)
            await measure("ours", sizes.publish, publish_rate(redis, STREAM, bench_orders(sizes.publish)))
            if publisher is not None:
                await reset(redis, streams.production)
                orders = bench_orders(sizes.publish)
                await measure("production", sizes.publish, publish_rate(publisher, PRODUCTION_STREAM, orders))
            await reset(redis, streams.bench)
            orders = bench_orders(sizes.publish)
            await measure("id_map", sizes.publish, reference_rate(redis, STREAM, orders, "bench_id_map"))
            if idmp:
                await reset(redis, streams.bench)
                orders = bench_orders(sizes.publish)
                await measure("idmp", sizes.publish, reference_rate(redis, STREAM, orders, "bench_idmp"))
    paths = ("ceiling", "ceiling"), ("ours", "publish"), ("production", "publish_production")
    for path, key in (*paths, ("id_map", "publish_id_map"), ("idmp", "publish_idmp")):
        results[f"{key}_per_s"] = statistics.median(rates[path]) if rates[path] else None
        results[f"{key}_redis_us_per_order"] = statistics.median(cpu[path]) if cpu[path] else None
    if users is None:
        progress("publish_many as the template's producer user: skipped, REDIS_URL is set")
    progress(f"publish(): {sizes.one} calls of one order, one after another")
    await reset(redis, streams.bench)
    p50, p99 = await publish_one_latency(redis, STREAM, sizes.one)
    results["publish_one_calls"], results["publish_one_p50_ms"], results["publish_one_p99_ms"] = (
        sizes.one,
        p50,
        p99,
    )


async def measure_consuming(
    redis: Redis, results: dict[str, Any], streams: Streams, sizes: Sizes, users: Users | None
) -> None:
    """Consume, end to end (as the admin, hand-written, as the template's users), latency."""
    settings = streams.bench
    progress(f"consume: {sizes.publish} preloaded, one consumer per group")
    results["consume_per_s"] = await consume_only(redis, settings, bench_orders(sizes.publish))

    progress(f"end to end: {sizes.e2e} orders, 2 groups x 1 consumer (memory sampled)")
    e2e, reports = await end_to_end(redis, redis, settings, bench_orders(sizes.e2e), "ours", 1)
    results["e2e_per_s"] = e2e
    rss = [r["rss_mb"] for r in reports if r.get("rss_mb")]
    results["consumer_rss_mb_first"] = max(samples[0] for samples in rss)
    results["consumer_rss_mb_last"] = max(samples[-1] for samples in rss)
    memory = await redis.info("memory")
    results["redis_used_mb"] = memory["used_memory"] / 1e6
    results["redis_entries"] = await redis.xlen(STREAM)

    half = max(sizes.e2e // 2, 1)
    progress(f"end to end: {half} orders, 2 groups x 2 consumers")
    results["e2e_2x2_per_s"], _ = await end_to_end(redis, redis, settings, bench_orders(half), "ours", 2)
    # The safety cost: the hand-written loop and ours in turn, `repeat` rounds, for this machine's
    # speed drifts by a third within minutes; each round's ratio compares neighbours in time.
    bare, ours = [], []
    for n in range(1, sizes.repeat + 1):
        of = f"round {n} of {sizes.repeat}"
        progress(f"end to end: {half} orders, hand-written loop without safety features, 2 groups x 1 ({of})")
        bare.append((await end_to_end(redis, redis, settings, bench_orders(half), "bare", 1))[0])
        progress(f"end to end: {half} orders, ours again, for the safety cost ({of})")
        ours.append((await end_to_end(redis, redis, settings, bench_orders(half), "ours", 1))[0])
    results["e2e_bare_per_s"] = statistics.median(bare)
    results["e2e_safety_on_per_s"] = statistics.median(ours)
    results["e2e_safety_ratios"] = [o / b for b, o in zip(bare, ours, strict=True)]
    results["e2e_production_per_s"] = None
    if users is None:
        progress("end to end as the template's producer and consumer users: skipped, REDIS_URL is set")
    else:
        progress(f"end to end: {half} orders as the template's producer and consumer users, 2 groups x 1")
        consumers = dataclasses.replace(streams.production, redis_url=users.consumer_url)
        async with redis_connect(as_user(streams.production, users.producer_url)) as publisher:
            results["e2e_production_per_s"], _ = await end_to_end(
                redis, publisher, consumers, bench_orders(half), "ours", 1
            )
    progress(f"end to end: {half} orders, ours with the dedupe guard off")
    results["e2e_no_dedupe_per_s"], _ = await end_to_end(
        redis, redis, settings, bench_orders(half), "ours-no-dedupe", 1
    )
    progress(f"end to end: {half} orders, consumer1's transactional handler in both groups")
    results["e2e_tx_per_s"], _ = await end_to_end(redis, redis, settings, bench_orders(half), "ours-tx", 1)

    # Latency: ours and the hand-written loop in turn, as for the safety cost: on a shared machine
    # one round's p99 is often the scheduler's (5-15 ms stalls that hit both loops alike).
    kinds = {"ours-timed": ("ours", "latency"), "bare-timed": ("hand-written loop", "latency_bare")}
    cuts: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    reached = []
    for n in range(1, sizes.repeat + 1):
        for kind, (name, _) in kinds.items():
            progress(
                f"latency: 5000 orders/s for {sizes.latency_s:.0f}s, {name} (round {n} of {sizes.repeat})"
            )
            lat, rate_reached = await latency(redis, settings, 5000, sizes.latency_s, kind)
            quantiles = statistics.quantiles(lat, n=100)
            cuts[kind].append((quantiles[49], quantiles[98]))
            reached.append(rate_reached)
    results["latency_rate_per_s"] = min(reached)
    for kind, (_, prefix) in kinds.items():
        results[f"{prefix}_p50_ms"] = statistics.median(p50 for p50, _ in cuts[kind])
        results[f"{prefix}_p99_ms"] = statistics.median(p99 for _, p99 in cuts[kind])
        results[f"{prefix}_p99_rounds_ms"] = [p99 for _, p99 in cuts[kind]]
    await forget(redis, settings)


async def measure_memory(redis: Redis, results: dict[str, Any], settings: Settings, count: int) -> None:
    """Bytes per order at steady state, guard on, for orders of this project's producer and foreign ones."""
    progress(f"memory: {count} orders of each kind through both groups, guard on, then trimmed")
    results["memory_orders"] = count
    results["dedupe_window_ms"] = settings.dedupe_window_ms
    for kind in ("own", "foreign"):
        per_order, length = await bytes_per_order(redis, settings, count, foreign=kind == "foreign")
        results[f"bytes_per_order_{kind}"] = per_order
        results[f"stream_length_after_trim_{kind}"] = length
        if kind == "own":
            results["producer_calls_bytes"], results["producer_calls"] = await calls_record(redis, settings)


async def calls_record(redis: Redis, settings: Settings) -> tuple[int, int]:
    """The bytes this producer's record of its calls takes (library.lua's `append`), and the calls in it."""
    keys = keys_for(settings).producer(settings.producer_id)
    sizes = [await redis.memory_usage(key, samples=0) or 0 for key in keys]
    return sum(sizes), int(await redis.hlen(keys[0]))


# --- decoding -----------------------------------------------------------------------


def decode_us(count: int) -> dict[str, float]:
    """What parsing one order costs (us, best of 3): strictly as the producer does (before, consumers
    did too), tolerantly as consumers do now, and tolerantly an order with a field they do not know
    (the strict JSON parser's path, not msgspec's fast one)."""
    payloads = [serialize(order) for order in bench_orders(count)]
    extended = [payload[:-1] + b',"coupon":"SUMMER"}' for payload in payloads]
    cases = {
        "decode_strict_us": (payloads, True),
        "decode_tolerant_us": (payloads, False),
        "decode_tolerant_unknown_field_us": (extended, False),
    }
    out = {}
    for key, (batch, strict) in cases.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for payload in batch:
                parse_order(payload, 65536, strict=strict)
            best = min(best, time.perf_counter() - started)
        out[key] = best / len(batch) * 1e6
    return out


def decode_line(r: dict[str, Any]) -> str:
    return (
        f"parsing an order: strict (the producer; consumers before) {r['decode_strict_us']:.2f} us, "
        f"tolerant (consumers now) {r['decode_tolerant_us']:.2f} us, tolerant with a field consumers do "
        f"not know {r['decode_tolerant_unknown_field_us']:.2f} us (the strict JSON parser's path)"
    )


# --- tracing ------------------------------------------------------------------------


def sdk_provider() -> Any:
    """An SDK tracer provider as a service would configure it (spans batched to an exporter), but
    its exporter drops them: what is measured is tracing, not a collector. None without the SDK.
    """
    try:
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415 - optional
        from opentelemetry.sdk.trace.export import (  # noqa: PLC0415 - optional
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError:
        return None

    class Dropping(SpanExporter):  # type: ignore[misc, unused-ignore]  # Any without the SDK
        def export(self, spans: Any) -> Any:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    return provider


def trace_with_sdk() -> None:
    """Make sdk_provider() this process's global tracer provider: tracing is on here from now on."""
    from opentelemetry import trace  # noqa: PLC0415 - optional

    trace.set_tracer_provider(sdk_provider())


def hook_us_per_order(spans: tracing.Processing | None, count: int = 10_000) -> float:
    """What the consumer's tracing hook costs per order in-process (us, best of 3), beyond a bare loop."""
    fields = {b"data": b"{}", b"producer": b"bench", b"traceparent": TRACEPARENT}
    best = float("inf")
    for _ in range(3):
        loop = time.perf_counter()
        for _ in range(count):
            pass
        bare = time.perf_counter() - loop
        started = time.perf_counter()
        for _ in range(count):  # as the consumer's loop does it, per order
            if spans is not None:
                with spans.span(b"1-0", fields):
                    pass
        best = min(best, time.perf_counter() - started - bare)
    return max(0.0, best / count * 1e6)


async def measure_tracing(redis: Redis, results: dict[str, Any], settings: Settings, count: int) -> None:
    """Tracing's cost per order: the consumer's hook in-process without and with a tracer provider,
    and end to end without one, then with one in the producer (this process) and every consumer.

    Last in the run: once this process has a global provider it keeps it, and every other
    measurement runs without one.
    """
    keys = ("tracing_off_us_per_order", "tracing_span_us_per_order", "e2e_untraced_per_s")
    results.update(dict.fromkeys((*keys, "e2e_traced_per_s", "tracing_cost_us_per_order")))
    provider = sdk_provider()
    results["tracing_off_us_per_order"] = hook_us_per_order(tracing.processing(STREAM, GROUPS[0], "bench"))
    if provider is None:
        progress("tracing: skipped, opentelemetry-sdk is not installed")
        return
    processing = tracing.Processing(provider.get_tracer("bench"), STREAM, GROUPS[0], "bench")
    results["tracing_span_us_per_order"] = hook_us_per_order(processing)
    provider.shutdown()
    progress(f"end to end: {count} orders, ours without a tracer provider, then with one everywhere")
    untraced, _ = await end_to_end(redis, redis, settings, bench_orders(count), "ours", 1)
    trace_with_sdk()
    traced, _ = await end_to_end(redis, redis, settings, bench_orders(count), "ours-traced", 1)
    results["e2e_untraced_per_s"], results["e2e_traced_per_s"] = untraced, traced
    results["tracing_cost_us_per_order"] = (1 / traced - 1 / untraced) * 1e6
    await forget(redis, settings)


def tracing_lines(r: dict[str, Any], row: Callable[[str, float], str]) -> list[str]:
    """The tracing rows and what tracing costs per order, as measure_tracing found it."""
    off = f"the hook without a provider {r['tracing_off_us_per_order']:.2f} us"
    if r["e2e_traced_per_s"] is None:
        return [f"tracing: not measured with a provider, opentelemetry-sdk is not installed; {off} per order"]
    return [
        row("end to end: ours, no tracer provider (same size)", r["e2e_untraced_per_s"]),
        row("end to end: ours, SDK tracer provider in producer and consumers", r["e2e_traced_per_s"]),
        f"tracing with a provider costs {r['tracing_cost_us_per_order']:.1f} us per order end to end (a span "
        f"per order and group, batched, the exporter dropping them: "
        f"{r['e2e_traced_per_s'] / r['e2e_untraced_per_s']:.0%} of the rate without); in-process, a "
        f"consumer span {r['tracing_span_us_per_order']:.1f} us per order, {off}",
    ]


def publishing_lines(r: dict[str, Any]) -> list[str]:
    """Ours against the ceiling and against XADD IDMP, in rate and in Redis's CPU per order; publish()."""
    ceiling_rate, ours, idmp = r["ceiling_per_s"], r["publish_per_s"], r["publish_idmp_per_s"]
    parts = [f"publish_many at {ours / ceiling_rate:.0%} of the ceiling" if ceiling_rate else "no ceiling"]
    parts.append(
        f"{ours / idmp:.2f}x XADD IDMP's rate" if idmp else "XADD IDMP: not measured, Redis 8.6+ only"
    )
    parts.append(
        f"publish() of one order ({r['publish_one_calls']:,} calls in turn): p50 "
        f"{r['publish_one_p50_ms']:.2f} ms, p99 {r['publish_one_p99_ms']:.2f} ms"
    )
    costs = [
        f"{name} {r[key]:.2f} us"
        for name, key in (
            ("the ceiling's XADD", "ceiling_redis_us_per_order"),
            ("publish_many", "publish_redis_us_per_order"),
            ("as the producer user", "publish_production_redis_us_per_order"),
            ("the id map", "publish_id_map_redis_us_per_order"),
            ("XADD IDMP", "publish_idmp_redis_us_per_order"),
        )
        if r.get(key) is not None
    ]
    return ["publishing: " + "; ".join(parts), "Redis's CPU time per order published: " + ", ".join(costs)]


def table(r: dict[str, Any]) -> str:
    ceiling_rate = r.get("ceiling_per_s")
    base = r["baseline_per_s"]
    ratios = r["e2e_safety_ratios"]
    safety = statistics.median(ratios)
    no_dedupe = r["e2e_no_dedupe_per_s"] / r["e2e_bare_per_s"]

    rounds = f", median of {len(ratios)}" if len(ratios) > 1 else ""  # of rounds run in turn
    # Above 100% ours overlaps its handlers with its next read, which the loop does not.
    cost = f"they cost {1 - safety:.0%}" if safety < 1 else "no cost measured: ours reads ahead"
    each_round = f" (rounds in turn: {', '.join(f'{ratio:.0%}' for ratio in ratios)})" if rounds else ""

    def row(name: str, value: float) -> str:
        vs_ceiling = f"{value / ceiling_rate:>6.0%}" if ceiling_rate else "     -"
        return f"{name:<62} {value:>12,.0f} {vs_ceiling}  {value / base:>7.1f}x"

    def production_row(name: str, value: float | None) -> list[str]:
        return [] if value is None else [row(name, value)]

    lines = [
        f"bench: {r['date']}, {r['cores']} cores, redis-server {r['redis_version']}, "
        f"batch size {r['batch_size']}",
        f"{'path (orders/s)':<62} {'rate':>12} {'/ceil':>6}  {'/base':>8}",
    ]
    if ceiling_rate:
        lines.append(row(f"ceiling: redis-benchmark XADD -c 8 -P 128{rounds}", ceiling_rate))
    lines += [
        row("baseline: one awaited XADD per order (the seed's style)", base),
        row(f"publish_many: one check per FCALL of {producer.CHUNK}{rounds}", r["publish_per_s"]),
        *production_row(f"publish_many as the producer user{rounds}", r["publish_production_per_s"]),
        row(
            f"per-order id map (the append before): FCALL of {producer.CHUNK}{rounds}",
            r["publish_id_map_per_s"],
        ),
        *production_row(
            f"XADD IDMP: a check per order, FCALL of {producer.CHUNK}{rounds}", r["publish_idmp_per_s"]
        ),
        row("consume: preloaded, 1 consumer per group, both groups", r["consume_per_s"]),
        row("end to end: 2 groups x 1 consumer, all safety on", r["e2e_per_s"]),
        row("end to end: 2 groups x 2 consumers", r["e2e_2x2_per_s"]),
        row(f"end to end: hand-written loop, no safety features{rounds}", r["e2e_bare_per_s"]),
        row(f"end to end: ours again (same size){rounds}", r["e2e_safety_on_per_s"]),
        *production_row(
            "end to end: as the producer and consumer users (same size)", r["e2e_production_per_s"]
        ),
        row("end to end: ours with the dedupe guard off (same size)", r["e2e_no_dedupe_per_s"]),
        row("end to end: transactional handler, stock + outbox (same size)", r["e2e_tx_per_s"]),
        f"a transactional commit (2 staged writes per order per group) costs "
        f"{(1 / r['e2e_tx_per_s'] - 1 / r['e2e_safety_on_per_s']) * 1e6:.1f} us per order end to end "
        f"({r['e2e_tx_per_s'] / r['e2e_safety_on_per_s']:.0%} of the no-op handler's rate)",
        decode_line(r),
        *tracing_lines(r, row),
        *publishing_lines(r),
        f"safety features: ours runs at {safety:.0%} of the hand-written loop's rate "
        f"({cost}){each_round}; without the dedupe guard at {no_dedupe:.0%}",
    ]
    if r["publish_production_per_s"] is None or r["e2e_production_per_s"] is None:
        lines.append(
            "least-privilege users: not measured, REDIS_URL is set (the bench never changes a server's users)"
        )
    else:
        lines.append(
            f"least-privilege users: publish at {r['publish_production_per_s'] / r['publish_per_s']:.0%} of "
            f"the admin's rate, end to end at {r['e2e_production_per_s'] / r['e2e_safety_on_per_s']:.0%}"
        )

    def p99_rounds(prefix: str) -> str:
        rounds = r[f"{prefix}_p99_rounds_ms"]
        return f" (rounds: {', '.join(f'{p99:.2f}' for p99 in rounds)})" if len(rounds) > 1 else ""

    lines += [
        f"latency publish -> ack at 5000/s ({r['latency_rate_per_s']:,.0f}/s reached{rounds}): "
        f"p50 {r['latency_p50_ms']:.2f} ms, p99 {r['latency_p99_ms']:.2f} ms{p99_rounds('latency')}",
        f"  the hand-written loop in the same rounds: p50 {r['latency_bare_p50_ms']:.2f} ms, "
        f"p99 {r['latency_bare_p99_ms']:.2f} ms{p99_rounds('latency_bare')}",
        f"memory: consumer RSS {r['consumer_rss_mb_first']:.1f} MB early -> "
        f"{r['consumer_rss_mb_last']:.1f} MB at the end; redis used_memory "
        f"{r['redis_used_mb']:.0f} MB for {r['redis_entries']:,} entries",
        f"memory per order at steady state ({r['memory_orders']:,} orders of each kind, both groups "
        f"acked, stream trimmed, DEDUPE_WINDOW_MS {r['dedupe_window_ms']}):",
        f"  own orders (publish_many): {r['bytes_per_order_own']:,.1f} bytes each; "
        f"stream {r['stream_length_after_trim_own']:,} entries after trimming",
        f"  foreign orders (plain XADD of data): {r['bytes_per_order_foreign']:,.1f} bytes each "
        f"({r['bytes_per_order_foreign'] / len(GROUPS):,.1f} per group: the guard's done marks); "
        f"stream {r['stream_length_after_trim_foreign']:,} entries after trimming",
        f"  the producer's record of its calls: {r['producer_calls_bytes']:,} bytes for "
        f"{plural(r['producer_calls'], 'call')} (it keeps the last {library.CALLS_KEPT:,})",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m tools.bench",
        description="Measure publish, consume, end-to-end, latency and memory in one run, against "
        "redis-benchmark's XADD (the ceiling) and a one-await-per-order loop (the baseline). Uses "
        "REDIS_URL when it is set (keys bench:* and {bench:*}:*, deleted after), else a throwaway local "
        "redis-server, where it also measures the least-privilege users of redis/users.acl.template.",
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
        help=f"orders for the first end-to-end run (RSS and used_memory sampled; the other end-to-end "
        f"runs take half), at least 1000 (default: {FULL.e2e:,}; "
        f"{QUICK.e2e:,} with --quick)",
    )
    parser.add_argument(
        "--memory-orders",
        type=int,
        metavar="N",
        help=f"orders of each kind for the memory per order at steady state, at least 1000 (default: "
        f"{FULL.memory:,}; {QUICK.memory:,} with --quick)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        metavar="N",
        help="entries per XREADGROUP (default: %(default)s)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="instead: one redis-server against a local cluster of 3 masters (STREAM_PARTITIONS=3), "
        "publish and end to end, with Redis's CPU per order (needs redis-cli; bench_cluster.py)",
    )
    parser.add_argument(
        "--worker",
        choices=["ours", "ours-no-dedupe", "ours-tx", "ours-traced", "ours-timed", "bare", "bare-timed"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    return parser


def sizes_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Sizes:
    """The run's sizes from --quick, --orders and --memory-orders (parser.error on bad ones)."""
    sizes = dataclasses.replace(QUICK if args.quick else FULL)
    if args.orders is not None:
        if args.orders < 1000:
            parser.error("--orders must be at least 1000")
        sizes.e2e = args.orders
    if args.memory_orders is not None:
        if args.memory_orders < 1000:
            parser.error("--memory-orders must be at least 1000")
        sizes.memory = args.memory_orders
    if not 1 <= args.batch_size <= 10_000:
        parser.error("--batch-size must be between 1 and 10000")
    return sizes


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    sizes = sizes_of(parser, args)
    if args.cluster:  # a run of its own (tools/bench_cluster.py, which builds on this module)
        os.execv(sys.executable, [sys.executable, "-m", "tools.bench_cluster", *sys.argv[1:]])
    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        server = start_local_redis("--appendonly", "no")
        url = server.url
    try:
        results = asyncio.run(run(url, sizes, args.batch_size, own_server=server is not None))
    finally:
        if server is not None:
            server.close()
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
