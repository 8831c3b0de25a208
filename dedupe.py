"""The dedupe guard: a group runs its handler once per order_id within DEDUPE_WINDOW_MS.

Per group, a sorted set holds the orders done (order_id -> time) and each consumer keeps a
heartbeat key alive while it works. Before a batch runs, one ZMSCORE says which orders are
done already (a producer retry, a redelivery after a lost ack, a replay): those are acked
without running. After the handlers, one MULTI marks the orders done, acks their entries,
refreshes the heartbeat and forgets orders done before the window. When a consumer claims
entries from another consumer whose heartbeat is still fresh (a slow handler, not a dead
one), it leaves them pending instead of running them a second time.

A crash between a handler's effect and that commit can still re-run the handlers of that
batch: at-least-once cannot do better for effects outside Redis, so make such effects
idempotent too. Memory: about 120 bytes per order and group, kept for DEDUPE_WINDOW_MS.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable

from redis.asyncio import Redis


class Decision(enum.Enum):
    RUN = "run"
    DUPLICATE = "duplicate"


class DedupeGuard:
    """The done set of one (stream, group), and this consumer's heartbeat."""

    def __init__(
        self, redis: Redis, stream: str, group: str, consumer: str, *, window_ms: int, heartbeat_ms: int
    ) -> None:
        self.redis, self.stream, self.group = redis, stream, group
        self.done_key = f"{stream}:dedupe-done:{group}"
        self.alive_prefix = f"{stream}:dedupe-alive:{group}:"
        self.heartbeat_key = self.alive_prefix + consumer
        self.window_ms, self.heartbeat_ms = window_ms, heartbeat_ms

    async def admit(self, order_ids: list[str]) -> list[Decision]:
        """Say which orders to run, in one round trip that also refreshes the heartbeat."""
        now = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zmscore(self.done_key, order_ids)
        pipe.set(self.heartbeat_key, now, px=self.heartbeat_ms)
        scores, _ = await pipe.execute()
        since = now - self.window_ms
        decisions = []
        in_batch: set[str] = set()
        for order_id, score in zip(order_ids, scores, strict=True):
            done = (score is not None and score >= since) or order_id in in_batch
            decisions.append(Decision.DUPLICATE if done else Decision.RUN)
            in_batch.add(order_id)
        return decisions

    async def alive(self, consumers: Iterable[bytes]) -> set[bytes]:
        """Those of these consumers whose heartbeat is fresh."""
        names = list(set(consumers))
        if not names:
            return set()
        beats = await self.redis.mget([self.alive_prefix + name.decode() for name in names])
        return {name for name, beat in zip(names, beats, strict=True) if beat is not None}

    async def commit(self, order_ids: list[str], entry_ids: list[bytes]) -> None:
        """Mark these orders done and ack these entries, atomically."""
        now = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=True)
        if order_ids:
            pipe.zadd(self.done_key, dict.fromkeys(order_ids, now))
        pipe.xack(self.stream, self.group, *entry_ids)
        pipe.zremrangebyscore(self.done_key, "-inf", f"({now - self.window_ms}")
        pipe.set(self.heartbeat_key, now, px=self.heartbeat_ms)
        await pipe.execute()
