"""A bounded chaos soak on this machine: publish under consumer and Redis crashes, then check every order.

It starts its own redis-server (AOF, appendfsync always) on 127.0.0.1 and real consumer
processes (`python3 -m consumer1`, `python3 -m consumer2`, two of each), publishes orders
while a schedule kills consumers (SIGKILL, restarted under the same or a new name) and
Redis (SIGKILL, restarted from its AOF) and partitions the consumers from Redis (iptables,
inside a network namespace the soak makes for itself), heals, waits until both groups
have nothing pending, and checks per group, from the handlers' own log lines:

  lost                  orders Redis confirmed that a group never handled
  unexpected            orders handled that were never published
  effective duplicates  orders whose handler ran more than once in a group
  raw redeliveries      deliveries beyond the first (handler reruns + duplicates the guard skipped)

and, from Redis itself, the fulfillment service's transactional effects (consumer1 books
stock and appends a shipment event through `tx`, committed with the ack):

  redis_effects_missing    confirmed orders with no shipment event
  redis_effect_duplicates  shipment events beyond one per order

Exit 0 only when lost, unexpected and effective duplicates are all 0; with --redis-effects,
when lost, unexpected and both Redis-side figures are 0 (handlers' log lines are effects
outside Redis, at least once by nature).

With --cluster it runs on a local Redis Cluster of 3 masters with a replica each (AOF always,
cluster-node-timeout 1 s), STREAM_PARTITIONS=3, publishing with PUBLISH_MIN_REPLICAS=1; a Redis
fault is then a master's SIGKILL: its replica takes over, and the killed node is started again
and rejoins as a replica. With --sentinel it runs on a master with 2 replicas under 3 sentinels
(AOF always, down-after-milliseconds 1.5 s), everyone connecting through the sentinels
(REDIS_SENTINELS), publishing with PUBLISH_MIN_REPLICAS=1; a Redis fault is the master's
SIGKILL: the sentinels promote a replica, and the killed server is started again and rejoins
as a replica once they reconfigure it. (No network partitions in either mode.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from config import Settings
from core.keys import keys_for, partitions
from core.replies import text
from orders import Order
from producer import CHUNK, Durability, PublishError, publish_many, sample_orders
from redisPool import make_pool
from status import caught_up
from tools.local_redis import (
    LocalCluster,
    LocalRedis,
    LocalSentinel,
    start_local_cluster,
    start_local_redis,
    start_local_sentinel,
)

STREAM = "orders"
CLUSTER_PARTITIONS = 3
SERVICES = {"fulfillment_group": "consumer1", "email_group": "consumer2"}
EFFECT = {
    "fulfillment_group": re.compile(rb"fulfilling order (\S+):"),
    "email_group": re.compile(rb"sending confirmation e-mail for order (\S+)\n"),
}
SKIPPED = re.compile(rb"order (\S+) already handled in this group")
CONSUMER_ENV = {
    "BATCH_SIZE": "50",
    "BLOCK_MS": "200",
    "SOCKET_TIMEOUT_MS": "1000",
    "CLAIM_IDLE_MS": "1000",
    "RETRY_DELAY_MS": "100",
    "LOG_LEVEL": "INFO",
    "MAINTENANCE_INTERVAL_MS": "0",  # keep every entry: the checker reads the whole stream
}


@dataclass
class Slot:
    """One consumer position: restarted after each kill, under its old name or a new one."""

    group: str
    name: str
    logs: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    generation: int = 0
    log_files: list[Path] = field(default_factory=list)

    async def start(self, url: str, same_name: bool = True) -> None:
        if not same_name:
            self.generation += 1
        name = self.name if self.generation == 0 else f"{self.name}-{self.generation}"
        log_file = self.logs / f"{name}-{len(self.log_files)}.log"
        self.log_files.append(log_file)
        env = {**_base_env(), **CONSUMER_ENV, **self.extra_env, "REDIS_URL": url, "CONSUMER_NAME": name}
        with log_file.open("wb") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", SERVICES[self.group], env=env, stdout=out, stderr=out
            )

    async def stop(self, sig: int) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(sig)
            async with asyncio.timeout(30):
                await self.process.wait()
        self.process = None

    def output(self) -> bytes:
        return b"".join(path.read_bytes() for path in self.log_files if path.exists())


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CONSUMER_"))}


@dataclass
class Ledger:
    """What the producer knows: confirmed orders, and orders whose outcome is unknown."""

    confirmed: dict[str, Order] = field(default_factory=dict)
    unknown: dict[str, Order] = field(default_factory=dict)


@dataclass
class Target:
    """The Redis under test: one server, a local cluster whose partitions are STREAM's, or a master
    under Sentinel."""

    server: LocalRedis | None
    cluster: LocalCluster | None
    sentinel: LocalSentinel | None = None

    @property
    def replicated(self) -> bool:
        """Publishing waits for a replica (PUBLISH_MIN_REPLICAS=1): a failover loses no confirmed order."""
        return self.cluster is not None or self.sentinel is not None

    @property
    def partitions(self) -> int:
        return CLUSTER_PARTITIONS if self.cluster else 1

    @property
    def parts(self) -> list[Settings]:
        """Each partition's keys, as the consumers derive them (keys.py)."""
        env = {
            "STREAM_KEY": STREAM,
            "REDIS_CLUSTER": str(bool(self.cluster)),
            "STREAM_PARTITIONS": str(self.partitions),
        }
        return partitions(Settings.from_env(env))

    async def crash(self, rng: random.Random) -> None:
        """SIGKILL Redis (a master, on a cluster) and bring it back after a while."""
        if self.server is not None:
            self.server.kill()
            await asyncio.sleep(rng.uniform(0.1, 1.0))  # down for a while
            await asyncio.to_thread(self.server.start)
            return
        if self.sentinel is not None:
            local = self.sentinel
            victim = local.server(await asyncio.to_thread(local.master_port))
            victim.kill()
            deadline = time.monotonic() + 60
            while not await asyncio.to_thread(local.failed_over, victim.port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sentinels promoted no replica of {victim.port} within 60 s")
                await asyncio.sleep(0.1)
            await asyncio.to_thread(victim.start)  # the sentinels make it a replica of the new master
            return
        assert self.cluster is not None
        victim = self.cluster.node(rng.choice(await asyncio.to_thread(self.cluster.master_ports)))
        victim.kill()
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(self.cluster.failed_over, victim.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over from {victim.port} within 60 s")
            await asyncio.sleep(0.1)
        await asyncio.to_thread(victim.start)  # rejoins as the new master's replica

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.cluster is not None:
            self.cluster.close()
        if self.sentinel is not None:
            self.sentinel.close()


async def start_target(
    args: argparse.Namespace, options: list[str]
) -> tuple[Target, str, dict[str, str], Redis]:
    """The Redis to soak, the URL consumers use, their extra settings, and an admin client."""
    if args.cluster:
        cluster = await asyncio.to_thread(start_local_cluster, 3, 1, 1000, *options)
        env = {"REDIS_CLUSTER": "true", "STREAM_PARTITIONS": str(CLUSTER_PARTITIONS)}
        client = RedisCluster.from_url(cluster.url, socket_timeout=5, socket_connect_timeout=2)
        return Target(None, cluster), cluster.url, env, client  # type: ignore[return-value]  # same methods
    if args.sentinel:
        sentinel = await asyncio.to_thread(start_local_sentinel, 2, 3, 1500, *options)
        env = {"REDIS_SENTINELS": sentinel.addresses, "REDIS_SENTINEL_MASTER": sentinel.name}
        # REDIS_URL's host is not used: the sentinels name the master.
        url = sentinel.servers[0].url
        pool = make_pool(Settings.from_env({"REDIS_URL": url, **env, "SOCKET_TIMEOUT_MS": "5000"}))
        return Target(None, None, sentinel), url, env, Redis.from_pool(pool)
    if args.partitions:
        options = [*options, "--bind", f"127.0.0.1 {CONSUMER_HOST}"]
    server = start_local_redis(*options)
    consumer_url = server.url.replace("127.0.0.1", CONSUMER_HOST) if args.partitions else server.url
    return (
        Target(server, None),
        consumer_url,
        {},
        Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=2),
    )


async def produce(redis: Redis, total: int, seconds: float, ledger: Ledger, target: Target) -> None:
    """Publish `total` orders evenly over about `seconds`; after a failure, retry what is unknown."""
    backlog = sample_orders(total)
    per_second = total / seconds
    started = time.monotonic()
    while backlog:
        sent = len(ledger.confirmed) + len(ledger.unknown)
        await asyncio.sleep(max(0.0, started + sent / per_second - time.monotonic()))
        chunk, backlog = backlog[: 4 * CHUNK], backlog[4 * CHUNK :]
        try:
            durability = Durability(replicas=1, patience_s=30) if target.replicated else Durability()
            await publish_many(redis, STREAM, chunk, partitions=target.partitions, durability=durability)
            confirmed = chunk
        except PublishError as error:
            confirmed = chunk[: error.published]
            unsure = chunk[error.published :]
            for order in unsure:
                ledger.unknown[order.order_id] = order
            backlog = unsure + backlog  # republish: a second copy is the dedupe guard's job
            await _reconnect(redis)
        for order in confirmed:
            ledger.confirmed[order.order_id] = order
            ledger.unknown.pop(order.order_id, None)


async def _reconnect(redis: Redis) -> None:
    if not isinstance(redis, RedisCluster):
        await redis.connection_pool.disconnect()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await redis.ping()
            return
        await asyncio.sleep(0.1)


async def inflict(slots: list[Slot], target: Target, url: str, args: argparse.Namespace) -> Counter[str]:
    """Spread the consumer kills, Redis restarts and partitions over about `args.seconds`."""
    rng = random.Random(args.seed)
    schedule = ["consumer"] * args.consumer_kills + ["redis"] * args.redis_restarts
    schedule += ["partition"] * args.partitions
    rng.shuffle(schedule)
    done: Counter[str] = Counter()
    for fault in schedule:
        await asyncio.sleep(rng.uniform(0.3, 1.7) * args.seconds / max(len(schedule), 1))
        if fault == "redis":
            await target.crash(rng)
        elif fault == "partition":
            await partition(True)
            await asyncio.sleep(rng.uniform(1.0, 4.0))  # cut off for a while
            await partition(False)
        else:
            slot = rng.choice(slots)
            await slot.stop(signal.SIGKILL)
            await slot.start(url, same_name=rng.random() < 0.5)
        done[fault] += 1
    return done


# Partitions: in a network namespace of its own, Redis also listens on 127.0.0.2, the
# address the consumers use; dropping that address's traffic cuts them off, not the producer.
CONSUMER_HOST = "127.0.0.2"
PARTITION_RULES = [["INPUT", "-d", CONSUMER_HOST, "-p", "tcp", "-j", "DROP"]]
PARTITION_RULES += [["OUTPUT", "-s", CONSUMER_HOST, "-p", "tcp", "-j", "DROP"]]
IN_NAMESPACE = "CHAOS_IN_NAMESPACE"


async def partition(cut: bool) -> None:
    for rule in PARTITION_RULES:
        process = await asyncio.create_subprocess_exec("iptables", "-A" if cut else "-D", *rule)
        if await process.wait() != 0:
            raise RuntimeError("iptables failed")


def can_partition() -> bool:
    """Root with unshare, ip and iptables: then the soak can run in a network namespace of its own."""
    if not all(shutil.which(tool) for tool in ("unshare", "ip", "iptables")):
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10, check=False)
    return probe.returncode == 0


async def settled(redis: Redis, target: Target) -> bool:
    """Both groups caught up on every partition; False while Redis is still coming back."""
    try:
        return all([await caught_up(redis, part.stream_key, SERVICES) for part in target.parts])
    except (RedisError, RedisClusterException, OSError):
        return False


def figures(slots: list[Slot], ledger: Ledger) -> dict[str, int]:
    attempted = set(ledger.confirmed) | set(ledger.unknown)
    result = Counter[str]()
    for group in SERVICES:
        output = b"".join(s.output() for s in slots if s.group == group)
        ran = Counter(match.decode() for match in EFFECT[group].findall(output))
        skipped = len(SKIPPED.findall(output))
        result["lost"] += len(set(ledger.confirmed) - set(ran))
        result["unexpected"] += len(set(ran) - attempted)
        reruns = sum(n - 1 for n in ran.values())
        result["effective_duplicates"] += reruns
        result["raw_redeliveries"] += reruns + skipped
    return dict(result)


async def soak(args: argparse.Namespace) -> int:
    """The soak, its consumers' log files in a temporary directory removed on every way out.

    SIGTERM and SIGHUP stop it as SIGINT does: its consumers and server are stopped and its
    directories removed before it exits (128 + the signal).
    """
    task = asyncio.current_task()
    assert task is not None
    stopped_by: list[int] = []

    def stop(signum: int) -> None:
        stopped_by.append(signum)
        task.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop, signum)
    try:
        with tempfile.TemporaryDirectory(prefix="chaos-") as logs:
            return await _soak(args, Path(logs))
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        print(f"chaos: stopped by {signal.Signals(stopped_by[0]).name}", file=sys.stderr)
        return 128 + stopped_by[0]


async def _soak(args: argparse.Namespace, logs: Path) -> int:
    started = time.monotonic()
    options = ["--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction"]
    target, consumer_url, extra_env, redis = await start_target(args, options)
    slots = [
        Slot(group, f"{SERVICES[group]}-{n}", logs, extra_env)
        for group in SERVICES
        for n in range(args.consumers_per_group)
    ]
    ledger = Ledger()
    try:
        for slot in slots:
            await slot.start(consumer_url)
        producer = asyncio.create_task(produce(redis, args.orders, args.seconds, ledger, target))
        faults = await inflict(slots, target, consumer_url, args)
        await producer
        deadline = time.monotonic() + args.settle_timeout
        while not await settled(redis, target):
            if time.monotonic() > deadline:
                print(f"chaos: the groups did not settle within {args.settle_timeout:.0f}s", file=sys.stderr)
                break
            await asyncio.sleep(0.2)
        dead_lettered = sum([int(await redis.xlen(part.dead_letter_stream)) for part in target.parts])
        shipped: Counter[str] = Counter()
        for part in target.parts:  # consumer1's outbox, tx.key("shipments") in each partition
            shipped += await shipments(redis, f"{keys_for(part).tag}:shipments")
        for slot in slots:
            await slot.stop(signal.SIGTERM)
    finally:
        for slot in slots:
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                await slot.stop(signal.SIGKILL)
        await redis.aclose()
        target.close()
    result = figures(slots, ledger)
    missing = len(set(ledger.confirmed) - set(shipped))
    extra = sum(n - 1 for n in shipped.values())
    print(
        f"chaos: published={len(ledger.confirmed)} unknown={len(ledger.unknown)} lost={result['lost']} "
        f"unexpected={result['unexpected']} effective_duplicates={result['effective_duplicates']} "
        f"raw_redeliveries={result['raw_redeliveries']} dead_lettered={dead_lettered} "
        f"consumer_kills={faults['consumer']} redis_restarts={faults['redis']} "
        f"partitions={faults['partition']} redis_effects_missing={missing} redis_effect_duplicates={extra} "
        f"wall={time.monotonic() - started:.1f}s"
    )
    if args.redis_effects:
        clean = result["lost"] == result["unexpected"] == missing == extra == 0
    else:
        clean = result["lost"] == result["unexpected"] == result["effective_duplicates"] == 0
    return 0 if clean else 1


async def shipments(redis: Redis, outbox: str) -> Counter[str]:
    """Shipment events per order id in consumer1's outbox, read in pages."""
    counts: Counter[str] = Counter()
    start = "-"
    for _ in range(100_000):  # bounded: a page of 1000 per round
        page: Any = await redis.xrange(outbox, min=start, count=1000)
        for entry_id, fields in page:
            counts[text(fields[b"order_id"])] += 1
            start = "(" + text(entry_id)
        if len(page) < 1000:
            break
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m tools.chaos",
        description="Publish orders while killing consumers and Redis on this machine (a redis-server "
        "of its own on 127.0.0.1), then check that no order was lost, invented or handled twice. "
        "Prints one line of figures; exit 0 only when lost, unexpected and duplicates are 0.",
    )
    parser.add_argument(
        "--orders", type=int, default=100_000, metavar="N", help="orders to publish (default: %(default)s)"
    )
    parser.add_argument(
        "--redis-effects",
        action="store_true",
        help="judge the Redis-side effects (exactly once) instead of the handlers' log lines "
        "(at least once) (default: off)",
    )
    parser.add_argument(
        "--consumer-kills", type=int, default=20, metavar="N", help="consumer SIGKILLs (default: %(default)s)"
    )
    parser.add_argument(
        "--redis-restarts",
        type=int,
        default=3,
        metavar="N",
        help="Redis SIGKILL+restarts (default: %(default)s)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=3,
        metavar="N",
        help="consumer-Redis partitions of 1-4 s (default: %(default)s); needs root, unshare and "
        "iptables, and runs the soak in a network namespace of its own",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="on a local Redis Cluster (3 masters, a replica each, STREAM_PARTITIONS=3, durable "
        "publish); a Redis fault kills a master (default: one redis-server)",
    )
    parser.add_argument(
        "--sentinel",
        action="store_true",
        help="on a local master with 2 replicas under 3 sentinels (REDIS_SENTINELS, durable publish); "
        "a Redis fault kills the master (default: one redis-server)",
    )
    parser.add_argument(
        "--consumers-per-group",
        type=int,
        default=2,
        metavar="N",
        help="consumer processes per group (default: %(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="spread the faults over about this many seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="at the end, wait at most this many seconds for both groups to finish (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        metavar="N",
        help="random seed for the fault schedule (default: %(default)s)",
    )
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    numbers = (args.orders, args.consumer_kills, args.redis_restarts, args.consumers_per_group - 1)
    if any(n < 0 for n in numbers) or args.seconds <= 0 or args.settle_timeout <= 0:
        parser.error("counts must be 0 or more, --consumers-per-group at least 1, times above 0")
    if args.cluster and args.sentinel:
        parser.error("--cluster and --sentinel exclude each other")
    if (args.cluster or args.sentinel) and args.partitions:
        print("chaos: partitions skipped: not with --cluster or --sentinel", file=sys.stderr)
        args.partitions = 0
    if args.partitions and not os.environ.get(IN_NAMESPACE):
        if can_partition():  # start again inside a network namespace of our own
            command = ["unshare", "-n", sys.executable, "-m", "tools.chaos", *sys.argv[1:]]
            os.execvpe("unshare", command, {**os.environ, IN_NAMESPACE: "1"})
        print("chaos: partitions skipped: they need root, unshare, ip and iptables", file=sys.stderr)
        args.partitions = 0
    if args.partitions:  # a new namespace starts with its loopback down
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    try:
        sys.exit(asyncio.run(soak(args)))
    except FileNotFoundError as error:  # no redis-server
        print(f"chaos: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
