"""A dead letter's record: every field of the original entry, escaped where a name is taken, and metadata;
and its address, how every tool names one dead letter.

A field whose name is also a metadata name (`group`, ...), or starts with `original.`, is stored
as `original.<name>`, so the record holds both and `original_fields` gives back exactly what
was dead-lettered.

Partitioned, each partition's dead-letter stream makes its own entry ids, so one id may name a
dead letter in each of them: an address is the partition's number and the entry id,
`2:1732530000000-0`; with one partition, the entry id alone. `deadletter`, the dashboard's page
and its JSON all show and take addresses, so an operator acts on the very entry shown.
"""

from __future__ import annotations

import re

META = ("group", "consumer", "source_id", "deliveries", "error", "dead_lettered_at", "truncated")
META_NAMES = frozenset(name.encode() for name in META)
ESCAPE = b"original."  # prefix of an original field whose name collides with metadata


# A record keeps at most this many of the original entry's fields, and this many bytes of them:
# an entry another client wrote can be as wide or as large as Redis allows, and its dead letter is
# one XADD inside the commit's function (core/library.lua: at most 4,000 arguments).
MAX_FIELDS = 1000
MAX_BYTES = 4 * 1024 * 1024


def dead_letter_fields(
    original: dict[bytes, bytes], meta: dict[str, str | int]
) -> dict[bytes, bytes | str | int]:
    """The record to XADD for a dead letter: the original fields (escaped where needed), then `meta`.

    `meta` holds metadata names only (see META); the writer adds `dead_lettered_at` itself. An
    entry wider than MAX_FIELDS or larger than MAX_BYTES keeps its first fields that fit, and
    `truncated` says how many were dropped.
    """
    unknown = set(meta) - set(META)
    if unknown:
        raise ValueError(f"not dead-letter metadata: {sorted(unknown)}")
    record: dict[bytes, bytes | str | int] = {}
    size = dropped = 0
    for name, value in original.items():
        size += len(name) + len(value)
        if len(record) >= MAX_FIELDS or size > MAX_BYTES:
            dropped += 1
            continue
        record[ESCAPE + name if name in META_NAMES or name.startswith(ESCAPE) else name] = value
    for key, meta_value in meta.items():
        record[key.encode()] = meta_value
    if dropped:
        record[b"truncated"] = (
            f"kept {len(original) - dropped:,} of the entry's {len(original):,} fields "
            f"(at most {MAX_FIELDS:,} fields and {MAX_BYTES:,} bytes)"
        )
    return record


def original_fields(record: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Exactly the original entry's fields of a dead letter written by `dead_letter_fields`."""
    original = {}
    for name, value in record.items():
        if name.startswith(ESCAPE):
            original[name[len(ESCAPE) :]] = value
        elif name not in META_NAMES:
            original[name] = value
    return original


# An address as a pattern, for command lines and routes: the partition's number is checked later.
ADDRESS = r"(?:\d+:)?\d+-\d+"


def address(partition: int, entry_id: str, partitions: int) -> str:
    """The address of the dead letter `entry_id` of partition number `partition` of `partitions`."""
    return entry_id if partitions == 1 else f"{partition}:{entry_id}"


def parse_address(text: str, partitions: int) -> tuple[int, str]:
    """The partition number and entry id `text` names; ValueError saying why when it names none for sure.

    Partitioned, an entry id alone is refused: it may name a dead letter in each partition.
    """
    partition, colon, entry_id = text.rpartition(":")
    if not re.fullmatch(ADDRESS, text):
        raise ValueError(f"{text!r} is not a dead letter's address, like 1732530000000-0 (from list)")
    if not colon:
        if partitions > 1:
            raise ValueError(
                f"{text} is an entry id alone: each of the {partitions} partitions makes its own ids, so "
                f"give the address PARTITION:ID that list shows, like 0:{text}"
            )
        return 0, entry_id
    if int(partition) >= partitions:
        have = "only partition 0" if partitions == 1 else f"partitions 0 to {partitions - 1}"
        raise ValueError(f"{text}: there is no partition {int(partition)} (there are {have})")
    return int(partition), entry_id
