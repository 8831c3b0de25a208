"""Reply parsing from Redis, in one place: the only module that casts redis-py's loose types."""

from __future__ import annotations

from typing import Any, cast

Entry = tuple[bytes, dict[bytes, bytes]]


def text(value: bytes | str) -> str:
    """A reply value as text (entry ids, names); undecodable bytes are replaced, never raised."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def entries_of(reply: Any) -> list[Entry]:
    """The entries of an XREADGROUP reply for one stream, as (id, fields); RESP2 or RESP3 shape."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [entries]}
        reply = list(reply.items())
    return cast(list[Entry], reply[0][1])


def entries_of_claim(reply: Any) -> list[Entry]:
    """The entries an XCLAIM reply carries, as (id, fields)."""
    return cast(list[Entry], reply)


def commit_of(reply: Any) -> tuple[int, list[bytes], list[str]]:
    """A commit reply as (entries acked, entry ids another consumer holds, refused staged writes)."""
    acked, fenced, errors = reply
    return int(acked), cast(list[bytes], fenced), [text(error) for error in errors]


def pending_rows_of(rows: Any) -> list[tuple[bytes, bytes, int]]:
    """An XPENDING range reply as (entry id, consumer, times delivered)."""
    return [
        (cast(bytes, row["message_id"]), cast(bytes, row["consumer"]), int(row["times_delivered"]))
        for row in rows
    ]
