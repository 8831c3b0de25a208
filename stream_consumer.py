"""The consumer loop every service shares: at-least-once, acks only what the handler accepted.

Each turn: commit what is done, take over entries idle too long on consumers that are gone
(their lease lapsed), re-read this consumer's own pending entries when due, then block for
new ones; on one Redis the commit travels with the read, and under a backlog the next batch
is read while this one's handlers run. Poison entries move to the dead-letter stream. With
the dedupe guard on, an atomic admission step lets one consumer of the group run an order at
a time, once per window. Every commit and dead-letter is fenced: it applies only to entries
still pending on this consumer (core/library.lua). A Redis outage, a lost group or a deleted
stream is logged once, then retried with backoff; nothing here crashes on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import inspect
import itertools
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from config import CliError, ConfigError, Settings, run_script
from core import library, metrics, tracing
from core.capabilities import Capabilities, detect
from core.dead_letters import dead_letter_fields
from core.groups import ensure_groups
from core.keys import keys_for, partitions
from core.lease import Lease
from core.library import DONE, RUN, Commit, Fence, LibraryMissing
from core.replies import (
    Entry,
    claimed_entries_of,
    commit_of,
    entries_of_claim,
    pending_rows_of,
    raw_entries_of,
    text,
)
from maintenance import run_once
from orders import InvalidOrder, Order, parse_order
from redisPool import is_cluster, raw_xreadgroup, redis_connect
from tx import Tx

log = logging.getLogger("stream_consumer")

Handler = Callable[[Order], Awaitable[None]]
TxHandler = Callable[[Order, Tx], Awaitable[None]]  # stages Redis writes that commit with the order
AnyHandler = Handler | TxHandler
Runnable = tuple[bytes, dict[bytes, bytes], Order, int]  # entry id, fields, order, delivery
Taken = tuple[list[bytes], list[Commit], bool]  # a commit's acks and entries, and whether it is a retry
NO_WRITES: list[list[EncodableT]] = []  # what a handler that takes only the order stages (never appended to)

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
    taken_over: int = 0  # commits dropped: another consumer had taken the entry over

    def __str__(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in vars(self).items())


def plain_of(handler: AnyHandler) -> Handler | None:
    """The handler itself if it takes only the order, None if it is transactional.

    A handler is transactional when it has a second required positional parameter; one whose
    other parameters have defaults is called with the order alone.
    """
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        parameter
        for parameter in inspect.signature(handler).parameters.values()
        if parameter.kind in positional and parameter.default is inspect.Parameter.empty
    ]
    return None if len(required) >= 2 else cast(Handler, handler)


def with_tx(handler: AnyHandler) -> TxHandler:
    """Every handler as one taking a Tx: a handler that takes only the order ignores it."""
    plain = plain_of(handler)
    if plain is None:
        return cast(TxHandler, handler)

    async def run(order: Order, tx: Tx) -> None:
        await plain(order)

    return run


# Failures that end by themselves: an outage, a restart, a cluster failing over.
UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    RedisClusterException,
    ClusterDownError,
    MasterDownError,
    TryAgainError,
)


@dataclass
class StreamConsumer:
    """One consumer of one group; `run()` loops until `stop` is set."""

    redis: Redis
    settings: Settings
    group: str
    name: str
    handler: AnyHandler
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.keys = keys_for(self.settings)
        self.stream = self.keys.stream
        self.fence = Fence(self.redis, self.keys, self.group, self.name, self.settings.dedupe_window_ms)
        self.own_cursor: bytes | None = b"0"  # None once own pending entries are read
        self.claim_cursor = "-"
        self.acks: list[bytes] = []  # done, not yet committed, needing only an ack
        self.uncommitted: list[Commit] = []  # done, not yet committed, with an order to mark or writes
        self.commit_sent = False  # a commit went out and its reply did not come back
        self.skipped: list[tuple[str, str]] = []  # (order id, why) of copies acked without a run
        self.retry_at: float | None = None
        self.next_claim = 0.0
        self.trouble_since: float | None = None
        self.backoff = BACKOFF_START_S
        self.next_maintenance = 0.0
        self.capabilities: Capabilities | None = None
        self.claim_on_read = False  # Redis 8.4+: reads claim idle entries (XREADGROUP ... CLAIM)
        self.held: dict[bytes, None] = {}  # read and not yet committed (XREADGROUP CLAIM path)
        self.in_hand: tuple[bytes, ...] = ()  # the same, as the lease thread reads it to touch them
        self.maintenance_refused = False
        self.name_bytes = self.name.encode()
        # The commit and the next read in one round trip, the next batch read ahead; not on a
        # cluster, where a failover moves the stream's slot, and one command at a time through
        # the cluster client keeps that simple.
        self.one_trip = not is_cluster(self.redis)
        self.ahead: tuple[list[Entry], dict[bytes, int]] | None = None  # read while a batch ran

    async def run(self) -> Stats:
        """Consume until `stop` is set; the batch in hand is finished and committed before returning."""
        log.info("consumer %s in group %s on stream %s started", self.name, self.group, self.stream)
        self.run_handler = with_tx(self.handler)  # here: serve() may wrap self.handler after __init__
        self.plain_handler = plain_of(self.handler)  # called with the order alone: no Tx per order
        while not await self._recover(self._start()) and not self.stop.is_set():
            pass  # an outage (a failover) at start is ridden out like any other
        touch = self._touch if self.claim_on_read else None
        lease = Lease(
            self.settings, [self.keys.lease(self.group, self.name)], self.settings.claim_idle_ms, touch
        )
        async with lease:
            await self._recover(self._ensure_groups())
            while not self.stop.is_set():
                await self._recover(self._turn())
            await self._recover(self._handle_ahead())  # in hand too: finished, not left pending
            await self._recover(self._commit())
        log.info("consumer %s in group %s stopped: %s", self.name, self.group, self.stats)
        return self.stats

    async def _ensure_groups(self) -> None:
        """Every configured group exists before anything here could let trimming pass it."""
        created = await ensure_groups(self.redis, self.stream, (*self.settings.groups, self.group))
        if created:
            log.info("created missing groups %s on stream %s from id 0", ", ".join(created), self.stream)

    def _hold(self, entries: list[Entry]) -> None:
        self.held.update(dict.fromkeys(entry_id for entry_id, _ in entries))
        self.in_hand = tuple(self.held)

    def _release(self, entry_ids: Iterable[bytes]) -> None:
        for entry_id in entry_ids:
            self.held.pop(entry_id, None)
        self.in_hand = tuple(self.held)

    async def _turn(self) -> None:
        loop = asyncio.get_running_loop()
        if self.one_trip and self._only_new_entries_due(loop.time()):
            await self._commit_then_read()
            return
        await self._handle_ahead()
        await self._commit()
        # On the XREADGROUP CLAIM path too: Redis skips entries deleted (trimmed) while pending,
        # which would stay pending on a gone consumer forever; XCLAIM drops them.
        if loop.time() >= self.next_claim and await self._reclaim():
            return
        if self.settings.maintenance_interval_ms and loop.time() >= self.next_maintenance:
            self.next_maintenance = loop.time() + self.settings.maintenance_interval_ms / 1000
            await self._maintain()
        if self.retry_at is not None and loop.time() >= self.retry_at:
            self.retry_at, self.own_cursor = None, b"0"
        if self.own_cursor is not None:
            entries = raw_entries_of(await self._read(self.own_cursor))
            if not entries:
                self.own_cursor = None
                return
            # Advance past what was read so an entry that keeps failing cannot spin here.
            self.own_cursor = entries[-1][0]
            await self._handle(entries, await self._delivery_counts(entries[0][0], entries[-1][0]))
            return
        await self._handle(
            *self._new_of(await self._read(">", *self._new_entries("BLOCK", self._block_ms())))
        )

    def _only_new_entries_due(self, now: float) -> bool:
        """Whether this turn only reads new entries (no reclaim, maintenance, retry or re-read is due)."""
        return (
            now < self.next_claim
            and not (self.settings.maintenance_interval_ms and now >= self.next_maintenance)
            and (self.retry_at is None or now < self.retry_at)
            and self.own_cursor is None
        )

    async def _commit_then_read(self) -> None:
        """Commit what is done and read new entries in one round trip; meanwhile handle the batch
        read ahead last time, if any, and commit it as soon as it is done.

        Redis runs the read while those handlers run. With nothing to handle meanwhile the read
        blocks for new entries; the commit's reply, which Redis sends at once, is taken first.
        A full batch is read ahead: handled in the next turn, while Redis serves the read after
        it, so a consumer holds at most two batches, only one of them ever done and not
        committed. Less than a full batch is handled at once (there is no backlog to read
        ahead). With XREADGROUP ... CLAIM (Redis 8.4+) every batch is handled at once: only
        entries in hand are kept from looking idle, and a batch read ahead would idle, unseen,
        while the one before it runs.
        """
        pool = self.redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        owed: list[Taken] = []  # commits sent whose reply is not read yet, in order
        answered = False
        try:
            commands: list[Iterable[EncodableT]] = []
            if commit := self._commit_owed(owed):
                commands.append(commit)
            commit_first = bool(commands)
            block = () if self.ahead is not None else ("BLOCK", self._block_ms())
            commands.append(self._read_command(">", *self._new_entries(*block)))
            await connection.send_packed_command(connection.pack_commands(commands))  # one write
            if self.ahead is not None:
                await self._handle_ahead()
                if commit := self._commit_owed(owed):  # at once, not after the read's reply
                    await connection.send_command(*commit)
            if commit_first:  # its reply comes before the read's
                self._committed_owed(owed, commit_of(await connection.read_response()))
            entries, deliveries = self._new_of(await connection.read_response())
            while owed:
                self._committed_owed(owed, commit_of(await connection.read_response()))
            answered = True
        except BaseException:
            for acks, uncommitted, _ in reversed(owed):  # may or may not have applied: sent again
                self.acks, self.uncommitted = acks + self.acks, uncommitted + self.uncommitted
            self.commit_sent = self.commit_sent or bool(owed)  # as a retry
            raise  # (_recover then has our own pending entries read again, for the read's)
        finally:
            if not answered:  # replies may still be on their way: that connection is done
                await connection.disconnect()
            await pool.release(connection)
        if len(entries) == self.settings.batch_size and not self.claim_on_read:
            self.ahead = entries, deliveries
        else:
            await self._handle(entries, deliveries)

    def _commit_owed(self, owed: list[Taken]) -> list[EncodableT] | None:
        """The commit of what is done, moved aside onto `owed` until its reply; None if nothing is."""
        if not self.acks and not self.uncommitted:
            return None
        owed.append((self.acks, self.uncommitted, self.commit_sent))
        call = self.fence.commit_call(self.acks, self.uncommitted)
        self.acks, self.uncommitted, self.commit_sent = [], [], False
        return call

    def _committed_owed(self, owed: list[Taken], reply: tuple[int, list[bytes], list[str]]) -> None:
        acks, uncommitted, retry = owed.pop(0)
        self._committed(retry, reply, acks, uncommitted)

    async def _handle_ahead(self) -> None:
        """Handle the batch read ahead, if any."""
        if self.ahead is not None:
            (entries, deliveries), self.ahead = self.ahead, None
            await self._handle(entries, deliveries)

    async def _read(self, cursor: bytes | str, *options: str | int) -> Any:
        """XREADGROUP from `cursor` (">" for new entries) with `options`; Redis's reply, unparsed."""
        command = self._read_command(cursor, *options)
        return await self.redis.execute_command(*command, raw_reply=True)  # type: ignore[no-untyped-call]

    def _read_command(self, cursor: bytes | str, *options: str | int) -> tuple[EncodableT, ...]:
        return (
            "XREADGROUP", "GROUP", self.group, self.name, "COUNT", self.settings.batch_size,
            *options, "STREAMS", self.stream, cursor,
        )  # fmt: skip

    def _new_entries(self, *block: str | int) -> tuple[str | int, ...]:
        """The options of a read of new entries (">"), after `block` ("BLOCK", ms, or nothing).

        Redis 8.4+: one XREADGROUP ... CLAIM takes entries idle over CLAIM_IDLE_MS first, then
        new ones. Idle means no live owner: a running consumer's lease thread keeps the entries
        it holds fresh (the library's touch), however long its handlers take, so this never
        takes an entry from a live, slow consumer; it takes those of consumers that are gone
        (and its own, whose delivery reply was lost). The reply carries each entry's delivery count.
        """
        if self.claim_on_read:
            return (*block, "CLAIM", self.settings.claim_idle_ms)
        return block

    def _new_of(self, reply: Any) -> tuple[list[Entry], dict[bytes, int]]:
        """What a read of new entries returned (with CLAIM: first what it took from gone consumers),
        and the delivery count of each entry delivered before."""
        if not self.claim_on_read:
            return raw_entries_of(reply), {}
        entries, deliveries, claimed = claimed_entries_of(reply)
        if claimed:
            idle = self.settings.claim_idle_ms
            log.info("claimed %d entries idle over %d ms from consumers that are gone", claimed, idle)
            self.stats.reclaimed += claimed
        return entries, deliveries

    def _block_ms(self) -> int:
        """Block for new entries, but wake in time for the next reclaim or retry."""
        now = asyncio.get_running_loop().time()
        wake = min(self.next_claim, self.retry_at or self.next_claim)
        if self.settings.maintenance_interval_ms:
            wake = min(wake, self.next_maintenance)
        return max(1, min(self.settings.block_ms, int((wake - now) * 1000)))

    async def _reclaim(self) -> bool:
        """Take over one page of entries idle too long on consumers that are gone; True if work was found.

        An entry whose owner's lease is alive is left alone, however long its handler takes:
        its owner is slow, not dead. Ownership moves (XCLAIM) only for the others, so this
        consumer never holds, and never re-reads, an entry a live consumer is running.
        """
        idle = self.settings.claim_idle_ms
        rows = pending_rows_of(
            await self.redis.xpending_range(
                self.stream,
                self.group,
                min=self.claim_cursor,
                max="+",
                count=self.settings.batch_size,
                idle=idle,
            )
        )
        if len(rows) < self.settings.batch_size:
            self.claim_cursor = "-"
            self.next_claim = asyncio.get_running_loop().time() + max(idle / 2000, 0.05)
        else:
            self.claim_cursor = "(" + text(rows[-1][0])
        if any(owner == self.name_bytes for _, owner, _ in rows):
            # Ours and idle, so not in hand: a delivery whose reply was lost, or a retry. Re-read them.
            self.own_cursor = b"0"
        alive = await self._alive({owner for _, owner, _ in rows if owner != self.name_bytes})
        orphans = {
            entry_id: times
            for entry_id, owner, times in rows
            if owner != self.name_bytes and owner not in alive
        }
        if not orphans:
            return False
        # min_idle_time again: of two consumers claiming one entry, only the first gets it.
        claimed = entries_of_claim(
            await self.redis.xclaim(
                self.stream, self.group, self.name, min_idle_time=idle, message_ids=list(orphans)
            )
        )
        # XCLAIM drops entries deleted from the stream from the pending list itself.
        self.stats.deleted_skipped += len(orphans) - len(claimed)
        if not claimed:
            return False
        log.info("claimed %d entries idle over %d ms from consumers that are gone", len(claimed), idle)
        self.stats.reclaimed += len(claimed)
        await self._handle(claimed, {entry_id: orphans[entry_id] + 1 for entry_id, _ in claimed})
        return True

    async def _alive(self, consumers: set[bytes]) -> set[bytes]:
        """Those of these consumers whose lease has not lapsed."""
        names = sorted(consumers)
        if not names:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(self.keys.lease(self.group, text(name)))
        return {name for name, found in zip(names, await pipe.execute(), strict=True) if found}

    async def _maintain(self) -> None:
        """Trim what every group acked and drop stale consumers; a refusal never stops consumption."""
        await self._ensure_groups()
        assert self.capabilities is not None, "detected in _start, before any turn"
        try:
            await run_once(self.redis, self.settings, self.capabilities)
        except ResponseError as error:
            if not self.maintenance_refused:
                log.warning("maintenance skipped: Redis refused it (%s); consumption goes on", error)
                self.maintenance_refused = True

    async def _delivery_counts(self, first: bytes, last: bytes) -> dict[bytes, int]:
        """How many times each of this consumer's pending entries in [first, last] has been delivered."""
        rows = await self.redis.xpending_range(
            self.stream,
            self.group,
            min=first,
            max=last,
            count=self.settings.batch_size,
            consumername=self.name,
        )
        return {entry_id: times for entry_id, _, times in pending_rows_of(rows)}

    async def _handle(self, entries: list[Entry], deliveries: dict[bytes, int]) -> None:
        """Run the handler over a batch and dead-letter the poison; the next turn commits the successes
        in one fenced step (with its read, when that is all it does)."""
        if self.claim_on_read:
            self._hold(entries)
        runnable = await self._admit(await self._screen(entries, deliveries))
        max_deliveries = self.settings.max_deliveries
        guard = self.settings.dedupe_window_ms
        plain, acks, uncommitted = self.plain_handler, self.acks, self.uncommitted
        processed = 0
        spans = tracing.processing(self.stream, self.group, self.name)  # None when tracing is off
        for entry_id, fields, order, delivery in runnable:
            writes = NO_WRITES
            try:
                if spans is not None:
                    with spans.span(entry_id, fields):
                        writes = await self._run(order)
                elif plain is not None:  # _run's first case, inline: no coroutine of ours per order
                    await plain(order)
                else:
                    writes = await self._run(order)
            except Exception as error:  # its staged writes are dropped with it
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
            # Done marks only for entries the guard admitted (not from our own producer).
            if guard and b"producer" not in fields:
                uncommitted.append((entry_id, order.order_id, writes))
            elif writes:
                uncommitted.append((entry_id, "", writes))
            else:
                acks.append(entry_id)
            processed += 1
        self.stats.processed += processed
        # Said after the batch's handlers ran, so a copy's line never comes before its order's run.
        for order_id, state in self.skipped:
            log.info("order %s %s in this group: acked, not run again", order_id, state)
        self.skipped.clear()

    async def _run(self, order: Order) -> list[list[EncodableT]]:
        """Run the handler on one order; the Redis writes it staged."""
        if self.plain_handler is not None:
            await self.plain_handler(order)
            return NO_WRITES
        tx = Tx(self.stream)
        await self.run_handler(order, tx)
        return tx.commands

    async def _admit(self, runnable: list[Runnable]) -> list[Runnable]:
        """With the dedupe guard: the orders to run now; copies of orders done or running are acked.

        Entries from this project's producer skip it: their copies were stopped where they
        entered (an idempotent append), so they need no done marks and cost no memory here.
        """
        if not self.settings.dedupe_window_ms:
            return runnable
        guarded = [item for item in runnable if b"producer" not in item[1]]
        if not guarded:
            return runnable
        decisions = await self.fence.admit([(item[0], item[2].order_id) for item in guarded])
        refused = {}
        for item, decision in zip(guarded, decisions, strict=True):
            if decision != RUN:
                refused[item[0]] = decision
        for entry_id, _, order, _ in runnable:
            if entry_id in refused:
                state = "already handled" if refused[entry_id] == DONE else "being handled from another entry"
                self.skipped.append((order.order_id, state))
                self.acks.append(entry_id)
                self.stats.duplicates_skipped += 1
        return [item for item in runnable if item[0] not in refused]

    async def _screen(self, entries: list[Entry], deliveries: dict[bytes, int]) -> list[Runnable]:
        """Ack entries that need no handler, dead-letter the poison; return the orders to run."""
        max_deliveries = self.settings.max_deliveries
        max_bytes = self.settings.max_payload_bytes
        runnable = []
        for entry_id, fields in entries:
            if not fields:  # deleted or trimmed while pending: nothing left to process
                self.acks.append(entry_id)
                self.stats.deleted_skipped += 1
                continue
            delivery = deliveries.get(entry_id, 1)
            redrive_for = fields.get(b"redrive_for")
            if redrive_for is not None and text(redrive_for) != self.group:
                if text(redrive_for) in self.settings.groups:
                    # Sent back from the dead-letter stream for another group only.
                    self.acks.append(entry_id)
                    self.stats.redrives_for_other_groups += 1
                else:
                    reason = "redrive_for names no configured group"
                    await self._dead_letter(entry_id, fields, delivery, reason, None)
                continue
            payload = fields.get(b"data")
            try:
                if payload is None:
                    raise InvalidOrder("entry has no 'data' field")
                order = parse_order(payload, max_bytes)
            except InvalidOrder as error:
                await self._dead_letter(entry_id, fields, delivery, f"invalid order: {error}", None)
                continue
            if delivery > max_deliveries:
                reason = f"delivered {delivery} times without an ack (limit {max_deliveries})"
                await self._dead_letter(entry_id, fields, delivery, reason, order.order_id)
                continue
            runnable.append((entry_id, fields, order, delivery))
        return runnable

    async def _commit(self) -> None:
        """Apply the staged writes of, and ack, what is done, in one step fenced by entry ownership.

        On a first try every entry is pending on this consumer unless another one took it over
        (and maybe finished it) meanwhile; on a retry after a lost reply, entries already
        committed are simply no longer pending.
        """
        if not self.acks and not self.uncommitted:
            return
        retry, self.commit_sent = self.commit_sent, True
        self._committed(
            retry, await self.fence.commit(self.acks, self.uncommitted), self.acks, self.uncommitted
        )

    def _committed(
        self,
        retry: bool,
        reply: tuple[int, list[bytes], list[str]],
        acks: list[bytes],
        uncommitted: list[Commit],
    ) -> None:
        """Account for the reply of the commit of `acks` and `uncommitted` (then emptied); `retry`
        when it was sent again after a lost reply."""
        acked, fenced, refused = reply
        # Pending on no consumer: finished by one that took them over, or committed by a try of
        # this commit whose reply was lost (redis-py sends a command again after a lost reply).
        gone = len(acks) + len(uncommitted) - acked - len(fenced)
        if self.claim_on_read:  # acked (or another's now): nothing to keep fresh any more
            self._release(itertools.chain(acks, (entry_id for entry_id, _, _ in uncommitted)))
        acks.clear()
        uncommitted.clear()
        self.commit_sent = False
        if refused:
            log.error(
                "Redis refused %d staged writes at commit (not applied; the rest were, once): %s",
                len(refused),
                "; ".join(refused[:5]),
            )
        if fenced:
            self.stats.taken_over += len(fenced)
            log.warning(
                "%d entries were taken over by another consumer while this one worked on them (it "
                "was cut off longer than CLAIM_IDLE_MS); their commit and staged writes were dropped",
                len(fenced),
            )
        if gone and not retry:
            self.stats.taken_over += gone
            log.warning(
                "%d entries were no longer pending at commit: taken over by another consumer and "
                "finished there (this one was cut off longer than CLAIM_IDLE_MS), or committed by "
                "an earlier try whose reply was lost; nothing of theirs was applied twice",
                gone,
            )

    async def _dead_letter(
        self, entry_id: bytes, fields: dict[bytes, bytes], delivery: int, reason: str, order_id: str | None
    ) -> None:
        """Copy the entry to the dead-letter stream and ack it, atomically, if it is still ours."""
        meta: dict[str, str | int] = {
            "group": self.group,
            "consumer": self.name,
            "source_id": text(entry_id),
            "deliveries": delivery,
            "error": reason,
        }
        if not await self.fence.dead_letter(entry_id, order_id or "", dead_letter_fields(fields, meta)):
            self.stats.taken_over += 1
            log.warning("entry %s was taken over by another consumer; not dead-lettered here", text(entry_id))
            return
        self.stats.dead_lettered += 1
        log.warning(
            "dead-lettered entry %s (order %s) to %s: %s",
            text(entry_id),
            order_id or "unknown",
            self.keys.dead_letter,
            reason,
        )

    async def _start(self) -> None:
        """Load the function library if this user may (if not, the process ends: CliError) and
        pick the reclaim path this server offers."""
        try:
            await library.ensure_loaded(self.redis)
        except LibraryMissing as error:
            raise CliError(str(error)) from None
        self.capabilities = await detect(self.redis)
        self.claim_on_read = self.capabilities.readgroup_claim
        raw_xreadgroup(self.redis)

    def _touch(self, client: Any) -> None:
        """On the lease's thread: keep the entries in hand from looking idle (XREADGROUP CLAIM path)."""
        in_hand = self.in_hand  # one read of a tuple the event loop replaces whole
        if in_hand:
            client.fcall(library.function("touch"), 1, self.stream, self.group, self.name, *in_hand)

    async def _recover(self, step: Awaitable[object]) -> bool:
        """Run one step; on a Redis failure log once, back off, and set up to re-read own entries.

        True when the step succeeded.
        """
        loop = asyncio.get_running_loop()
        try:
            await step
        except (RedisError, RedisClusterException) as error:
            message = str(error)
            if isinstance(error, ResponseError) and message.startswith(("NOGROUP", "UNBLOCKED")):
                # The group or the stream vanished (FLUSHALL, a restart without persistence).
                log.error(
                    "group %s on stream %s is gone (%s); recreating every configured group from id 0",
                    self.group,
                    self.stream,
                    message.split(" ", 1)[0],
                )
                await self._recover(self._ensure_groups())
                self.own_cursor = b"0"
                return False
            if isinstance(error, ResponseError) and "function not found" in message.lower():
                # A restart without persistence also loses the function library.
                log.error("the Redis function library is gone; loading it again")
                await self._recover(self._reload_library())
                return False
            if self.trouble_since is None:  # once per outage, not once per retry
                self.trouble_since = loop.time()
                if isinstance(error, UNREACHABLE):
                    log.warning(
                        "Redis unreachable (%s: %s); retrying with backoff", type(error).__name__, error
                    )
                else:
                    log.error("Redis error (%s: %s); retrying with backoff", type(error).__name__, error)
        except LibraryMissing as error:
            if self.trouble_since is None:
                self.trouble_since = loop.time()
                log.error("%s; retrying with backoff", error)
        else:
            if self.trouble_since is not None:
                log.warning("Redis is back after %.1f s; resuming", loop.time() - self.trouble_since)
                self.trouble_since, self.backoff = None, BACKOFF_START_S
            return True
        # A reply lost in the failure may have delivered entries to us: read our own pending again.
        # The batch read ahead is among them: not handled now, while Redis may be away (a handled
        # entry that cannot be committed is run again if the lease lapses meanwhile).
        self.own_cursor, self.ahead = b"0", None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_CAP_S)
        return False

    async def _reload_library(self) -> None:
        await library.ensure_loaded(self.redis)


async def consume(
    redis: Redis, settings: Settings, group: str, name: str, handler: AnyHandler, stop: asyncio.Event
) -> Stats:
    """Consume every partition of `settings.stream_key` as `name` in `group` until `stop` is set."""
    stats = Stats()
    await run_all(
        [StreamConsumer(redis, part, group, name, handler, stop, stats) for part in partitions(settings)]
    )
    return stats


async def run_all(consumers: list[StreamConsumer]) -> None:
    """Run one consumer per partition side by side; the first to fail stops the others."""
    if len(consumers) == 1:
        await consumers[0].run()
        return
    tasks = [asyncio.create_task(consumer.run()) for consumer in consumers]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve(
    settings: Settings,
    group: str,
    handler: AnyHandler,
    make: Callable[..., StreamConsumer] = StreamConsumer,
) -> int:
    """Run one consumer until SIGINT/SIGTERM: the first drains, a second exits at once.

    `make` makes each partition's consumer (the bench passes one that times acks).
    """
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

    if group not in settings.groups:
        raise ConfigError(
            f"group {group} is not in GROUPS ({','.join(settings.groups)}): add it there, everywhere, "
            "so trimming waits for it"
        )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    stats = Stats()
    with_metrics = _start_metrics(settings, stats, group, handler)
    try:
        async with redis_connect(settings) as redis:
            consumers = [
                make(redis, part, group, settings.consumer_name, handler, stop, stats)
                for part in partitions(settings)
            ]
            # What exists by now (modules, the client, the handler's own state) lives as long as
            # the process. Frozen, the garbage collector stops walking it again and again as
            # batches are parsed: its time on a drain went from 0.74-0.89 to 0.24-0.33 us per entry.
            gc.collect()
            gc.freeze()
            if with_metrics is None:
                await run_all(consumers)
            else:
                collector, timed = with_metrics
                for consumer in consumers:
                    consumer.handler = timed
                refresher = asyncio.create_task(metrics.refresh_forever(collector, redis, settings))
                try:
                    await run_all(consumers)
                finally:
                    refresher.cancel()
    except asyncio.CancelledError:
        if not forced:
            raise
        return 128 + forced[0]
    return 0


def _start_metrics(
    settings: Settings, stats: Stats, group: str, handler: AnyHandler
) -> tuple[metrics.ConsumerCollector, TxHandler] | None:
    """Serve Prometheus metrics when METRICS_PORT is set: the collector and the timed handler."""
    if not settings.metrics_port:
        return None
    try:
        collector = metrics.start(
            settings.metrics_port, stats, group, settings.consumer_name, host=settings.metrics_host
        )
    except OSError as error:
        raise CliError(f"cannot serve metrics on port {settings.metrics_port}: {error.strerror}") from None
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    return collector, metrics.timed(with_tx(handler), group)


def run_service(
    prog: str, description: str, group_of: Callable[[Settings], str], handler: AnyHandler
) -> None:
    """The whole `main` of a consumer script: pick its group from the settings and serve."""
    argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=f"{description} Runs until SIGINT/SIGTERM: the first finishes the batch in hand, "
        "a second exits at once. Settings come from the environment and .env (see .env.example).",
    ).parse_args()
    run_script(prog, lambda settings: serve(settings, group_of(settings), handler))
