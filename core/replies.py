"""Reply parsing from Redis, in one place: the only module that casts redis-py's loose types; entry ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

Entry = tuple[bytes, dict[bytes, bytes]]


def text(value: bytes | str) -> str:
    """A reply value as text (entry ids, names); undecodable bytes are replaced, never raised."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _one_stream(reply: Any) -> list[Any]:
    """The entries an XREADGROUP reply holds for its one stream, as Redis sent them; RESP2 or RESP3."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [entries]}
        return cast(list[Any], next(iter(reply.values())))
    return cast(list[Any], reply[0][1])


def entries_of(reply: Any) -> list[Entry]:
    """The entries of an XREADGROUP reply for one stream, as (id, fields); RESP2 or RESP3 shape."""
    return cast(list[Entry], _one_stream(reply))


def raw_entries_of(reply: Any) -> list[Entry]:
    """The entries of a raw (unparsed: `raw_reply=True`) XREADGROUP reply for one stream, as (id, fields).

    Each entry is [id, [field, value, ...]]; an entry deleted while pending has no fields.
    Parsed here rather than by redis-py: the consumer reads a thousand at a time, and this
    is half the cost.
    """
    entries: list[Entry] = []
    for entry_id, flat in _one_stream(reply):
        pairs = iter(flat or ())
        entries.append((entry_id, dict(zip(pairs, pairs, strict=True))))
    return entries


def claimed_entries_of(reply: Any) -> tuple[list[Entry], dict[bytes, int], int]:
    """A raw XREADGROUP ... CLAIM reply (Redis 8.4+) for one stream: the entries, the number of
    this delivery of each one delivered before (a new entry's is 1), and how many of them were
    claimed from the pending list.

    Each entry is [id, [field, value, ...], idle ms, times delivered before]; new entries say 0, 0.
    """
    entries: list[Entry] = []
    deliveries: dict[bytes, int] = {}  # only of entries delivered before: the rest are on their first
    for entry_id, flat, _idle, before in _one_stream(reply):
        pairs = iter(flat or ())
        entries.append((entry_id, dict(zip(pairs, pairs, strict=True))))
        if before:
            deliveries[entry_id] = int(before) + 1
    return entries, deliveries, len(deliveries)


def entries_of_claim(reply: Any) -> list[Entry]:
    """The entries an XCLAIM reply carries, as (id, fields)."""
    return cast(list[Entry], reply)


@dataclass(frozen=True)
class Committed:
    """What Redis said of a commit: entries acked, ids another consumer holds, refused writes,
    and whether another process now holds this consumer's name (then nothing was applied)."""

    acked: int
    fenced: list[bytes]
    errors: list[str]
    name_taken: bool


def commit_of(reply: Any) -> Committed:
    """A commit reply, typed."""
    acked, fenced, errors, taken = reply
    return Committed(int(acked), cast(list[bytes], fenced), [text(error) for error in errors], bool(taken))


def redelivered_of(reply: Any) -> list[tuple[bytes, dict[bytes, bytes], int]]:
    """A redeliver reply: (entry id, fields, delivery count) of each entry delivered again."""
    entries = []
    for entry_id, flat, count in reply:
        pairs = iter(flat or ())
        entries.append((cast(bytes, entry_id), dict(zip(pairs, pairs, strict=True)), int(count)))
    return entries


def pending_rows_of(rows: Any) -> list[tuple[bytes, bytes, int]]:
    """An XPENDING range reply as (entry id, consumer, times delivered)."""
    return [
        (cast(bytes, row["message_id"]), cast(bytes, row["consumer"]), int(row["times_delivered"]))
        for row in rows
    ]


# Stream entry ids as (milliseconds, sequence): compared, formatted and stepped without Redis.
StreamId = tuple[int, int]

LARGEST_PART = 2**64 - 1  # each part of a stream id is an unsigned 64-bit number


def parse_id(entry_id: bytes | str) -> StreamId:
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def format_id(entry_id: StreamId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


def next_id(entry_id: StreamId) -> StreamId:
    """The smallest id above `entry_id` (`5-18446744073709551615` -> `6-0`); the largest id has none."""
    ms, seq = entry_id
    if seq < LARGEST_PART:
        return ms, seq + 1
    if ms < LARGEST_PART:
        return ms + 1, 0
    return entry_id  # nothing can follow it, so nothing is undelivered above it
