"""Each group's lag (the entries not yet delivered to it), right where Redis's own figure is not.

Autoscalers (KEDA's Redis Streams scaler, `lagCount`) and alerts read `XINFO GROUPS` lag, which
Redis keeps from two counters and gets wrong, or cannot tell (NULL), in cases this project meets:

- Redis before 7.4 replicates a group's reads as `XCLAIM ... LASTID`, without the read counter:
  after an AOF reload (or on a replica that took over) the counter is as old as the last AOF
  rewrite, and the lag too high by every entry read since, even with an empty stream;
- an entry not yet delivered was trimmed or deleted (Redis 7.0 counts a trimmed one for ever;
  a deleted one makes it NULL until the group reads past it);
- a group was set to an id in the middle of the stream (`XGROUP SETID`, a replay): NULL.

The library's `lags` counts instead, in one atomic call: exact at no cost when a group has read
everything or is behind the first entry, else by counting the entries after its last-delivered id
(or the stream's length less those up to it) while there are at most COUNT_LIMIT of them
(FIX_COUNT_LIMIT for maintenance). Past that it knows bounds only, and takes Redis's figure when
it lies between them. `status`, the dashboard and the metrics show this lag; `maintenance` writes
it back into Redis (`fix_lags`: `XGROUP SETID` to the same id, with `ENTRIESREAD`), so what a
scaler reads is right too, except while a deleted entry lies ahead of the group, where Redis
ignores that counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from core import library
from core.replies import text

# Entries counted at most on each side of a group's last-delivered id, inside Redis, in one call
# that blocks it for 1.2 to 2.5 ms a thousand (docs/operating.md): by status, the dashboard and the
# metrics, every few seconds; by maintenance, once a pass, with more at stake (what a scaler reads).
COUNT_LIMIT = 1000
FIX_COUNT_LIMIT = 2000


@dataclass(frozen=True)
class GroupLag:
    """One group's lag and pending count, and what XINFO GROUPS says of its lag."""

    lag: int  # counted; when not exact, Redis's figure if it lies within the bounds, else the nearer bound
    exact: bool
    pending: int
    redis_lag: int | None  # XINFO GROUPS lag, None for NULL (after `fix`: as Redis says it now)
    redis_lag_before: int | None  # before `fix` corrected it; the same without `fix`
    deleted_ahead: bool  # a deleted entry after the group's id: Redis ignores its counter until it passes

    @property
    def corrected(self) -> bool:
        return self.redis_lag != self.redis_lag_before


async def group_lags(redis: Redis, stream: str, fix: bool = False) -> dict[str, GroupLag]:
    """Every group of `stream` and its lag (none when the stream is missing); with `fix`, Redis's
    own figure corrected where it differs from an exact count."""
    if fix:
        reply = await redis.fcall(library.function("fix_lags"), 1, stream, FIX_COUNT_LIMIT)
    else:
        reply = await redis.fcall_ro(library.function("lags"), 1, stream, COUNT_LIMIT)
    return {text(row[0]): _group_lag(row) for row in reply}


def _group_lag(row: Any) -> GroupLag:
    _, pending, low, high, before, after, deleted_ahead = row
    low, high = int(low), int(high)
    said = None if after is None else int(after)
    lag = low if said is None else min(max(said, low), high)
    return GroupLag(
        lag=lag,
        exact=low == high,
        pending=int(pending),
        redis_lag=said,
        redis_lag_before=None if before is None else int(before),
        deleted_ahead=bool(deleted_ahead),
    )
