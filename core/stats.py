"""A consumer's counters: the shutdown summary line, and what the metrics endpoint exposes."""

from __future__ import annotations

from dataclasses import dataclass


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
    waiting: int = 0  # entries waiting for a retry now
    oldest_wait_s: float = 0.0  # how long the one waiting longest has waited

    def __str__(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in vars(self).items() if name != "oldest_wait_s")
