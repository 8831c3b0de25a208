"""Inspect and act on the dead-letter stream: list, show, redrive, purge.

Every action works one entry at a time and atomically, so it is idempotent and safe to
interrupt: killed half way, each entry is either still dead-lettered or already moved.
A redriven entry goes back to the orders stream for its own group only (`redrive_for`);
the other group acks and skips it, so it does not process the order twice.

A dead letter keeps every field of the original entry: a field whose name is also a metadata
name (`group`, ...), or starts with `original.`, is stored as `original.<name>`, so the record
holds both and `original_fields` gives back exactly what was dead-lettered.

Each dead letter is named by its address (core/dead_letters.py): its entry id, led by its
partition's number when there are several partitions (`2:1732530000000-0`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError
from redis.typing import EncodableT, FieldT

from config import CliError, ConfigError, Settings, run_script
from core.dead_letters import ADDRESS, META, address, original_fields, parse_address
from core.keys import partitions
from core.messages import Schema, schema_named
from core.replies import parse_id, text
from orders import ORDERS
from redisPool import before_multi, redis_connect

PAGE = 100


def describe(
    entry_id: bytes,
    fields: dict[bytes, bytes],
    max_bytes: int,
    partition: int = 0,
    count: int = 1,
    schema: Schema[Any] = ORDERS,
) -> dict[str, str]:
    """The metadata of one dead letter of partition `partition` of `count`: its address (`id`), its
    entry id, and the message's id (`order_id`: the id field of MESSAGE_SCHEMA's type) whenever
    the payload has a readable one (never the payload)."""
    row = {"id": address(partition, text(entry_id), count), "entry_id": text(entry_id)}
    row.update({name: text(fields.get(name.encode(), b"")) for name in META})
    row["order_id"] = schema.id_in(fields.get(b"data", b""), max_bytes) or ""
    return row


def schema_of(settings: Settings) -> Schema[Any]:
    """The message type MESSAGE_SCHEMA names; ConfigError when it names none."""
    try:
        return schema_named(settings.message_schema)
    except ValueError as error:
        raise ConfigError(f"MESSAGE_SCHEMA: {error}") from None


def locate(settings: Settings, named: str) -> tuple[Settings, str]:
    """The partition (its settings) and entry id of the dead letter at address `named`, or ConfigError."""
    parts = partitions(settings)
    try:
        index, entry_id = parse_address(named, len(parts))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return parts[index], entry_id


async def entries(redis: Redis, settings: Settings, group: str | None) -> AsyncIterator[tuple[bytes, Any]]:
    """Dead letters oldest first, in pages, optionally only those of one group."""
    start = "-"
    while True:
        page: Any = await redis.xrange(settings.dead_letter_stream, min=start, count=PAGE)
        for entry_id, fields in page:
            if group is None or fields.get(b"group") == group.encode():
                yield entry_id, fields
        if len(page) < PAGE:
            return
        start = "(" + text(page[-1][0])


async def redrive(redis: Redis, settings: Settings, entry_id: str) -> str | None:
    """Move one dead letter back to the stream for its group; None if it is not (or no longer) there."""
    dead_letters = settings.dead_letter_stream
    await before_multi(redis)
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(100):  # WATCH fails only when the dead-letter stream changed meanwhile
            try:
                await pipe.watch(dead_letters)
                found: Any = await pipe.xrange(dead_letters, min=entry_id, max=entry_id)
                if not found:
                    return None
                fields = found[0][1]
                original: dict[FieldT, EncodableT] = dict(original_fields(fields).items())
                original[b"redrive_for"] = fields.get(b"group", b"")
                original[b"redriven_from"] = entry_id.encode()
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.xadd(settings.stream_key, original)
                pipe.xdel(dead_letters, entry_id)
                new_id, _ = await pipe.execute()
                return text(new_id)
            except WatchError:
                continue
    raise CliError(f"{entry_id}: the dead-letter stream kept changing; try again")


async def list_command(redis: Redis, settings: Settings, args: argparse.Namespace) -> None:
    max_bytes, schema = settings.max_payload_bytes, schema_of(settings)
    parts = partitions(settings)
    rows = []
    for index, part in enumerate(parts):
        async for entry_id, fields in entries(redis, part, args.group):
            row = describe(entry_id, fields, max_bytes, index, len(parts), schema)
            if settings.partitioned:
                row["partition"] = part.stream_key
            rows.append(row)
    rows.sort(key=lambda row: parse_id(row["entry_id"]))
    rows = rows[-args.limit :] if args.limit is not None else rows
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        total = sum([await redis.xlen(part.dead_letter_stream) for part in parts])
        if args.group is not None and total:
            print(f"no dead letters of group {args.group} ({total} in the stream)")
        else:
            print(f"{_where(settings)} is empty")
    for row in rows:
        print(
            f"{row['id']}  {row['dead_lettered_at'][:19]}  {row['group']:<18} "
            f"deliveries {row['deliveries']:<3} source {row['source_id']}  "
            f"order {row['order_id'] or '-'}  {row['error']}"
            + (f"  in {row['partition']}" if "partition" in row else "")
        )


def _where(settings: Settings) -> str:
    """The dead-letter stream, or every partition's."""
    parts = partitions(settings)
    return (
        parts[0].dead_letter_stream
        if len(parts) == 1
        else f"every partition's dead-letter stream ({len(parts)})"
    )


async def show_command(redis: Redis, settings: Settings, named: str) -> None:
    part, entry_id = locate(settings, named)
    found: Any = await redis.xrange(part.dead_letter_stream, min=entry_id, max=entry_id)
    if not found:
        raise ConfigError(f"no dead letter {named}")
    print(json.dumps({text(k): text(v) for k, v in found[0][1].items()}, indent=2, ensure_ascii=False))


async def move_command(redis: Redis, settings: Settings, args: argparse.Namespace) -> None:
    """Redrive or purge the chosen entries, one at a time, reporting each by its address.

    Partitioned, each entry goes back to its own partition's stream, where its order id routes it anyway.
    """
    parts = partitions(settings)
    chosen: list[tuple[str, Settings, str]]  # address, partition, entry id
    if args.ids:
        chosen = [(named, *locate(settings, named)) for named in args.ids]
    else:
        chosen = [
            (address(index, text(i), len(parts)), part, text(i))
            for index, part in enumerate(parts)
            async for i, _ in entries(redis, part, args.group)
        ]
    if args.command == "purge" and not args.ids and chosen and not args.yes:
        of_group = f" of group {args.group}" if args.group is not None else ""
        await confirm(f"purge {len(chosen)} dead letters{of_group} from {_where(settings)} for good?")
    done = 0
    for named, part, entry_id in chosen:
        outcome = await move(redis, part, args.command, entry_id)
        if outcome is None:
            missing = " (already redriven or purged?)" if args.command == "redrive" else ""
            print(f"{named}: not found{missing}")
            continue
        print(f"{named}: {outcome}" + (f" in {part.stream_key}" if settings.partitioned else ""))
        done += 1
    print(f"{args.command}: {done} of {len(chosen)} entries")


async def move(redis: Redis, part: Settings, command: str, entry_id: str) -> str | None:
    """Redrive or purge one entry of one partition; None when it is not there."""
    if command == "redrive":
        new_id = await redrive(redis, part, entry_id)
        return f"redriven as {new_id}" if new_id else None
    return "purged" if await redis.xdel(part.dead_letter_stream, entry_id) else None


async def confirm(question: str) -> None:
    """Ask on the terminal; anything but yes ends the command with nothing done."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = await asyncio.to_thread(sys.stdin.readline)
    if answer.strip().lower() not in ("y", "yes"):
        raise CliError("not confirmed; nothing purged")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m deadletter",
        description="List, show, redrive or purge entries of DEAD_LETTER_STREAM. Each action is "
        "atomic per entry, idempotent, and safe to interrupt.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    entry_id = "like 1732530000000-0, or partitioned 2:1732530000000-0 (from list)"
    listing = commands.add_parser(
        "list",
        help="one line per dead letter: address, time, group, reason",
        description="One line per dead letter, oldest first: its address (the entry id, led by its "
        "partition's number when there are several), time, group, deliveries, source entry, order id "
        "and error.",
    )
    listing.add_argument("--group", help="only this group's dead letters (default: every group)")
    listing.add_argument(
        "--limit", type=int, metavar="N", help="only the newest N, N at least 1 (default: all of them)"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output (default: text)")
    show = commands.add_parser(
        "show",
        help="every field of one dead letter, payload included",
        description="Every field of one dead letter as JSON, the payload included (it may hold "
        "personal data).",
    )
    show.add_argument("id", metavar="ADDRESS", help=f"the dead letter's address, {entry_id}")
    for name, summary in (
        ("redrive", "send back to the stream for their own group only"),
        ("purge", "delete for good"),
    ):
        sub = commands.add_parser(
            name, help=summary, description=f"{name.capitalize()} dead letters: {summary}."
        )
        sub.add_argument(
            "ids", nargs="*", metavar="ADDRESS", help=f"dead letters' addresses, {entry_id} (default: none)"
        )
        which = sub.add_mutually_exclusive_group()
        which.add_argument(
            "--all", action="store_true", help="every dead letter (default: only the ADDRESSes)"
        )
        which.add_argument("--group", help="every dead letter of this group (default: only the ADDRESSes)")
        if name == "purge":
            sub.add_argument(
                "--yes",
                action="store_true",
                help="purge --all or --group without asking (default: ask on a terminal, "
                "refuse when stdin is not one)",
            )
    return parser


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command in ("redrive", "purge"):
        chosen = bool(args.ids) + args.all + (args.group is not None)
        if chosen != 1:
            parser.error(f"{args.command} needs ADDRESSes, --all or --group (exactly one of them)")
    if args.command == "list" and args.limit is not None and args.limit < 1:
        parser.error("--limit must be 1 or more (leave it out for all)")
    for named in getattr(args, "ids", None) or [getattr(args, "id", None) or "0-0"]:
        if not re.fullmatch(ADDRESS, named):
            parser.error(
                f"{named!r} is not a dead letter's address (like 1732530000000-0, or 2:1732530000000-0)"
            )


async def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "purge" and not args.ids and not args.yes and not sys.stdin.isatty():
        flag = "--all" if args.all else f"--group {args.group}"
        raise ConfigError(f"purge {flag} deletes for good: add --yes (stdin is not a terminal to confirm on)")
    async with redis_connect(settings) as redis:
        if args.command == "list":
            await list_command(redis, settings, args)
        elif args.command == "show":
            await show_command(redis, settings, args.id)
        else:
            await move_command(redis, settings, args)
    return 0


if __name__ == "__main__":
    parser = build_parser()
    arguments = parser.parse_args()
    check(parser, arguments)
    run_script("deadletter", lambda settings: main(settings, arguments))
