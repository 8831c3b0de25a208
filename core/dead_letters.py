"""A dead letter's record: every field of the original entry, escaped where a name is taken, and metadata.

A field whose name is also a metadata name (`group`, ...), or starts with `original.`, is stored
as `original.<name>`, so the record holds both and `original_fields` gives back exactly what
was dead-lettered.
"""

from __future__ import annotations

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
