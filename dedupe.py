"""The dedupe guard: a group runs its handler once per order_id within DEDUPE_WINDOW_MS.

Before a batch runs, one pipelined `SET key run:<consumer> NX GET PX lease` per order says
whether the order is new (run it), done already (a producer retry or a redelivery: ack it
without running), or running on another consumer (a slow handler whose entry was claimed:
leave it pending). After the handlers, the `done` marks are written in the same MULTI as
the XACK. A crash between a handler's effect and that commit can still re-run the handlers
of that batch once the lease expires: at-least-once cannot do better for effects outside
Redis, so make such effects idempotent too.

Memory: one key per order and group, about 140 bytes (120 for the key, ~20 for its expiry),
kept for DEDUPE_WINDOW_MS.
"""

from __future__ import annotations

import enum

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

DONE = b"done"


class Decision(enum.Enum):
    RUN = "run"
    DUPLICATE = "duplicate"
    BUSY = "busy"


class DedupeGuard:
    """Per (stream, group) order_id marks with a lease while a handler runs."""

    def __init__(
        self, redis: Redis, stream: str, group: str, consumer: str, window_ms: int, lease_ms: int
    ) -> None:
        self.redis = redis
        self.prefix = f"{stream}:dedupe:{group}:"
        self.mine = f"run:{consumer}".encode()
        self.window_ms = window_ms
        self.lease_ms = lease_ms

    async def admit(self, order_ids: list[str]) -> list[Decision]:
        """Take a lease on each order, in one round trip; say what to do with each."""
        pipe = self.redis.pipeline(transaction=False)
        for order_id in order_ids:
            pipe.set(self.prefix + order_id, self.mine, nx=True, px=self.lease_ms, get=True)
        decisions = []
        in_batch: set[str] = set()
        for order_id, previous in zip(order_ids, await pipe.execute(), strict=True):
            if previous == DONE or order_id in in_batch:
                decisions.append(Decision.DUPLICATE)
            elif previous is None or previous == self.mine:  # new, or ours from before a restart
                decisions.append(Decision.RUN)
            else:
                decisions.append(Decision.BUSY)
            in_batch.add(order_id)
        return decisions

    def mark_done(self, pipe: Pipeline, order_ids: list[str]) -> None:
        """Queue the `done` marks into the transaction that acks these orders."""
        for order_id in order_ids:
            pipe.set(self.prefix + order_id, DONE, px=self.window_ms)
