"""The dedupe guard: a group runs its handler once per order_id within DEDUPE_WINDOW_MS.

Two keys per group: a sorted set of orders done (order_id -> time), and a hash of leases
(order_id -> "until_ms consumer") on orders whose handler is running. Before a batch runs,
one script call says for each order: run it (it is now leased to this consumer), done
already (a producer retry, a redelivery, a replay: ack it without running), or busy (its
handler runs on another consumer that claimed... or was claimed from: leave it pending).
After the handlers, a second script marks the orders done, drops their leases and acks
their entries, atomically, and forgets orders done before the window.

A crash between a handler's effect and that commit can still re-run the handlers of that
batch once their leases expire: at-least-once cannot do better for effects outside Redis,
so make such effects idempotent too. Where scripts are refused, pipelines and MULTI do the
same, slower, and the lease check is no longer atomic.

Memory: about 100 bytes per order and group in the sorted set, kept for DEDUPE_WINDOW_MS.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

log = logging.getLogger("dedupe")


class Decision(enum.IntEnum):
    RUN = 1
    DUPLICATE = 2
    BUSY = 3


# KEYS: done, leases. ARGV: now ms, window start ms, lease until ms, consumer, order ids...
ADMIT_LUA = """
local now, since, mine = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[4]
local decisions = {}
for first = 5, #ARGV, 1000 do
  local last = math.min(first + 999, #ARGV)
  local done = redis.call('ZMSCORE', KEYS[1], unpack(ARGV, first, last))
  local leases = redis.call('HMGET', KEYS[2], unpack(ARGV, first, last))
  local take = {}
  for i = first, last do
    local j = i - first + 1
    local decision = 1
    if done[j] and tonumber(done[j]) >= since then
      decision = 2
    elseif leases[j] then
      local expires, owner = string.match(leases[j], '^(%d+) (.*)$')
      if owner ~= mine and tonumber(expires) > now then decision = 3 end
    end
    if decision == 1 then
      take[#take + 1] = ARGV[i]
      take[#take + 1] = ARGV[3] .. ' ' .. mine
    end
    decisions[#decisions + 1] = decision
  end
  if #take > 0 then redis.call('HSET', KEYS[2], unpack(take)) end
end
return decisions
"""

# KEYS: done, leases, stream. ARGV: now ms, window start ms, group, n, n order ids, entry ids...
COMMIT_LUA = """
local now, n = ARGV[1], tonumber(ARGV[4])
for first = 5, 4 + n, 500 do
  local last = math.min(first + 499, 4 + n)
  local pairs = {}
  for i = first, last do
    pairs[#pairs + 1] = now
    pairs[#pairs + 1] = ARGV[i]
  end
  redis.call('ZADD', KEYS[1], unpack(pairs))
  redis.call('HDEL', KEYS[2], unpack(ARGV, first, last))
end
for first = 5 + n, #ARGV, 1000 do
  redis.call('XACK', KEYS[3], ARGV[3], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
return n
"""


class DedupeGuard:
    """The done set and leases of one (stream, group)."""

    def __init__(
        self, redis: Redis, stream: str, group: str, consumer: str, *, window_ms: int, lease_ms: int
    ) -> None:
        self.redis, self.stream, self.group, self.consumer = redis, stream, group, consumer
        self.done_key = f"{stream}:dedupe-done:{group}"
        self.leases_key = f"{stream}:dedupe-leases:{group}"
        self.window_ms, self.lease_ms = window_ms, lease_ms
        self.admit_script = redis.register_script(ADMIT_LUA)
        self.commit_script = redis.register_script(COMMIT_LUA)
        self.scripts = True

    async def admit(self, order_ids: list[str]) -> list[Decision]:
        """Lease the new orders, in one round trip; say what to do with each."""
        now = int(time.time() * 1000)
        since = now - self.window_ms
        codes: list[int] = []
        if self.scripts:
            try:
                args: list[str | int] = [now, since, now + self.lease_ms, self.consumer, *order_ids]
                codes = list(await self.admit_script(keys=[self.done_key, self.leases_key], args=args))
            except ResponseError as error:
                self._refused(error)
        if not self.scripts:
            codes = await self._admit_piped(order_ids, now, since)
        decisions = []
        in_batch: set[str] = set()
        for order_id, code in zip(order_ids, codes, strict=True):
            duplicate = order_id in in_batch  # the same order twice in one batch
            decisions.append(Decision.DUPLICATE if duplicate else Decision(code))
            in_batch.add(order_id)
        return decisions

    async def _admit_piped(self, order_ids: list[str], now: int, since: int) -> list[int]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zmscore(self.done_key, order_ids)
        pipe.hmget(self.leases_key, order_ids)
        done, leases = await pipe.execute()
        codes: list[int] = []
        for score, lease in zip(done, leases, strict=True):
            if score is not None and score >= since:
                codes.append(Decision.DUPLICATE)
            elif lease is not None and _held_by_other(lease, self.consumer, now):
                codes.append(Decision.BUSY)
            else:
                codes.append(Decision.RUN)
        lease = f"{now + self.lease_ms} {self.consumer}"
        taken = {o: lease for o, c in zip(order_ids, codes, strict=True) if c == Decision.RUN}
        if taken:
            await self.redis.hset(self.leases_key, mapping=taken)  # type: ignore[arg-type]
        return codes

    async def commit(self, order_ids: list[str], entry_ids: list[bytes]) -> None:
        """Mark these orders done, drop their leases and ack these entries, atomically."""
        now = int(time.time() * 1000)
        if self.scripts:
            try:
                keys = [self.done_key, self.leases_key, self.stream]
                args: list[str | int | bytes] = [now, now - self.window_ms, self.group, len(order_ids)]
                args += [*order_ids, *entry_ids]
                await self.commit_script(keys=keys, args=args)
                return
            except ResponseError as error:
                self._refused(error)
        pipe = self.redis.pipeline(transaction=True)
        if order_ids:
            pipe.zadd(self.done_key, dict.fromkeys(order_ids, now))
            pipe.hdel(self.leases_key, *order_ids)
        pipe.xack(self.stream, self.group, *entry_ids)
        pipe.zremrangebyscore(self.done_key, "-inf", f"({now - self.window_ms}")
        await pipe.execute()

    def release(self, pipe: Any, order_id: str) -> None:
        """Queue the removal of an order's lease (when it is dead-lettered instead of done)."""
        pipe.hdel(self.leases_key, order_id)

    def _refused(self, error: ResponseError) -> None:
        """Re-raise unless the server refused scripts; then switch to pipelines, saying so once."""
        if not (isinstance(error, NoPermissionError) or str(error).startswith("NOPERM")):
            raise error
        log.warning("Redis refused scripts (%s); the dedupe guard uses pipelines, slower", error)
        self.scripts = False


def _held_by_other(lease: bytes, consumer: str, now: int) -> bool:
    expires, _, owner = lease.decode().partition(" ")
    return owner != consumer and int(expires) > now
