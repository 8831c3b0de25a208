"""The consumer loop every service shares: at-least-once, acks only what the handler accepted.

An entry's way, read top-down in `StreamConsumer.turn`: the schedule says what is due (its own
pending entries after a start or a failure, retries, the sweep of consumers that are gone,
maintenance, else new entries); the reader delivers a batch (core/reading.py), the handling
screens, admits and runs it (core/handling.py), and the ledger commits what it settled in one
fenced step, usually sent with the next read (core/ledger.py). Under a backlog the next batch is
read while this one runs. Redis failures go to core/recovery.py; the lease that keeps this
consumer's name and work its own runs in a process of its own (core/lease.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from config import CliError, ConfigError, Settings, run_script
from core import health, library, metrics
from core.capabilities import detect
from core.groups import GroupWouldReplay, ensure_groups
from core.handlers import AnyHandler, Handler, Reject, TxHandler, plain_of, with_tx
from core.handling import Handling
from core.keys import keys_for, partitions
from core.lease import Lease, Part
from core.ledger import Ledger
from core.library import Fence, LibraryMissing
from core.messages import Schema
from core.reading import Batch, Reader
from core.reclaim import Reclaim
from core.recovery import Recovery
from core.schedule import Schedule, Work, schedule_text
from core.stats import Stats
from maintenance import run_once
from orders import ORDERS
from redisPool import StoppedBeforeStart, is_cluster, raw_xreadgroup, redis_connect

__all__ = [
    "AnyHandler",
    "Handler",
    "Hooks",
    "Reject",
    "Stats",
    "StreamConsumer",
    "TxHandler",
    "consume",
    "plain_of",
    "run_service",
    "serve",
    "with_tx",
]

log = logging.getLogger("stream_consumer")


@dataclass
class Hooks:
    """Where the benchmark, the metrics and the tests look in, without reaching into the loop."""

    read: Callable[[Batch], Awaitable[None]] | None = None  # each batch read, before it is handled
    committed: Callable[[int], None] | None = None  # how many entries each commit settled
    turned: Callable[[], None] | None = None  # each turn of the loop (a health probe's heartbeat)
    answered: Callable[[], None] | None = None  # Redis replied (a health probe's readiness)


@dataclass
class StreamConsumer:
    """One consumer of one group on one stream (or partition); `run()` loops until `stop` is set."""

    redis: Redis
    settings: Settings
    group: str
    name: str
    handler: AnyHandler
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stats: Stats = field(default_factory=Stats)
    hooks: Hooks = field(default_factory=Hooks)
    lease: Lease | None = None  # taken by consume() for every partition; else run() takes its own
    schema: Schema[Any] = ORDERS  # the message type the handler takes (core/messages.py)
    maintenance_refused: bool = field(default=False, init=False)  # said once: trimming is the admin's
    reported: tuple[int, bool] | None = field(default=None, init=False)  # the state last said in Redis
    peers_missing_said: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        keys = keys_for(self.settings)
        self.fence = Fence(self.redis, keys, self.group, self.name, self.settings.dedupe_window_ms)
        self.schedule = Schedule(self.settings)
        self.ledger = Ledger(self.fence, self.schedule, self.stats, self._name_taken, self.hooks.committed)
        self.recovery = Recovery(
            f"group {self.group} on stream {keys.stream}",
            self.stop,
            self._after_failure,
            self._make_groups,
            self._load_library,
        )
        self.reader = Reader(
            self.redis, self.settings, self.fence, self.ledger, self.schedule, self.stats, self._answered
        )
        self.reader.one_trip = not is_cluster(self.redis)  # on a cluster one command at a time: failovers
        self.reclaim = Reclaim(self.redis, self.settings, self.fence, self.schedule, self.stats)
        self.handling = Handling(
            self.settings, self.fence, self.handler, self.ledger, self.schedule, self.stats, self.schema
        )

    async def run(self) -> Stats:
        """Consume until `stop` is set; the batches in hand are finished and committed before returning."""
        log.info(
            "consumer %s in group %s on stream %s started", self.name, self.group, self.fence.keys.stream
        )
        while not self.stop.is_set() and not await self.recovery.attempt(self._start()):
            pass  # an outage (a failover) at start is ridden out like any other
        if self.lease is None:  # alone, not through consume()
            self.lease = Lease(self.redis, self.settings, [part_of(self)], self.stop)
            self.lease.dropped = self.stats.count_deleted
            while not self.stop.is_set() and not await self.recovery.attempt(self.lease.take()):
                pass
            if not self.stop.is_set():
                async with self.lease:
                    await self._loop()
        else:
            await self._loop()
        log.info("consumer %s in group %s stopped: %s", self.name, self.group, self.stats)
        return self.stats

    async def _loop(self) -> None:
        assert self.lease is not None
        self.fence.token = self.lease.token
        while not self.stop.is_set():
            await self.recovery.attempt(self.turn())
        await self.recovery.attempt(self.ledger.commit())

    async def turn(self) -> None:
        """One turn: the work due, else new entries, from read to commit."""
        work = self.schedule.due()
        if work is Work.NEW:
            await self._new()
        else:
            await self.ledger.commit()  # what is done is committed before anything is read again
            if work is Work.OWN:
                await self._handle(await self.reader.own())
            elif work is Work.RETRY:
                await self._handle(
                    await self.reader.retries(self.schedule.due_retries(self.settings.batch_size))
                )
            elif work is Work.PROBE:
                await self._handle(await self.reader.probe())
            elif work is Work.SWEEP:
                await self._handle(await self.reclaim.sweep())
            elif work is Work.MAINTAIN:
                await self._maintain()
            else:  # Work.WAIT: a downstream outage, nothing due before the next probe
                await self.schedule.wait(self.stop)
        report = (len(self.schedule.waiting), self.schedule.in_outage)
        self.stats.waits[self.fence.keys.stream] = (report[0], self.schedule.oldest_wait_s())
        if report != self.reported or work is Work.SWEEP:
            await self._report(report)
        if self.hooks.turned is not None:
            self.hooks.turned()

    async def _report(self, report: tuple[int, bool]) -> None:
        """Say in Redis what status and the dashboard show of this consumer: entries waiting for a
        retry, the oldest one's wait, an outage. Refused (a full Redis), it says it later."""
        state = {
            "waiting": report[0],
            "oldest_wait_s": round(self.schedule.oldest_wait_s(), 1),
            "outage_s": round(self.schedule.outage_s(), 1) if report[1] else None,
            "schedule": schedule_text(self.settings),
        }
        ttl_ms = max(self.settings.claim_idle_ms * 2, 10_000)
        try:
            await self.redis.set(self.fence.keys.state(self.group, self.name), json.dumps(state), px=ttl_ms)
        except ResponseError:
            return
        self.reported = report

    async def _new(self) -> None:
        """New entries; under a backlog the next batch is read while this one's handlers run."""
        batch = await self.reader.new(self.schedule.block_ms())
        while (
            batch.full and self.reader.one_trip and not self.stop.is_set() and self.schedule.due() is Work.NEW
        ):
            if self.hooks.read is not None:
                await self.hooks.read(batch)
            batch = await self.reader.new_while(self.handling.handle, batch)
        await self._handle(batch)

    async def _handle(self, batch: Batch) -> None:
        if self.hooks.read is not None:
            await self.hooks.read(batch)
        await self.handling.handle(batch)

    # --- starting, recovering, housekeeping -------------------------------------------------

    async def _start(self) -> None:
        """Load the function library if this user may (if not, the process ends: CliError), pick the
        read this server offers, and make sure every configured group exists."""
        try:
            await library.ensure_loaded(self.redis)
        except LibraryMissing as error:
            raise CliError(str(error)) from None
        self.reader.claim_on_read = (await detect(self.redis)).readgroup_claim
        raw_xreadgroup(self.redis)
        await self._make_groups()

    async def _make_groups(self) -> None:
        """Every configured group exists on a new (or flushed) stream; on a stream in use, a missing
        group is the operator's to create with a start (core/groups.py): this consumer stops if its
        own is missing there (GroupWouldReplay, exit 2), and leaves its peers' to them."""
        stream = self.fence.keys.stream
        try:
            created = await ensure_groups(self.redis, stream, (*self.settings.groups, self.group))
        except GroupWouldReplay as error:
            if self.group in error.missing:
                raise
            if not self.peers_missing_said:
                log.warning(
                    "configured groups %s are missing on stream %s, which is in use; trimming waits "
                    "for them (create them with python3 -m initialization_stream --start new or 0)",
                    ", ".join(error.missing),
                    stream,
                )
                self.peers_missing_said = True
            return
        if created:
            log.info("created missing groups %s on stream %s from id 0", ", ".join(created), stream)

    async def _load_library(self) -> None:
        await library.ensure_loaded(self.redis)

    def _after_failure(self) -> None:
        """A Redis failure may have lost replies: its own entries are read again, and nothing read is
        handled while Redis may be away."""
        self.schedule.own_due = True
        self.ledger.lost()

    def _name_taken(self) -> None:
        """A commit found this consumer's name held by another process: stop, commit nothing more."""
        log.error(
            "another process now uses CONSUMER_NAME %r; stopping, nothing more is committed by this one",
            self.name,
        )
        if self.lease is not None:
            self.lease.lost.set()
        self.stop.set()

    def _answered(self) -> None:
        self.recovery.answered()
        if self.hooks.answered is not None:
            self.hooks.answered()

    async def _maintain(self) -> None:
        """Trim what every group acked and drop stale consumers; a refusal never stops consumption."""
        self.schedule.maintained()
        await self._make_groups()
        try:
            await run_once(self.redis, self.settings, await detect(self.redis))
        except ResponseError as error:
            if not self.maintenance_refused:
                log.warning("maintenance skipped: Redis refused it (%s); consumption goes on", error)
                self.maintenance_refused = True


def part_of(consumer: StreamConsumer) -> Part:
    """The lease part of one partition's consumer; on Redis 8.4+ its keeper also touches what it holds."""
    keys = consumer.fence.keys
    touch = (keys.stream, consumer.group, consumer.name) if consumer.reader.claim_on_read else None
    return Part(keys.lease(consumer.group, consumer.name), touch)


async def consume(
    redis: Redis,
    settings: Settings,
    group: str,
    name: str,
    handler: AnyHandler,
    stop: asyncio.Event,
    hooks: Hooks | None = None,
    schema: Schema[Any] = ORDERS,
) -> Stats:
    """Consume every partition of `settings.stream_key` as `name` in `group` until `stop` is set."""
    stats, hooks = Stats(), hooks or Hooks()
    consumers = [
        StreamConsumer(redis, part, group, name, handler, stop, stats, hooks, schema=schema)
        for part in partitions(settings)
    ]
    await run_all(redis, settings, consumers)
    return stats


async def run_all(redis: Redis, settings: Settings, consumers: list[StreamConsumer]) -> None:
    """Run one consumer per partition side by side under one lease; the first to fail stops the others."""
    first, stop = consumers[0], consumers[0].stop
    found: list[bool] = []

    async def detect_paths() -> None:
        claim_on_read = (await detect(redis)).readgroup_claim
        for consumer in consumers:
            consumer.reader.claim_on_read = claim_on_read
        found.append(True)

    while not stop.is_set() and not found:
        await first.recovery.attempt(detect_paths())
    lease = Lease(redis, settings, [part_of(consumer) for consumer in consumers], stop)
    lease.dropped = first.stats.count_deleted
    while not stop.is_set() and not await first.recovery.attempt(lease.take()):
        pass
    if stop.is_set():
        return
    async with lease:
        for consumer in consumers:
            consumer.lease = lease
        tasks = [asyncio.create_task(consumer.run()) for consumer in consumers]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    if lease.lost.is_set():
        raise CliError("another process took over this consumer's name; stopped (see the log above)")


async def serve(
    settings: Settings,
    group: str,
    handler: AnyHandler,
    hooks: Hooks | None = None,
    schema: Schema[Any] = ORDERS,
) -> int:
    """Run one consumer until SIGINT/SIGTERM: the first drains, a second exits at once."""
    if group not in settings.groups:
        raise ConfigError(
            f"group {group} is not in CONSUMER_GROUPS ({','.join(settings.groups)}): add it there, "
            "everywhere, so trimming waits for it"
        )
    stop = asyncio.Event()
    task = asyncio.current_task()
    forced: list[int] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second %s: exiting now; unacked entries stay pending for reclaim", name)
            forced.append(signum)
            if task is not None:
                task.cancel()
        else:
            log.info("%s: finishing the batches in hand, then exiting (send it again to exit at once)", name)
            stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    hooks, stats = hooks or Hooks(), Stats()
    collector = _start_metrics(settings, group, stats)
    try:
        async with redis_connect(settings, stop=stop) as redis, health.serving(settings, redis) as probes:
            if probes is not None:  # HEALTH_PORT: the loop's turns and Redis's replies feed the probes
                hooks = replace(hooks, turned=probes.turned, answered=probes.answered)
            # What exists by now (modules, the client, the handler's own state) lives as long as
            # the process: frozen, the garbage collector stops walking it again and again.
            gc.collect()
            gc.freeze()
            consumers = [
                StreamConsumer(
                    redis, part, group, settings.consumer_name, handler, stop, stats, hooks, schema=schema
                )
                for part in partitions(settings)
            ]
            if collector is None:
                await run_all(redis, settings, consumers)
            else:
                timed = metrics.timed(with_tx(handler), group)
                for consumer in consumers:
                    consumer.handling.handler = timed
                refresher = asyncio.create_task(metrics.refresh_forever(collector, redis, settings))
                try:
                    await run_all(redis, settings, consumers)
                finally:
                    refresher.cancel()
    except asyncio.CancelledError:
        if not forced:
            raise
        return 128 + forced[0]
    except StoppedBeforeStart:
        log.info("stopped before Redis answered; nothing was consumed")
    return 0


def _start_metrics(settings: Settings, group: str, stats: Stats) -> metrics.ConsumerCollector | None:
    """Serve Prometheus metrics when METRICS_PORT is set."""
    if not settings.metrics_port:
        return None
    try:
        collector = metrics.start(
            settings.metrics_port, stats, group, settings.consumer_name, host=settings.metrics_host
        )
    except OSError as error:
        raise CliError(f"cannot serve metrics on port {settings.metrics_port}: {error.strerror}") from None
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    return collector


def run_service(
    prog: str,
    description: str,
    group_of: Callable[[Settings], str],
    handler: AnyHandler,
    schema: Schema[Any] = ORDERS,
) -> None:
    """The whole `main` of a consumer script: pick its group from the settings and serve messages of
    `schema`'s type (orders by default) to `handler`."""
    argparse.ArgumentParser(
        prog=f"python3 -m {prog}",
        description=f"{description} Runs until SIGINT/SIGTERM: the first finishes the batch in hand, "
        "a second exits at once. Settings come from the environment and .env (see .env.example).",
        epilog="Retries (RETRY_DELAY_MS, RETRY_BACKOFF, RETRY_MAX_DELAY_MS, MAX_DELIVERIES; defaults): "
        + schedule_text(Settings.from_env({}))
        + ".",
    ).parse_args()
    run_script(prog, lambda settings: serve(settings, group_of(settings), handler, schema=schema))
