"""Where a consumer's entries come from: new ones, its own pending ones, and retries.

New entries come from `XREADGROUP ... >`; from Redis 8.4 the same read also claims entries idle
longer than CLAIM_IDLE_MS (`CLAIM`): their owners are gone, for a live owner's lease process
keeps everything it holds fresh (core/lease.py). On one Redis the ledger's commit travels in the
same write as the read, and under a backlog the next batch is read while this one's handlers
run (`new_while`); on a cluster, where a failover moves slots, commit and read go one by one.
Its own pending entries are read again from id 0 after a start or a failure, the cursor
advancing so an entry that keeps failing cannot spin; entries due for a retry are delivered
again by the library's `redeliver`, only while still this consumer's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT

from config import Settings
from core.ledger import Ledger
from core.library import Fence
from core.replies import Entry, claimed_entries_of, commit_of, pending_rows_of, raw_entries_of
from core.schedule import Schedule
from core.stats import Stats

log = logging.getLogger("stream_consumer")


@dataclass
class Batch:
    """Entries delivered together, with the delivery count of those delivered before (others: 1)."""

    entries: list[Entry] = field(default_factory=list)
    deliveries: dict[bytes, int] = field(default_factory=dict)
    full: bool = False  # as many as BATCH_SIZE: a backlog, likely
    ahead: bool = False  # read while the batch before it ran
    probe: bool = False  # one order to try during a downstream outage: run, though the rest wait


EMPTY = Batch()


class Reader:
    """One consumer's reads of one stream."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        fence: Fence,
        ledger: Ledger,
        schedule: Schedule,
        stats: Stats,
        answered: Callable[[], None],
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.fence = fence
        self.ledger = ledger
        self.schedule = schedule
        self.stats = stats
        self.answered = answered  # Redis replied: an outage, if any, is over
        self.one_trip = True  # the commit and the read in one write, and reading ahead: one Redis only
        self.claim_on_read = False  # Redis 8.4+: XREADGROUP ... CLAIM
        self.own_cursor = b"0"
        self.at_start = True  # the first pass over its own entries: a process before may have run them
        self.head = ("XREADGROUP", "GROUP", fence.group, fence.consumer, "COUNT", settings.batch_size)

    def command(self, cursor: bytes | str, *options: EncodableT) -> tuple[EncodableT, ...]:
        return (*self.head, *options, "STREAMS", self.fence.keys.stream, cursor)

    def _new_command(self, block_ms: int | None) -> tuple[EncodableT, ...]:
        options: tuple[EncodableT, ...] = () if block_ms is None else ("BLOCK", block_ms)
        if self.claim_on_read:
            options += ("CLAIM", self.settings.claim_idle_ms)
        return self.command(">", *options)

    def _batch_of(self, reply: Any, ahead: bool = False) -> Batch:
        """A read of new entries, parsed (with CLAIM: what it took from gone consumers counted)."""
        if not self.claim_on_read:
            entries, deliveries = raw_entries_of(reply), dict[bytes, int]()
        else:
            entries, deliveries, claimed = claimed_entries_of(reply)
            if claimed:
                log.info(
                    "claimed %d entries idle over %d ms from consumers that are gone",
                    claimed,
                    self.settings.claim_idle_ms,
                )
                self.stats.reclaimed += claimed
        return Batch(entries, deliveries, len(entries) == self.settings.batch_size, ahead)

    async def new(self, block_ms: int) -> Batch:
        """New entries, waiting up to `block_ms` for some; the commit of what is done goes first."""
        if not self.one_trip:
            await self.ledger.commit()
            reply = await self.redis.execute_command(*self._new_command(block_ms), raw_reply=True)  # type: ignore[no-untyped-call]
            self.answered()
            return self._batch_of(reply)
        commit = self.ledger.take()
        commands = [commit, self._new_command(block_ms)] if commit else [self._new_command(block_ms)]
        async with self._connection() as connection:
            await connection.send_packed_command(connection.pack_commands(commands))  # one write
            if commit:  # answered at once, while the read may block: settled now, not with the read
                await self._committed(await _reply(connection))
            read = await _reply(connection)
        return self._batch_of(_raised(read))

    async def new_while(self, handle: Callable[[Batch], Awaitable[None]], batch: Batch) -> Batch:
        """Handle `batch` while Redis serves the read of the next one; commit it the moment it is
        handled, on the same connection. The next batch, read ahead."""
        async with self._connection() as connection:
            await connection.send_command(*self._new_command(None))
            await handle(batch)
            commit = self.ledger.take()
            if commit:
                await connection.send_command(*commit)
            read = await _reply(connection)
            committed = await _reply(connection) if commit else None
        if committed is not None:
            await self._committed(committed)
        return self._batch_of(_raised(read), ahead=True)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection for commands sent and replies read by hand. If they are not all read
        (an error, a cancel), replies may still be on their way: the commits sent are taken as lost
        (sent again) and that connection is done."""
        pool = self.redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            yield connection
        except BaseException:
            self.ledger.lost()
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    async def _committed(self, reply: Any) -> None:
        """The reply to a commit sent with a read."""
        if isinstance(reply, ResponseError):
            if not self.ledger.refused(reply):
                self.ledger.lost()
                raise reply
            await self.ledger.commit_apart(reply)
            return
        self.answered()
        self.ledger.answered(commit_of(reply))

    async def own(self) -> Batch:
        """The next page of this consumer's own pending entries; empty once they are all read.

        Those waiting for a retry stay waiting: only deliveries whose reply was lost run now. At
        start each counts as a delivery (a process before this one may have run it: XREADGROUP
        from 0, which also registers the consumer). After a Redis failure in this process, the
        delivery whose reply was lost never ran: each is delivered again with Redis's count as it
        is (the library's `redeliver`), so neither that delivery nor a re-read whose reply is lost
        too counts as a try.
        """
        if not self.at_start:
            return await self._own_again()
        reply = await self.redis.execute_command(*self.command(self.own_cursor), raw_reply=True)  # type: ignore[no-untyped-call]
        self.answered()
        entries = raw_entries_of(reply)
        if not entries:
            self.own_cursor, self.schedule.own_due, self.at_start = b"0", False, False
            return EMPTY
        self.own_cursor = entries[-1][0]  # past what was read: an entry that keeps failing cannot spin
        entries = [entry for entry in entries if entry[0] not in self.schedule.waiting]
        if not entries:
            return EMPTY
        rows = await self.redis.xpending_range(
            self.fence.keys.stream,
            self.fence.group,
            min=entries[0][0],
            max=entries[-1][0],
            count=self.settings.batch_size,
            consumername=self.fence.consumer,
        )
        counts = {entry_id: times for entry_id, _, times in pending_rows_of(rows)}
        return Batch(entries, counts)

    async def _own_again(self) -> Batch:
        """A page of own entries after a Redis failure, each delivered again with its count as it is."""
        rows = await self.redis.xpending_range(
            self.fence.keys.stream,
            self.fence.group,
            min=b"-" if self.own_cursor == b"0" else b"(" + self.own_cursor,
            max=b"+",
            count=self.settings.batch_size,
            consumername=self.fence.consumer,
        )
        self.answered()
        pending = pending_rows_of(rows)
        if not pending:
            self.own_cursor, self.schedule.own_due = b"0", False
            return EMPTY
        self.own_cursor = pending[-1][0]
        due = [(entry_id, times) for entry_id, _, times in pending if entry_id not in self.schedule.waiting]
        if not due:
            return EMPTY
        batch = await self._redeliver(due)
        self.stats.deleted_skipped += len(due) - len(batch.entries)  # XCLAIM drops deleted entries
        return batch

    async def retries(self, due: list[tuple[bytes, int]]) -> Batch:
        """Deliver again the entries due for a retry that are still this consumer's, each with the
        delivery count given (the deliveries that ran: a re-read or an outage adds nothing)."""
        batch = await self._redeliver(due)
        self.schedule.redelivered(entry_id for entry_id, _ in due)
        gone = len(due) - len(batch.entries)  # taken over by another consumer, or deleted
        if gone:
            log.info(
                "%d entries due for a retry were no longer this consumer's (taken over or deleted)", gone
            )
        batch.entries.sort(key=lambda entry: entry[0])
        return batch

    async def _redeliver(self, due: list[tuple[bytes, int]]) -> Batch:
        """Those of `due` (entry id, delivery count) still this consumer's, delivered again with that
        count (the library's `redeliver`: a reply lost and the call sent again adds nothing)."""
        entries: list[Entry] = []
        deliveries: dict[bytes, int] = {}
        for entry_id, fields, delivery in await self.fence.redeliver(due):
            entries.append((entry_id, fields))
            deliveries[entry_id] = delivery
        self.answered()
        return Batch(entries, deliveries)

    async def probe(self) -> Batch:
        """One order to probe a downstream outage with: the one waiting longest, else a new one (new
        orders wait in the stream meanwhile, as lag, rather than burn their deliveries)."""
        self.schedule.probing()
        longest = self.schedule.longest_waiting()
        batch = EMPTY if longest is None else await self.retries([longest])
        if not batch.entries:  # nothing waits (or it was taken over): a new order
            reply = await self.redis.execute_command(*self._one_new(), raw_reply=True)  # type: ignore[no-untyped-call]
            self.answered()
            batch = self._batch_of(reply)
        return dataclasses.replace(batch, probe=True)

    def _one_new(self) -> tuple[EncodableT, ...]:
        options: tuple[EncodableT, ...] = ("CLAIM", self.settings.claim_idle_ms) if self.claim_on_read else ()
        head = (*self.head[:-1], 1)
        return (*head, *options, "STREAMS", self.fence.keys.stream, ">")


async def _reply(connection: Any) -> Any:
    """The next reply on `connection`; an error reply as its ResponseError, not raised."""
    try:
        return await connection.read_response()
    except ResponseError as error:
        return error


def _raised(reply: Any) -> Any:
    if isinstance(reply, ResponseError):
        raise reply
    return reply
