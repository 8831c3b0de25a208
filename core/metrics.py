"""Prometheus metrics for a consumer process, served on METRICS_PORT when it is set.

Counters are read from the consumer's Stats when Prometheus scrapes, so they cost nothing on
the hot path; lag, pending and dead-letter gauges are refreshed from Redis every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from config import DEFAULTS, Settings
from core.handlers import TxHandler
from core.keys import partitions
from core.lag import group_lags
from core.sentinel import master_address
from core.stats import Stats
from orders import Order
from tx import Tx

REFRESH_S = 5.0

HANDLER_SECONDS = Histogram(
    "orders_handler_seconds",
    "Time the handler took per order.",
    ["group"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

COUNTERS = {
    "processed": "Orders the handler accepted (then acked).",
    "failed": "Handler failures (each leaves the order pending for a retry).",
    "dead_lettered": "Entries moved to the dead-letter stream.",
    "reclaimed": "Entries claimed from consumers that held them too long.",
    "deleted_skipped": "Pending entries found deleted or trimmed, acked and skipped.",
    "duplicates_skipped": "Copies of orders done or being run, acked without a run (the dedupe guard).",
    "taken_over": "Commits dropped: another consumer had taken the entry over (this one was cut off).",
}


class ConsumerCollector(Collector):
    """Exposes one consumer's Stats and the latest group gauges."""

    def __init__(self, stats: Stats, group: str, consumer: str) -> None:
        self.stats, self.group, self.consumer = stats, group, consumer
        self.lag: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.per_partition: dict[tuple[str, str], tuple[int, int]] = {}  # (group, stream): (lag, pending)
        self.dead_letters = 0
        self.master: tuple[str, str] | None = None  # through Sentinel: its name and address
        self.server: WSGIServer | None = None

    def close(self) -> None:
        """Stop serving and forget these metrics (a process serves them until it exits otherwise)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        REGISTRY.unregister(self)

    def collect(self) -> Iterator[Metric]:
        labels = [self.group, self.consumer]
        for name, text in COUNTERS.items():
            counter = CounterMetricFamily(f"orders_{name}", text, labels=["group", "consumer"])
            counter.add_metric(labels, getattr(self.stats, name))
            yield counter
        lag = GaugeMetricFamily(
            "orders_group_lag", "Entries not yet delivered to the group.", labels=["group"]
        )
        pending = GaugeMetricFamily(
            "orders_group_pending", "Entries delivered, not yet acked.", labels=["group"]
        )
        for group, value in self.lag.items():
            lag.add_metric([group], value)
        for group, value in self.pending.items():
            pending.add_metric([group], value)
        yield lag
        yield pending
        if self.per_partition:
            partition_lag = GaugeMetricFamily(
                "orders_partition_lag",
                "Entries of a partition not yet delivered.",
                labels=["group", "partition"],
            )
            partition_pending = GaugeMetricFamily(
                "orders_partition_pending", "Entries of a partition delivered, not yet acked.",
                labels=["group", "partition"],
            )  # fmt: skip
            for (group, stream), (lag_value, pending_value) in self.per_partition.items():
                partition_lag.add_metric([group, stream], lag_value)
                partition_pending.add_metric([group, stream], pending_value)
            yield partition_lag
            yield partition_pending
        yield GaugeMetricFamily(
            "orders_dead_letter_length", "Entries in the dead-letter stream.", self.dead_letters
        )
        if self.master is not None:
            master = GaugeMetricFamily(
                "orders_redis_master", "The master in use, as Redis Sentinel names it (always 1).",
                labels=["name", "address"],
            )  # fmt: skip
            master.add_metric(list(self.master), 1)
            yield master
        waiting = GaugeMetricFamily(
            "orders_retry_waiting",
            "Entries this consumer holds waiting for a retry.",
            labels=["group", "consumer"],
        )
        waiting.add_metric(labels, self.stats.waiting)
        yield waiting
        oldest = GaugeMetricFamily(
            "orders_retry_oldest_seconds",
            "How long the entry waiting longest for its retry has waited since its first failure.",
            labels=["group", "consumer"],
        )
        oldest.add_metric(labels, self.stats.oldest_wait_s)
        yield oldest

    async def refresh(self, redis: Redis, settings: Settings) -> None:
        """Lag and pending per group, summed over the partitions (and per partition when partitioned)."""
        per_partition: dict[tuple[str, str], tuple[int, int]] = {}
        dead_letters = 0
        for part in partitions(settings):
            # The lag status shows (core/lag.py), not XINFO GROUPS' own, which can be wrong or NULL.
            for name, g in (await group_lags(redis, part.stream_key)).items():
                per_partition[name, part.stream_key] = (g.lag, g.pending)
            dead_letters += int(await redis.xlen(part.dead_letter_stream))
        self.lag, self.pending = {}, {}
        for (group, _), (lag, pending) in per_partition.items():
            self.lag[group] = self.lag.get(group, 0) + lag
            self.pending[group] = self.pending.get(group, 0) + pending
        self.per_partition = per_partition if settings.partitioned else {}
        self.dead_letters = dead_letters
        address = await master_address(redis)
        self.master = None if address is None else (settings.redis_sentinel_master, address)


def timed(handler: TxHandler, group: str) -> TxHandler:
    """The handler, with its duration observed in the histogram."""
    observe = HANDLER_SECONDS.labels(group).observe

    async def handle(order: Order, tx: Tx) -> None:
        started = time.perf_counter()
        try:
            await handler(order, tx)
        finally:
            observe(time.perf_counter() - started)

    return handle


def start(
    port: int, stats: Stats, group: str, consumer: str, host: str = DEFAULTS["METRICS_HOST"]
) -> ConsumerCollector:
    """Serve /metrics on `host`:`port` (METRICS_HOST: 127.0.0.1 unless set) and return the collector."""
    collector = ConsumerCollector(stats, group, consumer)
    REGISTRY.register(collector)
    try:
        collector.server, _ = start_http_server(port, addr=host)
    except OSError:
        REGISTRY.unregister(collector)  # a retry (another port, another host) must not collide
        raise
    return collector


async def refresh_forever(collector: ConsumerCollector, redis: Redis, settings: Settings) -> None:
    """Keep the gauges fresh until cancelled; Redis trouble leaves the last values in place."""
    while True:
        with contextlib.suppress(RedisError):
            await collector.refresh(redis, settings)
        await asyncio.sleep(REFRESH_S)
