"""Dead letters of different orders under one entry id in two partitions, for the tests of addresses
(tests/test_operators.py, tests/test_dashboard.py)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from config import Settings
from core.dead_letters import dead_letter_fields
from core.keys import partition_of, partitions
from core.replies import text
from initialization_stream import initialize
from orders import Order, readable_order_id, serialize

SAME_ID = "1764000000000-0"  # the id two partitions' dead-letter streams both made


def order_in(partition: int, count: int, name: str) -> Order:
    """An order whose id routes it to `partition` of `count`."""
    return next(
        Order(f"{name}-{n}", f"{name}@example.com")
        for n in range(1000)
        if partition_of(f"{name}-{n}", count) == partition
    )


async def colliding_dead_letters(redis: Redis, settings: Settings) -> dict[str, Order]:
    """Dead letters of different orders under the same entry id in partitions 0 and 2 (and one in 1);
    their addresses and orders."""
    await initialize(redis, settings)
    parts = partitions(settings)
    made = {}
    for index, entry_id in ((0, SAME_ID), (2, SAME_ID), (1, "1764000000000-1")):
        order = order_in(index, len(parts), f"ord-p{index}")
        meta: dict[str, str | int] = {
            "group": "email_group",
            "consumer": "gone-pod",
            "source_id": f"1-{index}",
            "deliveries": 3,
            "error": "handler failed",
            "dead_lettered_at": "2026-11-29T10:00:00.000+00:00",
        }
        record: Any = dead_letter_fields({b"data": serialize(order)}, meta)
        await redis.xadd(parts[index].dead_letter_stream, record, id=entry_id)
        made[f"{index}:{entry_id}"] = order
    return made


async def dead_letter_orders(redis: Redis, settings: Settings) -> dict[str, str]:
    """Every dead letter's address -> its order id, read from Redis itself."""
    found = {}
    for index, part in enumerate(partitions(settings)):
        entries: Any = await redis.xrange(part.dead_letter_stream)
        for entry_id, fields in entries:
            found[f"{index}:{text(entry_id)}"] = readable_order_id(fields[b"data"], 65536) or ""
    return found
