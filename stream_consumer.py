"""The consumer loop both services share: at-least-once, acks only what the handler accepted.

Order of work in each turn: flush acks that failed earlier, reclaim entries idle too long
on other consumers (XAUTOCLAIM), re-read this consumer's own pending entries, then
block for new ones. Malformed entries and entries delivered MAX_DELIVERIES times move to
the dead-letter stream in one MULTI with their ack. With the dedupe guard (dedupe.py) a
group runs its handler once per order_id. A Redis outage, a lost group or a deleted
stream is logged once, then retried with backoff; nothing here crashes on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

import metrics
from config import CliError, Settings, run_script
from dedupe import Decision, DedupeGuard
from initialization_stream import create_group
from maintenance import Capabilities, detect, run_once
from orders import InvalidOrder, Order, parse_order
from redisPool import redis_connect
from replies import Entry, claimed_of, entries_of, owners_of

log = logging.getLogger("stream_consumer")

Handler = Callable[[Order], Awaitable[None]]
Runnable = tuple[bytes, dict[bytes, bytes], Order, int]  # entry id, fields, order, delivery

BACKOFF_START_S = 0.1
BACKOFF_CAP_S = 5.0


@dataclass
class Stats:
    """Counters for the shutdown summary line."""

    processed: int = 0
    failed: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    deleted_skipped: int = 0
    redrives_for_other_groups: int = 0
    duplicates_skipped: int = 0
    busy_elsewhere: int = 0

    def __str__(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in vars(self).items())


def _data_of(fields: dict[bytes, bytes]) -> bytes:
    payload = fields.get(b"data")
    if payload is None:
        raise InvalidOrder("entry has no 'data' field")
    return payload


@dataclass
class StreamConsumer:
    """One consumer of one group; `run()` loops until `stop` is set."""

    redis: Redis
    settings: Settings
    group: str
    name: str
    handler: Handler
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.stream = self.settings.stream_key
        self.own_cursor: bytes | None = b"0"  # None once own pending entries are read
        self.claim_cursor = b"0-0"
        self.unsent_acks: list[bytes] = []
        self.unsent_done: list[str] = []  # order ids to mark done with those acks
        self.dedupe = (
            DedupeGuard(
                self.redis,
                self.stream,
                self.group,
                self.name,
                window_ms=self.settings.dedupe_window_ms,
                # Longer than the claim time: a slow handler keeps its orders from claimers for a while.
                heartbeat_ms=2 * self.settings.claim_idle_ms,
            )
            if self.settings.dedupe_window_ms
            else None
        )
        self.retry_at: float | None = None
        self.next_claim = 0.0
        self.trouble_since: float | None = None
        self.backoff = BACKOFF_START_S
        self.next_maintenance = 0.0
        self.capabilities: Capabilities | None = None
        self.maintenance_refused = False
        self.group_bytes = self.group.encode()
        self.name_bytes = self.name.encode()
        self.busy_owner: dict[bytes, bytes] = {}  # claimed entries left to a live, slow owner

    async def run(self) -> Stats:
        """Consume until `stop` is set; the batch in hand is finished and acked before returning."""
        log.info("consumer %s in group %s on stream %s started", self.name, self.group, self.stream)
        await self._recover(create_group(self.redis, self.stream, self.group))
        while not self.stop.is_set():
            await self._recover(self._turn())
        await self._recover(self._flush_acks())
        log.info("consumer %s in group %s stopped: %s", self.name, self.group, self.stats)
        return self.stats

    async def _turn(self) -> None:
        await self._flush_acks()
        loop = asyncio.get_running_loop()
        if loop.time() >= self.next_claim and await self._reclaim():
            return
        if self.settings.maintenance_interval_ms and loop.time() >= self.next_maintenance:
            self.next_maintenance = loop.time() + self.settings.maintenance_interval_ms / 1000
            await self._maintain()
        if self.retry_at is not None and loop.time() >= self.retry_at:
            self.retry_at, self.own_cursor = None, b"0"
        if self.own_cursor is not None:
            reply = await self.redis.xreadgroup(
                self.group, self.name, {self.stream: self.own_cursor}, count=self.settings.batch_size
            )
            entries = entries_of(reply)
            if not entries:
                self.own_cursor = None
                return
            # Advance past what was read so an entry that keeps failing cannot spin here.
            self.own_cursor = entries[-1][0]
            await self._handle(entries, await self._delivery_counts([e[0] for e in entries]))
            return
        reply = await self.redis.xreadgroup(
            self.group, self.name, {self.stream: ">"}, count=self.settings.batch_size, block=self._block_ms()
        )
        await self._handle(entries_of(reply), {})

    def _block_ms(self) -> int:
        """Block for new entries, but wake in time for the next reclaim or retry."""
        now = asyncio.get_running_loop().time()
        wake = min(self.next_claim, self.retry_at or self.next_claim)
        if self.settings.maintenance_interval_ms:
            wake = min(wake, self.next_maintenance)
        return max(1, min(self.settings.block_ms, int((wake - now) * 1000)))

    async def _reclaim(self) -> bool:
        """Take over one page of entries idle too long anywhere in the group; True if work was found."""
        owners: dict[bytes, bytes] = {}
        if self.dedupe is not None:
            # Who holds them before the claim: an owner still alive may just be slow.
            rows = await self.redis.xpending_range(
                self.stream,
                self.group,
                min=self.claim_cursor,
                max="+",
                count=self.settings.batch_size,
                idle=self.settings.claim_idle_ms,
            )
            owners = owners_of(rows)
        cursor, entries, deleted = claimed_of(
            await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.name,
                min_idle_time=self.settings.claim_idle_ms,
                start_id=self.claim_cursor,
                count=self.settings.batch_size,
            )
        )
        self.claim_cursor = cursor
        if cursor == b"0-0":
            interval = max(self.settings.claim_idle_ms / 2000, 0.05)
            self.next_claim = asyncio.get_running_loop().time() + interval
        # Redis drops entries deleted from the stream from the pending list itself.
        self.stats.deleted_skipped += len(deleted)
        if not entries:
            return False
        log.info(
            "claimed %d entries idle over %d ms in group %s",
            len(entries),
            self.settings.claim_idle_ms,
            self.group,
        )
        self.stats.reclaimed += len(entries)
        busy = await self._busy_elsewhere([e[0] for e in entries], owners)
        await self._handle(entries, await self._delivery_counts([e[0] for e in entries]), busy)
        return True

    async def _busy_elsewhere(self, claimed: list[bytes], owners: dict[bytes, bytes]) -> set[bytes]:
        """The claimed entries whose earlier owner is alive: its handler is slow, not dead."""
        if self.dedupe is None:
            return set()
        earlier = {}
        for entry_id in claimed:
            owner = owners.get(entry_id, self.name_bytes)
            if owner == self.name_bytes:  # ours already: left to someone before, or our own
                owner = self.busy_owner.get(entry_id, self.name_bytes)
            if owner != self.name_bytes:
                earlier[entry_id] = owner
        alive = await self.dedupe.alive(earlier.values())
        busy = {entry_id for entry_id, owner in earlier.items() if owner in alive}
        for entry_id in claimed:
            self.busy_owner.pop(entry_id, None)
        self.busy_owner.update({entry_id: earlier[entry_id] for entry_id in busy})
        while len(self.busy_owner) > 10_000:  # bounded: the oldest are long settled
            del self.busy_owner[next(iter(self.busy_owner))]
        return busy

    async def _maintain(self) -> None:
        """Trim what every group acked and drop stale consumers; a refusal never stops consumption."""
        try:
            if self.capabilities is None:
                self.capabilities = await detect(self.redis)
            await run_once(self.redis, self.settings, self.capabilities)
        except ResponseError as error:
            if not self.maintenance_refused:
                log.warning("maintenance skipped: Redis refused it (%s); consumption goes on", error)
                self.maintenance_refused = True

    async def _delivery_counts(self, ids: list[bytes]) -> dict[bytes, int]:
        """How many times each of these redelivered entries has been delivered, this time included."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        counts = {}
        for rows in await pipe.execute():
            for row in rows:
                counts[row["message_id"]] = row["times_delivered"]
        return counts

    async def _handle(
        self, entries: list[Entry], deliveries: dict[bytes, int], busy: set[bytes] | None = None
    ) -> None:
        """Run the handler over a batch; commit the successes in one XACK, dead-letter the poison."""
        runnable = await self._screen(entries, deliveries)
        if busy:  # a live consumer is still on these: left pending, looked at after the next claim
            self.stats.busy_elsewhere += sum(1 for item in runnable if item[0] in busy)
            runnable = [item for item in runnable if item[0] not in busy]
        if self.dedupe is not None and runnable:
            decisions = await self.dedupe.admit([order.order_id for _, _, order, _ in runnable])
            admitted = []
            for item, decision in zip(runnable, decisions, strict=True):
                if decision is Decision.RUN:
                    admitted.append(item)
                else:
                    log.info("order %s already handled in this group: acked, not run again", item[2].order_id)
                    self.unsent_acks.append(item[0])
                    self.stats.duplicates_skipped += 1
            runnable = admitted
        max_deliveries = self.settings.max_deliveries
        processed = 0
        for entry_id, fields, order, delivery in runnable:
            try:
                await self.handler(order)
            except Exception as error:
                self.stats.failed += 1
                log.exception(
                    "handler failed for order %s (entry %s, delivery %d of %d)",
                    order.order_id,
                    entry_id.decode(),
                    delivery,
                    max_deliveries,
                )
                if delivery >= max_deliveries:
                    reason = f"handler failed {delivery} times, last: {type(error).__name__}: {error}"
                    await self._dead_letter(entry_id, fields, delivery, reason, order.order_id)
                elif self.retry_at is None:
                    delay = self.settings.retry_delay_ms / 1000
                    self.retry_at = asyncio.get_running_loop().time() + delay
                continue
            # Kept across failures: a later turn commits what the handler already accepted.
            self.unsent_acks.append(entry_id)
            self.unsent_done.append(order.order_id)
            processed += 1
        self.stats.processed += processed
        await self._flush_acks()

    async def _screen(self, entries: list[Entry], deliveries: dict[bytes, int]) -> list[Runnable]:
        """Ack entries that need no handler, dead-letter the poison; return the orders to run."""
        max_deliveries = self.settings.max_deliveries
        max_bytes = self.settings.max_payload_bytes
        runnable = []
        for entry_id, fields in entries:
            if not fields:  # deleted or trimmed while pending: nothing left to process
                self.unsent_acks.append(entry_id)
                self.stats.deleted_skipped += 1
                continue
            redrive_for = fields.get(b"redrive_for")
            if redrive_for is not None and redrive_for != self.group_bytes:
                # Sent back from the dead-letter stream for another group only.
                self.unsent_acks.append(entry_id)
                self.stats.redrives_for_other_groups += 1
                continue
            delivery = deliveries.get(entry_id, 1)
            try:
                order = parse_order(_data_of(fields), max_bytes)
            except InvalidOrder as error:
                await self._dead_letter(entry_id, fields, delivery, f"invalid order: {error}", None)
                continue
            if delivery > max_deliveries:
                reason = f"delivered {delivery} times without an ack (limit {max_deliveries})"
                await self._dead_letter(entry_id, fields, delivery, reason, order.order_id)
                continue
            runnable.append((entry_id, fields, order, delivery))
        return runnable

    async def _flush_acks(self) -> None:
        """Ack what is done; with the dedupe guard, mark those orders done in the same MULTI."""
        if not self.unsent_acks:
            return
        if self.dedupe is not None and self.unsent_done:
            await self.dedupe.commit(self.unsent_done, self.unsent_acks)
        else:
            await self.redis.xack(self.stream, self.group, *self.unsent_acks)
        self.unsent_acks.clear()
        self.unsent_done.clear()

    async def _dead_letter(
        self, entry_id: bytes, fields: dict[bytes, bytes], delivery: int, reason: str, order_id: str | None
    ) -> None:
        """Copy the entry to the dead-letter stream and ack it, atomically."""
        record: dict[FieldT, EncodableT] = dict(fields.items())
        record |= {
            b"group": self.group,
            b"consumer": self.name,
            b"source_id": entry_id,
            b"deliveries": delivery,
            b"error": reason,
            b"dead_lettered_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.settings.dead_letter_stream, record)
        pipe.xack(self.stream, self.group, entry_id)
        await pipe.execute()
        self.stats.dead_lettered += 1
        log.warning(
            "dead-lettered entry %s (order %s) to %s: %s",
            entry_id.decode(),
            order_id or "unknown",
            self.settings.dead_letter_stream,
            reason,
        )

    async def _recover(self, step: Awaitable[object]) -> None:
        """Run one step; on a Redis failure log once, back off, and set up to re-read own entries."""
        loop = asyncio.get_running_loop()
        try:
            await step
        except RedisError as error:
            message = str(error)
            if isinstance(error, ResponseError) and message.startswith(("NOGROUP", "UNBLOCKED")):
                # The group or the stream vanished (FLUSHALL, a restart without persistence).
                log.error(
                    "group %s on stream %s is gone (%s); recreating it from id 0",
                    self.group,
                    self.stream,
                    message.split(" ", 1)[0],
                )
                await self._recover(create_group(self.redis, self.stream, self.group))
                self.own_cursor = b"0"
                return
            if self.trouble_since is None:  # once per outage, not once per retry
                self.trouble_since = loop.time()
                if isinstance(error, RedisConnectionError | RedisTimeoutError):
                    log.warning(
                        "Redis unreachable (%s: %s); retrying with backoff", type(error).__name__, error
                    )
                else:
                    log.error("Redis error (%s: %s); retrying with backoff", type(error).__name__, error)
        else:
            if self.trouble_since is not None:
                log.warning("Redis is back after %.1f s; resuming", loop.time() - self.trouble_since)
                self.trouble_since, self.backoff = None, BACKOFF_START_S
            return
        # A reply lost in the failure may have delivered entries to us: read our own pending again.
        self.own_cursor = b"0"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_CAP_S)


async def consume(
    redis: Redis, settings: Settings, group: str, name: str, handler: Handler, stop: asyncio.Event
) -> Stats:
    """Consume `settings.stream_key` as `name` in `group` until `stop` is set."""
    return await StreamConsumer(redis, settings, group, name, handler, stop).run()


async def serve(settings: Settings, group: str, handler: Handler) -> int:
    """Run one consumer until SIGINT/SIGTERM: the first drains, a second exits at once."""
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
            log.info("%s: finishing the batch in hand, then exiting (send it again to exit at once)", name)
            stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    stats = Stats()
    with_metrics = _start_metrics(settings, stats, group, handler)
    try:
        async with redis_connect(settings) as redis:
            consumer = StreamConsumer(redis, settings, group, settings.consumer_name, handler, stop, stats)
            if with_metrics is None:
                await consumer.run()
            else:
                collector, consumer.handler = with_metrics
                refresher = asyncio.create_task(metrics.refresh_forever(collector, redis, settings))
                try:
                    await consumer.run()
                finally:
                    refresher.cancel()
    except asyncio.CancelledError:
        if not forced:
            raise
        return 128 + forced[0]
    return 0


def _start_metrics(
    settings: Settings, stats: Stats, group: str, handler: Handler
) -> tuple[metrics.ConsumerCollector, Handler] | None:
    """Serve Prometheus metrics when METRICS_PORT is set: the collector and the timed handler."""
    if not settings.metrics_port:
        return None
    try:
        collector = metrics.start(settings.metrics_port, stats, group, settings.consumer_name)
    except OSError as error:
        raise CliError(f"cannot serve metrics on port {settings.metrics_port}: {error.strerror}") from None
    log.info("metrics on http://0.0.0.0:%d/metrics", settings.metrics_port)
    return collector, metrics.timed(handler, group)


def run_service(prog: str, description: str, group_of: Callable[[Settings], str], handler: Handler) -> None:
    """The whole `main` of a consumer script: pick its group from the settings and serve."""
    argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=f"{description} Runs until SIGINT/SIGTERM: the first finishes the batch in hand, "
        "a second exits at once. Settings come from the environment and .env (see .env.example).",
    ).parse_args()
    run_script(prog, lambda settings: serve(settings, group_of(settings), handler))
