"""Taking over what consumers that are gone left pending: idle entries whose owner's lease lapsed.

An entry whose owner's lease is alive is left alone, however long its handler takes: its owner
is slow, not dead. Ownership moves (XCLAIM, with the idle time checked again so that of two
sweeps only the first gets an entry) only for the others. On Redis 8.4+ reads claim idle
entries themselves; the sweep still runs there, for entries deleted while pending, which such
a read skips and would leave pending forever: XCLAIM drops them.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis

from config import Settings
from core.library import Fence
from core.reading import EMPTY, Batch
from core.replies import entries_of_claim, pending_rows_of, text
from core.schedule import Schedule
from core.stats import Stats

log = logging.getLogger("stream_consumer")


class Reclaim:
    """One consumer's sweep of its group's pending entries, a page per call."""

    def __init__(
        self, redis: Redis, settings: Settings, fence: Fence, schedule: Schedule, stats: Stats
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.fence = fence
        self.schedule = schedule
        self.stats = stats
        self.cursor = "-"
        self.name = fence.consumer.encode()

    async def sweep(self) -> Batch:
        """One page of idle entries: those of consumers that are gone, claimed, as a batch."""
        idle = self.settings.claim_idle_ms
        keys = self.fence.keys
        if self.cursor == "-":
            await self._check_own()
        rows = pending_rows_of(
            await self.redis.xpending_range(
                keys.stream,
                self.fence.group,
                min=self.cursor,
                max="+",
                count=self.settings.batch_size,
                idle=idle,
            )
        )
        full = len(rows) == self.settings.batch_size
        self.cursor = "(" + text(rows[-1][0]) if full else "-"
        self.schedule.swept(full)
        owners = sorted({owner for _, owner, _ in rows if owner != self.name})
        alive = await self._alive(owners)
        orphans = {
            entry_id: times for entry_id, owner, times in rows if owner != self.name and owner not in alive
        }
        if not orphans:
            return EMPTY
        claimed = entries_of_claim(
            await self.redis.xclaim(
                keys.stream,
                self.fence.group,
                self.fence.consumer,
                min_idle_time=idle,
                message_ids=list(orphans),
            )
        )
        self.stats.deleted_skipped += len(orphans) - len(claimed)  # XCLAIM drops deleted entries
        if claimed:
            log.info("claimed %d entries idle over %d ms from consumers that are gone", len(claimed), idle)
            self.stats.reclaimed += len(claimed)
        return Batch(claimed, {entry_id: orphans[entry_id] + 1 for entry_id, _ in claimed})

    async def _check_own(self) -> None:
        """Read this consumer's own entries again if Redis holds more of them pending than it knows
        of: a delivery whose reply was lost, or an ack a failover undid (the old master confirmed
        it, its replica never had it). Everything else it holds waits for a retry: the sweep runs
        between batches, after their commit."""
        summary: Any = await self.redis.xpending(self.fence.keys.stream, self.fence.group)
        mine = next((int(c["pending"]) for c in summary["consumers"] if c["name"] == self.name), 0)
        if mine > len(self.schedule.waiting):
            self.schedule.own_due = True

    async def _alive(self, owners: list[bytes]) -> set[bytes]:
        """Those of these consumers whose lease has not lapsed."""
        if not owners:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for owner in owners:
            pipe.exists(self.fence.keys.lease(self.fence.group, text(owner)))
        return {owner for owner, found in zip(owners, await pipe.execute(), strict=True) if found}
