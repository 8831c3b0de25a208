"""`python3 -m tools.bench --cluster`: one Redis against a 3-master Redis Cluster, same settings, one run.

Both are throwaway servers on loopback started here: a redis-server, and a cluster of three
(`local_redis.start_local_cluster`) with STREAM_PARTITIONS=3, one partition per master. It
measures publish_many and end to end (both groups, one consumer process each, every safety
feature on) on each, and what Redis itself spends per order: the CPU seconds of each
redis-server per 1,000 orders (INFO cpu, before and after the end-to-end run). On a machine
with fewer cores than shards plus clients the shards share the CPU, so the cluster's rate here
says little; Redis's CPU per order does, and from it the rate N shards could carry on N+ free
cores is projected (a projection: the clients then need cores too).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster

import producer
from config import Settings
from core.keys import partition_stream, partitions
from redisPool import redis_connect
from status import caught_up
from tools import bench
from tools.local_redis import start_local_cluster, start_local_redis

SHARDS = 3


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    settings: Settings
    servers: list[Redis]  # each redis-server taking part, for INFO cpu
    ports: list[int]


def settings_for(url: str, batch: int, cluster: bool, stream: str = bench.STREAM) -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": url,
            "STREAM_KEY": stream,
            "CONSUMER_GROUPS": ",".join(bench.GROUPS),
            "BLOCK_MS": "100",
            "BATCH_SIZE": str(batch),
            "REDIS_CLUSTER": "true" if cluster else "false",
            "STREAM_PARTITIONS": str(SHARDS if cluster else 1),
            "REDIS_MAX_CONNECTIONS": "16",
        }
    )


async def cpu_seconds(servers: Sequence[Redis]) -> list[float]:
    """used_cpu_user + used_cpu_sys of each server (its main thread and the rest)."""
    readings = []
    for server in servers:
        info = await server.info("cpu")
        readings.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
    return readings


async def all_caught_up(redis: Redis, settings: Settings) -> bool:
    return all([await caught_up(redis, part.stream_key, bench.GROUPS) for part in partitions(settings)])


async def lengths(redis: Redis, settings: Settings) -> list[int]:
    return [int(await redis.xlen(part.stream_key)) for part in partitions(settings)]


async def measure(setup: Setup, sizes: bench.Sizes) -> dict[str, Any]:
    """publish_many's rate (median of `repeat`), then end to end with Redis's CPU per shard."""
    settings = setup.settings
    count = settings.stream_partitions
    async with redis_connect(settings) as redis:
        runs = []
        for _ in range(sizes.repeat):
            await bench.reset(redis, settings)
            orders = bench.bench_orders(sizes.publish)
            started = time.perf_counter()
            await producer.publish_many(redis, settings.stream_key, orders, partitions=count)
            runs.append(bench.rate(len(orders), time.perf_counter() - started))
        await bench.reset(redis, settings)
        orders = bench.bench_orders(sizes.e2e)
        async with bench.workers(redis, settings, "ours", 1):
            before = await cpu_seconds(setup.servers)
            started = time.perf_counter()
            await producer.publish_many(redis, settings.stream_key, orders, partitions=count)
            deadline = time.monotonic() + 600
            while not await all_caught_up(redis, settings):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{setup.name}: the groups did not finish {len(orders)} orders")
                await asyncio.sleep(0.01)
            finished = time.perf_counter()
            after = await cpu_seconds(setup.servers)
        shares = await lengths(redis, settings)
        await bench.forget(redis, settings)
        by_shard = [sum(shares)]
        if settings.redis_cluster:  # each shard's orders: those of the partitions it is the master of
            owners = [_port_of(redis, part.stream_key) for part in partitions(settings)]
            by_shard = [
                sum(n for n, port in zip(shares, owners, strict=True) if port == own) for own in setup.ports
            ]
    cpu = [end - start for start, end in zip(before, after, strict=True)]
    per_shard = [orders_ / spent if spent else 0.0 for orders_, spent in zip(by_shard, cpu, strict=True)]
    return {
        "publish_per_s": statistics.median(runs),
        "e2e_per_s": bench.rate(len(orders), finished - started),
        "redis_cpu_s_per_1000_orders": [
            spent / (n / 1000) if n else None for spent, n in zip(cpu, by_shard, strict=True)
        ],
        "orders_per_redis_cpu_s": per_shard,
        "orders_per_shard": by_shard,
        "redis_cpu_s": cpu,
    }


def _port_of(redis: Redis, key: str) -> int:
    node = cast(RedisCluster, redis).get_node_from_key(key)
    assert node is not None, f"no master serves {key}"
    return int(node.port)


async def spread_stream(url: str) -> str:
    """A bench stream name whose SHARDS partitions land on SHARDS different masters.

    Where a partition lives is its hash slot's master: with as many partitions as masters, some
    names put two on one master. Production sets STREAM_PARTITIONS to a few times the masters.
    """
    cluster = await RedisCluster.from_url(url).initialize()
    try:
        for suffix in range(1000):
            name = f"{bench.STREAM}{suffix or ''}"
            owners = {
                _port_of(cast(Redis, cluster), partition_stream(name, i, SHARDS)) for i in range(SHARDS)
            }
            if len(owners) == SHARDS:
                return name
    finally:
        await cluster.aclose()
    raise RuntimeError("no bench stream name spreads over every master")


async def run(sizes: bench.Sizes, batch: int) -> dict[str, Any]:
    single = start_local_redis("--appendonly", "no")
    cluster = start_local_cluster(SHARDS, 0, 5000, "--appendonly", "no")
    nodes = [Redis.from_url(node.url) for node in cluster.nodes]
    alone = Redis.from_url(single.url)
    try:
        bench.progress(
            f"one redis-server: publish {sizes.publish:,} x{sizes.repeat}, end to end {sizes.e2e:,}"
        )
        one = await measure(
            Setup("one Redis", settings_for(single.url, batch, False), [alone], [single.port]), sizes
        )
        bench.progress(f"cluster of {SHARDS} masters, STREAM_PARTITIONS={SHARDS}: the same")
        many = await measure(
            Setup(
                "cluster",
                settings_for(cluster.url, batch, True, await spread_stream(cluster.url)),
                nodes,
                cluster.ports,
            ),
            sizes,
        )
    finally:
        for client in (*nodes, alone):
            await client.aclose()
        cluster.close()
        single.close()
    # Redis's work per order over the whole cluster: every order through every shard's CPU.
    per_shard = sum(many["orders_per_shard"]) / sum(many["redis_cpu_s"])
    return {
        "date": datetime.now(UTC).date().isoformat(),
        "shards": SHARDS,
        "single": one,
        "cluster": many,
        "shard_vs_single": per_shard / one["orders_per_redis_cpu_s"][0],
        "projected_per_s": {n: n * per_shard for n in (1, SHARDS, 6)},
    }


def table(r: dict[str, Any]) -> str:
    one, many = r["single"], r["cluster"]
    cpu_one = one["redis_cpu_s_per_1000_orders"][0]
    cpu_many = ", ".join(
        f"{value:.3f}" if value is not None else "-" for value in many["redis_cpu_s_per_1000_orders"]
    )
    return "\n".join(
        [
            f"bench --cluster: {r['date']}, one redis-server vs a cluster of {r['shards']} masters "
            f"(STREAM_PARTITIONS={r['shards']}), both groups, one consumer process each",
            f"{'':<44}{'one Redis':>14}{'cluster':>14}",
            f"{'publish_many (orders/s)':<44}{one['publish_per_s']:>14,.0f}{many['publish_per_s']:>14,.0f}",
            f"{'end to end, safety on (orders/s)':<44}{one['e2e_per_s']:>14,.0f}{many['e2e_per_s']:>14,.0f}",
            f"redis CPU per 1,000 orders end to end: one Redis {cpu_one:.3f} s; each shard {cpu_many} s",
            f"orders per redis CPU second: one Redis {one['orders_per_redis_cpu_s'][0]:,.0f}, a shard "
            f"{r['projected_per_s'][1]:,.0f} ({r['shard_vs_single']:.0%} of one Redis)",
            "projected (Redis side only, each shard on a free core, clients elsewhere): "
            + ", ".join(
                f"{n} shard{'s' if n > 1 else ''} {rate:,.0f}/s" for n, rate in r["projected_per_s"].items()
            ),
            "the cluster's own rate above shares this machine's cores among shards and clients: "
            "compare CPU per order, not those rates",
        ]
    )


def main(sizes: bench.Sizes, batch: int, as_json: bool) -> None:
    results = asyncio.run(run(sizes, batch))
    print(json.dumps(results, indent=2) if as_json else table(results))


def build_parser() -> argparse.ArgumentParser:
    """bench's options: `python3 -m tools.bench --cluster` runs this module with them."""
    return bench.build_parser()


def cli() -> None:
    """`python3 -m tools.bench --cluster` (bench's options; at most 200,000 orders end to end)."""
    parser = build_parser()
    args = parser.parse_args()
    sizes = bench.sizes_of(parser, args)
    main(dataclasses.replace(sizes, e2e=min(sizes.e2e, 200_000)), args.batch_size, args.json)


if __name__ == "__main__":
    cli()
