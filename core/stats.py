"""A consumer's counters: the shutdown summary line, and what the metrics endpoint exposes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Counters of one consumer process, over its partitions; `waiting` and `oldest_wait_s` are gauges."""

    processed: int = 0
    failed: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    deleted_skipped: int = 0
    redrives_for_other_groups: int = 0
    duplicates_skipped: int = 0
    taken_over: int = 0  # commits dropped: another consumer had taken the entry over
    # Per stream (partition): entries waiting for a retry now, and how long the oldest has waited.
    waits: dict[str, tuple[int, float]] = field(default_factory=dict)

    def count_deleted(self, entries: int) -> None:
        """Pending entries found deleted or trimmed, acked and skipped (or dropped by the lease's touch)."""
        self.deleted_skipped += entries

    @property
    def waiting(self) -> int:
        return sum(count for count, _ in self.waits.values())

    @property
    def oldest_wait_s(self) -> float:
        return max((oldest for _, oldest in self.waits.values()), default=0.0)

    def __str__(self) -> str:
        counters = [f"{name}={value}" for name, value in vars(self).items() if name != "waits"]
        return ", ".join([*counters, f"waiting={self.waiting}"])
