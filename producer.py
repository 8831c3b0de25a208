"""Publish orders to the stream: one at a time, in batches, or from a JSON-lines file."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import UTC, datetime

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from config import CliError, ConfigError, Settings, run_script
from orders import InvalidOrder, Item, Order, parse_order, serialize
from redisPool import redis_connect
from replies import text

log = logging.getLogger("producer")

CHUNK = 500  # orders per round trip in publish_many


class PublishError(CliError):
    """Publishing stopped part way; `published` entries are confirmed in the stream."""

    def __init__(self, published: int, total: int, cause: Exception) -> None:
        super().__init__(
            f"{published} of {total} orders confirmed, then Redis failed "
            f"({type(cause).__name__}: {cause}); the next {2 * CHUNK} may or may not be in the stream"
        )
        self.published = published


async def publish(redis: Redis, stream: str, order: Order) -> str:
    """Append one order; return its entry id once Redis has confirmed it.

    A reply lost on the way is retried, which can append the order twice: the consumers'
    dedupe guard runs it once.
    """
    entry_id = await redis.xadd(stream, {"data": serialize(order)})
    return text(entry_id)


async def publish_many(redis: Redis, stream: str, orders: Sequence[Order]) -> list[str]:
    """Append orders in order, CHUNK per command; return their entry ids.

    Each chunk is one script call, added whole or not at all. Where the server refuses
    scripts, pipelines of XADDs are used instead (said once in the log). Raises PublishError
    saying how many orders Redis confirmed before a failure.
    """
    ids: list[str] = []
    chunks = ([serialize(o) for o in orders[i : i + CHUNK]] for i in range(0, len(orders), CHUNK))
    try:
        sha = await _script_sha(redis)
        if sha is None:
            for payloads in chunks:
                ids.extend(await _add_with_pipeline(redis, stream, payloads))
        else:
            async for replies in _add_with_script(redis, sha, stream, chunks):
                ids.extend(replies)
    except RedisError as error:
        raise PublishError(len(ids), len(orders), error) from error
    return ids


# The script appends a whole chunk: one command for Redis to parse instead of hundreds, and
# a script runs to its end, so a chunk is added whole or (refused at its start) not at all.
ADD_CHUNK_LUA = """
local ids = {}
for i = 1, #ARGV do
  ids[i] = redis.call('XADD', KEYS[1], '*', 'data', ARGV[i])
end
return ids
"""
_pipelines_only: weakref.WeakSet[Redis] = weakref.WeakSet()  # clients whose server refused scripts


async def _script_sha(redis: Redis) -> str | None:
    """Load the script (cheap, idempotent) and return its SHA; None where scripts are refused."""
    if redis in _pipelines_only:
        return None
    try:
        return str(await redis.script_load(ADD_CHUNK_LUA))
    except ResponseError as error:
        if not (isinstance(error, NoPermissionError) or str(error).startswith("ERR unknown command")):
            raise
        # An ACL user without scripting, or a managed Redis that disables it.
        log.warning("Redis refused scripts (%s); publishing with pipelines instead", error)
        _pipelines_only.add(redis)
        return None


async def _add_with_script(
    redis: Redis, sha: str, stream: str, chunks: Iterator[list[bytes]]
) -> AsyncIterator[list[str]]:
    """EVALSHA each chunk on one connection, keeping two in flight.

    redis-py's Pipeline waits for all replies before we can serialize more; sending chunk
    k+1 before reading chunk k's reply lets Redis append while Python serializes. One
    connection keeps the chunks in order. After any error the connection is dropped, since
    a reply may still be on its way.
    """
    pool = redis.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    in_flight = 0
    try:
        for payloads in chunks:
            await connection.send_command("EVALSHA", sha, 1, stream, *payloads)
            in_flight += 1
            if in_flight == 2:
                yield [text(i) for i in await connection.read_response()]
                in_flight -= 1
        while in_flight:
            yield [text(i) for i in await connection.read_response()]
            in_flight -= 1
    finally:
        if in_flight:  # failed or cancelled with replies unread
            await connection.disconnect()
        await pool.release(connection)


async def _add_with_pipeline(redis: Redis, stream: str, payloads: list[bytes]) -> list[str]:
    pipe = redis.pipeline(transaction=False)
    for payload in payloads:
        pipe.xadd(stream, {"data": payload})
    return [text(i) for i in await pipe.execute()]


def sample_orders(count: int) -> list[Order]:
    """`count` made-up orders with unique ids, for demos and load."""
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    run = uuid.uuid4().hex[:8]
    return [
        Order(
            order_id=f"ord-{run}-{n}",
            customer_email=f"customer{n}@example.com",
            items=(Item(sku=f"SKU-{n % 7}", qty=1 + n % 3),),
            total=round(9.5 + n % 40, 2),
            created_at=now,
        )
        for n in range(1, count + 1)
    ]


def read_orders(lines: Iterable[str], source: str, max_bytes: int) -> list[Order]:
    """Validate every JSON line first; raise ConfigError naming the first bad line."""
    orders = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            orders.append(parse_order(line.rstrip("\r\n"), max_bytes))
        except InvalidOrder as error:
            raise ConfigError(f"{source} line {number}: {error}; nothing was published") from None
    return orders


def load_file(path: str, max_bytes: int) -> list[Order]:
    """Read and validate a JSON-lines file, or stdin for `-`."""
    if path == "-":
        return read_orders(sys.stdin, "stdin", max_bytes)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return read_orders(handle, path, max_bytes)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producer",
        description="Publish orders to the stream. With no option, publishes 10 sample orders.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--count", type=int, default=10, help="publish N sample orders (default 10)")
    source.add_argument(
        "--file", metavar="PATH", help="publish orders from a JSON-lines file, or - for stdin"
    )
    return parser


async def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.file is not None:
        orders = load_file(args.file, settings.max_payload_bytes)
    else:
        if args.count < 0:
            raise ConfigError(f"--count must be 0 or more, got {args.count}")
        orders = sample_orders(args.count)
    async with redis_connect(settings) as redis:
        ids = await publish_many(redis, settings.stream_key, orders)
    if ids:
        log.info("published %d orders to %s (ids %s .. %s)", len(ids), settings.stream_key, ids[0], ids[-1])
    else:
        log.info("nothing to publish")
    return 0


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    run_script("producer", lambda settings: main(settings, arguments))
