"""Idempotent publishing against a real Redis: a chunk sent again adds nothing, whatever was lost
and wherever; an order published twice is added once; what the producer keeps is bounded."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from core import library
from core.keys import stream_keys
from producer import CHUNK, Track, publish, publish_many, sample_orders

PRODUCER = "test-producer"

# How a connection breaks: of the sends on it, how many Redis ran, and how many of their replies
# came back (no more than it ran): requests lost after that, or replies lost, or both.
breaks = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)).map(sorted).map(tuple), max_size=4)


@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=7),
    breaks=breaks,
    kind=st.sampled_from(["call", "input"]),
)
@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_chunks_sent_again_after_any_loss_are_appended_once(
    redis_url: str, sizes: list[int], breaks: list[tuple[int, int]], kind: str
) -> None:
    """The producer's way of sending (two chunks in flight, all of them sent again on a new connection
    after a loss), against the library's append, with losses anywhere: every chunk is in the stream
    once, in order, and the ids each reply gives are those of its entries."""
    asyncio.run(_lossy_publish(redis_url, sizes, breaks, kind))


class Link:
    """A connection on which Redis runs the first `ran` sends and the first `replied` of their
    replies come back; the rest is lost."""

    def __init__(self, redis: Redis, replied: int, ran: int) -> None:
        self.redis, self.replied, self.ran, self.sent = redis, replied, ran, 0

    async def send(self, command: list[Any]) -> Any:
        """The reply, or None when it was lost (the request, or only the reply)."""
        self.sent += 1
        if self.sent > self.ran:
            return None
        reply = await self.redis.execute_command(*command)  # type: ignore[no-untyped-call]
        return reply if self.sent <= self.replied else None


async def _lossy_publish(url: str, sizes: list[int], breaks: list[tuple[int, int]], kind: str) -> None:
    stream = f"lossy:{uuid.uuid4().hex}"
    keys = stream_keys(stream)
    track = Track.of_call(keys, PRODUCER, "call:x") if kind == "call" else Track.of_input(keys, "in", None)
    payloads = [f'{{"n":{n}}}'.encode() for n in range(sum(sizes))]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    chunks = iter([payloads[start : start + size] for start, size in zip(starts, sizes, strict=True)])
    connections = iter([*breaks, (len(payloads) * 4,) * 2])  # the last one never breaks
    redis = Redis.from_url(url)
    confirmed: list[str] = []
    in_flight: deque[list[Any]] = deque()
    try:
        await library.ensure_loaded(redis)
        for replied, ran in connections:
            link = Link(redis, replied, ran)
            replies = deque([await link.send(command) for command in in_flight])
            while True:
                while len(in_flight) < 2 and (chunk := next(chunks, None)):
                    before, after = track.advance(chunk)
                    in_flight.append(
                        library.append_command(keys, PRODUCER, track.where, before, after, chunk)
                    )
                    replies.append(await link.send(in_flight[-1]))
                if not in_flight or replies[0] is None:
                    break
                confirmed += library.appended_of(replies.popleft()).ids
                in_flight.popleft()
            if not in_flight:
                break
        entries: Any = await redis.xrange(stream)
        assert [fields[b"data"] for _, fields in entries] == payloads
        assert confirmed == [entry_id.decode() for entry_id, _ in entries]
    finally:
        await redis.delete(stream, *keys.producer(PRODUCER), keys.input("in"))
        await redis.aclose()


async def test_one_order_published_again_is_added_once(redis: Redis) -> None:
    order, other = sample_orders(2)
    first = await publish(redis, "orders", order, PRODUCER)
    again = await asyncio.gather(*(publish(redis, "orders", order, PRODUCER) for _ in range(5)))
    assert again == [first] * 5  # the first append's id, also for calls racing each other
    assert await publish_many(redis, "orders", [order], PRODUCER) == [first]
    await publish(redis, "orders", other, PRODUCER)
    assert await redis.xlen("orders") == 2
    # A call of several orders is keyed by itself: called again, it appends them again.
    await publish_many(redis, "orders", [order, other], PRODUCER)
    assert await redis.xlen("orders") == 4


async def test_what_a_producer_keeps_is_bounded_by_calls_not_orders(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(library, "CALLS_KEPT", 5)
    calls, recent = stream_keys("orders").producer(PRODUCER)
    await publish_many(redis, "orders", sample_orders(5 * CHUNK), PRODUCER)  # five chunks: one call
    assert await redis.hlen(calls) == 1
    for order in sample_orders(8):
        await publish(redis, "orders", order, PRODUCER)
    assert (await redis.hlen(calls), await redis.llen(recent)) == (5, 5)  # the newest five calls
    ttl = await redis.pttl(calls)
    assert 0 < ttl <= library.CALL_TTL_S * 1000
    assert await redis.xlen("orders") == 5 * CHUNK + 8


async def test_a_chunk_that_does_not_follow_its_track_is_refused(redis: Redis) -> None:
    """Another run's chunk (the same input published twice at once) is not appended on top."""
    keys = stream_keys("orders")
    ours, theirs = Track.of_input(keys, "in", None), Track.of_input(keys, "in", None)
    await _append(redis, ours, [b'{"n":1}', b'{"n":2}'])
    await _append(redis, ours, [b'{"n":3}'])
    with pytest.raises(ResponseError, match="CONFLICT"):  # `theirs` starts where `ours` did
        await _append(redis, theirs, [b'{"n":9}'])
    assert await redis.xlen("orders") == 3


async def test_ids_set_near_the_end_of_their_range_are_given_one_by_one(redis: Redis) -> None:
    """Entry ids of a chunk follow each other, so a reply names the first and the count; unless
    someone set ids whose sequence number is near 2^64, where Redis moves on to the next ms."""
    future = 9_999_999_999_999
    await redis.xadd("orders", {"x": "1"}, id=f"{future}-{2**64 - 300}")
    orders = sample_orders(CHUNK + 100)
    ids = await publish_many(redis, "orders", orders, PRODUCER)
    entries: Any = await redis.xrange("orders", min=f"({future}-{2**64 - 300}")
    assert ids == [entry_id.decode() for entry_id, _ in entries]
    assert ids[0] == f"{future}-{2**64 - 299}"
    assert ids[-1].startswith(f"{future + 1}-")
    track = Track.of_call(stream_keys("orders"), PRODUCER, "call:again")
    sent = library.appended_of(await _append(redis, track, [b'{"n":1}', b'{"n":2}']))
    track.state = ""  # as if the first send's reply was lost: the same call again
    track.count = 0
    again = library.appended_of(await _append(redis, track, [b'{"n":1}', b'{"n":2}']))
    assert (again.ids, again.new, sent.new) == (sent.ids, False, True)
    assert await redis.xlen("orders") == 1 + len(orders) + 2


async def _append(redis: Redis, track: Track, payloads: list[bytes], stream: str = "orders") -> Any:
    """One chunk of `track`, as append_chunks sends it."""
    before, after = track.advance(payloads)
    command = library.append_command(stream_keys(stream), PRODUCER, track.where, before, after, payloads)
    return await redis.execute_command(*command)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("kind", ["call", "input"])
async def test_a_chunk_after_redis_lost_part_of_its_run_is_appended(redis: Redis, kind: str) -> None:
    """A failover before the replica had the last chunks: the new master's record of the run is
    behind the producer's, so the next chunk cannot be there already. It is appended, and the
    reply says how many confirmed orders Redis no longer has."""
    keys = stream_keys("orders")
    track = Track.of_call(keys, PRODUCER, "call:x") if kind == "call" else Track.of_input(keys, "in", None)
    key, field = track.where[:2]
    await library.ensure_loaded(redis)
    await _append(redis, track, [b'{"n":1}', b'{"n":2}'])
    replica: Any = await (redis.hget(key, field) if field else redis.get(key))
    lost = library.appended_of(await _append(redis, track, [b'{"n":3}']))
    await redis.xdel("orders", *lost.ids)  # what the replica never had: the entry and the record
    await (redis.hset(key, field, replica) if field else redis.set(key, replica))
    reply = library.appended_of(await _append(redis, track, [b'{"n":4}', b'{"n":5}']))
    assert (reply.new, reply.short, reply.gone) == (True, 1, False)
    entries: Any = await redis.xrange("orders")
    assert [fields[b"data"] for _, fields in entries] == [b'{"n":%d}' % n for n in (1, 2, 4, 5)]
    await redis.delete(key)
    reply = library.appended_of(await _append(redis, track, [b'{"n":6}']))  # a flush: no record at all
    assert (reply.new, reply.short, reply.gone) == (True, 5, True)
