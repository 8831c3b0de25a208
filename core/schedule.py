"""What one consumer has due, decided in one place: its own entries, retries, an outage probe,
the reclaim sweep, maintenance, or new entries; and how long a read of new entries may block.

A failed entry waits for its retry here: RETRY_DELAY_MS after its first failure, RETRY_BACKOFF
times longer after each next one, at most RETRY_MAX_DELAY_MS, each wait up to a quarter longer
(so a batch's retries spread out). With the defaults the waits are 1 s, 10 s, 100 s and 600 s:
an order is dead-lettered only after nearly 12 minutes of failing. It stays pending on this
consumer meanwhile (its lease covers it) and holds up nothing else.

A downstream outage is when the handler fails for OUTAGE_AFTER different entries in a row,
none succeeding between. Then the consumer takes no new work (new orders wait in the stream,
as lag), runs nothing else it holds, and probes instead: one order per probe interval (the one
waiting longest, a new one only when none waits), the interval doubling from RETRY_DELAY_MS
up to 30 s (PROBE_MAX_MS). Probes and entries held meanwhile do not count toward MAX_DELIVERIES: an
outage of any length dead-letters nothing. The first success ends it, and every entry waiting
is retried at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from config import PROBE_MAX_MS, Settings
from core.recovery import pause

log = logging.getLogger("stream_consumer")

OUTAGE_AFTER = 5  # entries in a row whose handler failed, none succeeding between: an outage
JITTER = 0.25  # each wait is lengthened by up to this much, so a batch's retries spread out


class Work(enum.Enum):
    OWN = "own"  # read this consumer's own pending entries again (at start, after a Redis failure)
    RETRY = "retry"  # entries whose retry is due
    PROBE = "probe"  # an outage: try one order
    SWEEP = "sweep"  # take over what consumers that are gone left pending
    MAINTAIN = "maintain"  # trim, remove stale consumers
    NEW = "new"  # read new entries
    WAIT = "wait"  # an outage, and nothing due before the next probe


def retry_wait_s(settings: Settings, failures: int) -> float:
    """The wait before the retry that follows the `failures`-th failure (1, 2, ...), without jitter:
    RETRY_DELAY_MS, then RETRY_BACKOFF times longer each time, at most RETRY_MAX_DELAY_MS."""
    growth: int = settings.retry_backoff ** min(max(failures - 1, 0), 40)
    return min(settings.retry_delay_ms * growth, settings.retry_max_delay_ms) / 1000


def probe_wait_s(settings: Settings, probes: int) -> float:
    """The wait after the `probes`-th probe of an outage: RETRY_DELAY_MS, doubling, at most
    PROBE_MAX_MS (or RETRY_MAX_DELAY_MS, if shorter): the outage's end is seen that soon."""
    growth: int = 2 ** min(max(probes - 1, 0), 40)
    return min(settings.retry_delay_ms * growth, settings.retry_max_delay_ms, PROBE_MAX_MS) / 1000


def jittered(seconds: float) -> float:
    return seconds * random.uniform(1, 1 + JITTER)


def schedule_text(settings: Settings) -> str:
    """The retry schedule in words, for --help and status."""
    waits = [retry_wait_s(settings, n) for n in range(1, settings.max_deliveries)]
    shown = ", ".join(_seconds(wait) for wait in waits) or "no retry"
    return (
        f"a failed order is retried after {shown} (each up to {JITTER:.0%} longer), {_seconds(sum(waits))} "
        f"in all, and dead-lettered when delivery {settings.max_deliveries} fails too; during a "
        f"downstream outage (the handler failing for {OUTAGE_AFTER} orders in a row) nothing counts and "
        f"nothing is dead-lettered: one order is tried every {_seconds(probe_wait_s(settings, 1))} to "
        f"{_seconds(probe_wait_s(settings, 100))} until one succeeds"
    )


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:g}s"
    if value < 3600:
        return f"{value / 60:.3g}m"
    return f"{value / 3600:.3g}h"


@dataclass
class Waiting:
    """An entry pending on this consumer, waiting for its retry."""

    due: float  # loop time; inf while an outage holds it
    delivery: int  # its delivery that failed, or that an outage held back without running it
    counts: bool  # whether that delivery counts toward MAX_DELIVERIES (not if held in an outage)

    @property
    def next_delivery(self) -> int:
        """The delivery count its retry carries: deliveries that ran, never re-reads or outages."""
        return self.delivery + 1 if self.counts else self.delivery


class Schedule:
    """One consumer's due work, the entries waiting for a retry, and a downstream outage if any."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.own_due = True  # at start its own pending entries come first
        self.next_sweep = 0.0
        self.maintain_every = settings.maintenance_interval_ms / 1000
        self.next_maintenance = 0.0
        self.waiting: dict[bytes, Waiting] = {}
        self.since: dict[bytes, float] = {}  # when each entry waiting or in a retry first failed or was held
        self.failing: set[bytes] = set()  # entries failed since the last success
        self.outage_since: float | None = None
        self.probes = 0  # probes of this outage so far
        self.next_probe = 0.0

    # --- what is due ----------------------------------------------------------------------

    def due(self) -> Work:  # noqa: PLR0911 - one return per kind of work, in order of urgency
        """The work due now, most urgent first."""
        now = time.monotonic()
        if self.own_due:
            return Work.OWN
        if self.outage_since is not None:
            if now >= self.next_probe:
                return Work.PROBE
            if self.maintain_every and now >= self.next_maintenance:
                return Work.MAINTAIN
            return Work.WAIT
        if self.waiting and self._next_retry() <= now:
            return Work.RETRY
        if now >= self.next_sweep:
            return Work.SWEEP
        if self.maintain_every and now >= self.next_maintenance:
            return Work.MAINTAIN
        return Work.NEW

    def block_ms(self) -> int:
        """How long a read of new entries may wait: BLOCK_MS, or less when other work falls due sooner."""
        wake = min(self.next_sweep, self._next_retry())
        if self.maintain_every:
            wake = min(wake, self.next_maintenance)
        return max(1, min(self.settings.block_ms, int((wake - time.monotonic()) * 1000)))

    async def wait(self, stop: asyncio.Event) -> None:
        """Sleep until the next probe or maintenance is due, or `stop`."""
        wake = self.next_probe
        if self.maintain_every:
            wake = min(wake, self.next_maintenance)
        await pause(stop, wake - time.monotonic())

    def _next_retry(self) -> float:
        return min((waiting.due for waiting in self.waiting.values()), default=math.inf)

    # --- what happened ---------------------------------------------------------------------

    def swept(self, full_page: bool) -> None:
        """The sweep ran: again at once while it finds full pages, else in CLAIM_IDLE_MS / 2."""
        if not full_page:
            self.next_sweep = time.monotonic() + max(self.settings.claim_idle_ms / 2000, 0.05)

    def maintained(self) -> None:
        self.next_maintenance = time.monotonic() + self.maintain_every

    def due_retries(self, limit: int) -> list[tuple[bytes, int]]:
        """Up to `limit` entries whose retry is due, longest due first, each with the delivery count
        its retry carries. They wait on until delivered again (`forget`): if the reply of that is
        lost, a re-read of the consumer's own entries leaves them to their retry."""
        now = time.monotonic()
        due = sorted((w.due, entry_id) for entry_id, w in self.waiting.items() if w.due <= now)[:limit]
        return [(entry_id, self.waiting[entry_id].next_delivery) for _, entry_id in due]

    def longest_waiting(self) -> tuple[bytes, int] | None:
        """The entry waiting longest (for a probe), with the delivery count it carries."""
        if not self.waiting:
            return None
        entry_id = min(self.waiting, key=lambda key: (self.waiting[key].due, key))
        return entry_id, self.waiting[entry_id].next_delivery

    def redelivered(self, entry_ids: Iterable[bytes]) -> None:
        """These entries were delivered again for their retry (or are no longer this consumer's)."""
        for entry_id in entry_ids:
            self.waiting.pop(entry_id, None)

    def forget(self, entry_ids: Iterable[bytes]) -> None:
        """These entries are settled or gone from this consumer: no retry waits for them."""
        for entry_id in entry_ids:
            self.waiting.pop(entry_id, None)
            self.since.pop(entry_id, None)

    def hold(self, entry_id: bytes, delivery: int) -> None:
        """An outage: this entry is not run now, and its `delivery` does not count."""
        self.waiting[entry_id] = Waiting(math.inf, delivery, counts=False)
        self.since.setdefault(entry_id, time.monotonic())

    def probing(self) -> None:
        """A probe starts now: the next one is due after a longer wait, whatever this one finds."""
        self.probes += 1
        self.next_probe = time.monotonic() + jittered(probe_wait_s(self.settings, self.probes))

    def failed(self, entry_id: bytes, delivery: int, error: BaseException) -> None:
        """The handler failed on this entry's `delivery`-th delivery."""
        if self.outage_since is not None:  # a probe failed: it waits with the rest
            self.hold(entry_id, delivery)
            return
        due = time.monotonic() + jittered(retry_wait_s(self.settings, delivery))
        self.waiting[entry_id] = Waiting(due, delivery, counts=True)
        self.since.setdefault(entry_id, time.monotonic())
        self.failing.add(entry_id)
        if len(self.failing) >= OUTAGE_AFTER:
            self.outage_since = time.monotonic()
            self.probes = 0
            self.next_probe = time.monotonic() + jittered(probe_wait_s(self.settings, 1))
            for waiting in self.waiting.values():
                waiting.due = math.inf
            log.warning(
                "the handler failed for %d entries in a row, last: %s: %s; a downstream outage? Taking "
                "no new entries and probing with one order at a time until one succeeds (%d wait; "
                "nothing counts toward MAX_DELIVERIES meanwhile)",
                len(self.failing),
                type(error).__name__,
                error,
                len(self.waiting),
            )

    def succeeded(self) -> None:
        """The handler succeeded: an outage, if any, is over, and what waits is retried now."""
        self.failing.clear()
        if self.outage_since is None:
            return
        log.warning(
            "the handler succeeded again after %.1f s of outage (%d probes); taking new entries, "
            "retrying the %d waiting now",
            time.monotonic() - self.outage_since,
            self.probes,
            len(self.waiting),
        )
        self.outage_since = None
        now = time.monotonic()
        for waiting in self.waiting.values():
            waiting.due = now

    @property
    def in_outage(self) -> bool:
        return self.outage_since is not None

    def outage_s(self) -> float:
        """How long the downstream outage has lasted; 0 without one."""
        return 0.0 if self.outage_since is None else time.monotonic() - self.outage_since

    def oldest_wait_s(self) -> float:
        """How long the entry waiting longest for its retry has waited since its first failure."""
        return max(0.0, time.monotonic() - min(self.since.values())) if self.since else 0.0
