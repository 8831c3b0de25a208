"""Inspect and act on the dead-letter stream: list, show, redrive, purge.

Every action works one entry at a time and atomically, so it is idempotent and safe to
interrupt: killed half way, each entry is either still dead-lettered or already moved.
A redriven entry goes back to the orders stream for its own group only (`redrive_for`);
the other group acks and skips it, so it does not process the order twice.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from config import CliError, ConfigError, Settings, run_script
from orders import InvalidOrder, parse_order
from redisPool import redis_connect
from replies import text

META = ("group", "consumer", "source_id", "deliveries", "error", "dead_lettered_at")
PAGE = 100


def describe(entry_id: bytes, fields: dict[bytes, bytes], max_bytes: int) -> dict[str, str]:
    """The metadata of one dead letter, with the order id when the payload is an order (never the payload)."""
    row = {"id": text(entry_id)}
    row.update({name: text(fields.get(name.encode(), b"")) for name in META})
    try:
        row["order_id"] = parse_order(fields.get(b"data", b""), max_bytes).order_id
    except InvalidOrder:
        row["order_id"] = ""
    return row


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
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(100):  # WATCH fails only when the dead-letter stream changed meanwhile
            try:
                await pipe.watch(dead_letters)
                found: Any = await pipe.xrange(dead_letters, min=entry_id, max=entry_id)
                if not found:
                    return None
                fields = found[0][1]
                original = {k: v for k, v in fields.items() if k.decode() not in META}
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
    max_bytes = settings.max_payload_bytes
    rows = [describe(i, f, max_bytes) async for i, f in entries(redis, settings, args.group)]
    rows = rows[-args.limit :] if args.limit else rows
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(f"{settings.dead_letter_stream} is empty")
    for row in rows:
        print(
            f"{row['id']}  {row['dead_lettered_at'][:19]}  {row['group']:<18} "
            f"deliveries {row['deliveries']:<3} source {row['source_id']}  "
            f"order {row['order_id'] or '-'}  {row['error']}"
        )


async def show_command(redis: Redis, settings: Settings, entry_id: str) -> None:
    found: Any = await redis.xrange(settings.dead_letter_stream, min=entry_id, max=entry_id)
    if not found:
        raise ConfigError(f"no dead letter with id {entry_id}")
    print(json.dumps({text(k): text(v) for k, v in found[0][1].items()}, indent=2, ensure_ascii=False))


async def move_command(redis: Redis, settings: Settings, args: argparse.Namespace) -> None:
    """Redrive or purge the chosen entries, one at a time, reporting each."""
    ids = args.ids or [text(i) async for i, _ in entries(redis, settings, args.group)]
    done = 0
    for entry_id in ids:
        if args.command == "redrive":
            new_id = await redrive(redis, settings, entry_id)
            outcome = f"redriven as {new_id}" if new_id else "not found (already redriven or purged?)"
        else:
            outcome = "purged" if await redis.xdel(settings.dead_letter_stream, entry_id) else "not found"
        done += outcome.startswith(("redriven", "purged"))
        print(f"{entry_id}: {outcome}")
    print(f"{args.command}: {done} of {len(ids)} entries")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deadletter",
        description="List, show, redrive or purge entries of DEAD_LETTER_STREAM. Each action is "
        "atomic per entry, idempotent, and safe to interrupt.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="one line per dead letter: id, time, group, reason")
    listing.add_argument("--group", help="only this group's dead letters")
    listing.add_argument("--limit", type=int, default=0, help="only the newest N")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = commands.add_parser("show", help="every field of one dead letter, payload included")
    show.add_argument("id")
    for name, summary in (
        ("redrive", "send back to the stream for their own group only"),
        ("purge", "delete for good"),
    ):
        sub = commands.add_parser(name, help=summary)
        sub.add_argument("ids", nargs="*", metavar="ID")
        which = sub.add_mutually_exclusive_group()
        which.add_argument("--all", action="store_true", help="every dead letter")
        which.add_argument("--group", help="every dead letter of this group")
    return parser


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command in ("redrive", "purge"):
        chosen = bool(args.ids) + args.all + (args.group is not None)
        if chosen != 1:
            parser.error(f"{args.command} needs IDs, --all or --group (exactly one of them)")
    if args.command == "list" and args.limit < 0:
        parser.error("--limit must be 0 or more")
    for entry_id in getattr(args, "ids", None) or [getattr(args, "id", None) or "0-0"]:
        if not re.fullmatch(r"\d+-\d+", entry_id):
            parser.error(f"{entry_id!r} is not a stream entry id (like 1732530000000-0)")


async def main(settings: Settings, args: argparse.Namespace) -> int:
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
