"""Generated scenarios (Hypothesis): entry shapes, handler behaviours, staged writes and Redis states
drawn together, against a real redis-server, checking the invariants users rely on.

Each example appends a mix of valid orders and odd entries (no `data`, thousands of fields, a
payload past the cap, binary data, repeated or odd field names), runs one consumer whose handler
misbehaves per order (fails a few times, rejects, awaits, blocks the event loop, holds the GIL,
stages a write too large to commit or one Redis refuses), and puts Redis in a state (full
memory, FLUSHALL between two halves, a restart with AOF). Then:

- every valid order is handled or dead-lettered with a reason, never both, never neither;
- its staged writes are applied exactly once if handled, never if dead-lettered;
- every odd entry is dead-lettered once;
- the group's pending and lag reach 0 within a bound;
- Redis's work per entry is bounded (no loop re-reading or re-committing the same entries).

CI runs the `ci` profile: derandomized, a fixed number of examples. A longer search:
`HYPOTHESIS_PROFILE=long ./dev.sh test -k generative` (see docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import make_settings, need_redis_server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError

from config import Settings
from initialization_stream import initialize
from orders import Order
from producer import publish_many, sample_orders
from status import caught_up
from stream_consumer import Reject, Stats, consume
from tools.local_redis import LocalRedis, start_local_redis
from tx import MAX_WRITE_ARGS, Tx

settings.register_profile(
    "ci",
    max_examples=20,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # a failure is reported as drawn, not shrunk
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

STREAM = "orders"
GROUP = "email_group"
DRAIN_S = 60.0
MAX_DELIVERIES = 3


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """What the handler does with one valid order."""

    failures: int = 0  # raises this many times first (always fewer than MAX_DELIVERIES)
    reject: bool = False  # raises Reject: dead-lettered at once
    await_ms: int = 0
    block_ms: int = 0  # time.sleep: the event loop stops
    gil_ms: int = 0  # one C call holding the GIL
    write_args: int = 0  # one extra staged write (SADD) of about this many arguments (over the cap: refused)
    refused_write: bool = False  # one extra staged write Redis refuses at commit (WRONGTYPE)

    @property
    def members(self) -> int:
        """The SADD's members: with the command and the key, its arguments."""
        return max(1, self.write_args - 2)

    @property
    def dead_lettered(self) -> bool:
        return self.reject or (self.write_args > 0 and self.members + 2 > MAX_WRITE_ARGS)


@dataclasses.dataclass(frozen=True)
class Odd:
    """An entry that is not a valid order: its fields, as XADD gets them (names may repeat)."""

    kind: str
    fields: list[tuple[bytes, bytes]]


behaviours = st.builds(
    Behaviour,
    failures=st.integers(0, MAX_DELIVERIES - 1),
    reject=st.sampled_from([False, False, False, True]),
    await_ms=st.sampled_from([0, 0, 5, 120]),
    block_ms=st.sampled_from([0, 0, 0, 60]),
    gil_ms=st.sampled_from([0, 0, 0, 80]),
    write_args=st.sampled_from([0, 0, 1, 3, 2000, MAX_WRITE_ARGS - 2, MAX_WRITE_ARGS - 1, 6000]),
    refused_write=st.booleans(),
)

NOT_ODD = (b"data", b"redrive_for")  # an odd entry never carries these: it would not be odd
names = st.binary(min_size=0, max_size=12) | st.sampled_from(
    [b"data", b"group", b"error", b"source_id", b"original.data", b"redrive_for", b"truncated"]
)
odd_entries = st.one_of(
    st.integers(1, 6000).map(lambda n: Odd("wide", [(b"f%d" % i, b"v") for i in range(n)])),
    st.integers(1, 3).map(lambda n: Odd("big", [(b"data", b"x" * (70_000 * n))])),
    st.binary(max_size=200).map(lambda raw: Odd("binary", [(b"data", b"\xff" + raw)])),
    st.lists(st.tuples(names, st.binary(max_size=20)), min_size=1, max_size=8).map(
        lambda pairs: Odd("odd-names", [(b"x", b"1"), *((n, v) for n, v in pairs if n not in NOT_ODD)])
    ),
    st.integers(2, 3).map(
        lambda n: Odd("repeated", [(b"data", b"{"), *[(b"data", b'{"order_id": "d"}')] * n])
    ),
)
states = st.sampled_from(["none", "full", "flushall", "restart"])


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRedis]:
    """One redis-server with AOF for every example (a restart keeps what it confirmed)."""
    need_redis_server()
    local = start_local_redis("--appendonly", "yes", "--appendfsync", "always")
    try:
        yield local
    finally:
        local.close()


@given(
    orders=st.lists(behaviours, min_size=1, max_size=12),
    odd=st.lists(odd_entries, max_size=4),
    state=states,
    batch_size=st.sampled_from([1, 3, 10]),
    seed=st.randoms(use_true_random=False),
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.timeout(0 if PROFILE == "long" else 900)  # every example of the search in one test
def test_generated_scenarios_keep_the_invariants(
    server: LocalRedis, orders: list[Behaviour], odd: list[Odd], state: str, batch_size: int, seed: Any
) -> None:
    asyncio.run(_scenario(server, orders, odd, state, batch_size, seed))


async def _scenario(
    server: LocalRedis, behaviours: list[Behaviour], odd: list[Odd], state: str, batch_size: int, rng: Any
) -> None:
    config = dataclasses.replace(
        make_settings(server.url, RETRY_DELAY_MS="10", RETRY_MAX_DELAY_MS="40"),
        max_deliveries=MAX_DELIVERIES,
        batch_size=batch_size,
        claim_idle_ms=2000,
        maintenance_interval_ms=0,
    )
    # The test's own client rides out the restart as the consumer does.
    redis = Redis.from_url(server.url, retry=Retry(ExponentialBackoff(), 5), retry_on_error=[ConnectionError])
    try:
        await redis.config_set("maxmemory", 0)
        await redis.flushall()
        await initialize(redis, config)
        await redis.set(A_STRING, "not a hash")
        await redis.config_resetstat()
        started = time.monotonic()
        orders = sample_orders(len(behaviours))
        plan = {order.order_id: behaviour for order, behaviour in zip(orders, behaviours, strict=True)}
        items: list[Order | Odd] = [*orders, *odd]
        rng.shuffle(items)  # interleaved in a drawn order
        half = len(items) // 2 if state == "flushall" else len(items)  # the rest after the flush
        handler = Handler(plan)
        stop = asyncio.Event()
        consumer = asyncio.create_task(consume(redis, config, GROUP, "c", handler.handle, stop))
        try:
            odd_ids = await _append(redis, items[:half])
            if state == "full":
                used = (await redis.info("memory"))["used_memory"]
                await redis.config_set("maxmemory-policy", "noeviction")
                await redis.config_set("maxmemory", used + 200_000)
            elif state == "restart":
                await _drained(redis, consumer, partial=True)
                server.kill()
                server.start()
            elif state == "flushall":
                await _drained(redis, consumer)
                await _check(redis, config, handler, items[:half], odd_ids)
                await redis.flushall()
                await redis.set(A_STRING, "not a hash")
                odd_ids = await _append(redis, items[half:])
            await _drained(redis, consumer)
        finally:
            stop.set()
            async with asyncio.timeout(30):
                await consumer
        await redis.config_set("maxmemory", 0)
        await _check(redis, config, handler, items[half:] if state == "flushall" else items, odd_ids)
        if state != "restart":  # a restart resets Redis's counters
            await _bounded_work(redis, len(items), time.monotonic() - started)
    finally:
        with contextlib.suppress(Exception):
            await redis.config_set("maxmemory", 0)
        await redis.aclose()


A_STRING = "{orders}:a-string"  # a write to it as a hash is refused at commit (WRONGTYPE)


class Handler:
    """The drawn handler: each order's behaviour, and how often each ran."""

    def __init__(self, plan: dict[str, Behaviour]) -> None:
        self.plan = plan
        self.runs: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    async def handle(self, order: Order, tx: Tx) -> None:
        behaviour = self.plan[order.order_id]
        self.runs[order.order_id] += 1
        if behaviour.await_ms:
            await asyncio.sleep(behaviour.await_ms / 1000)
        if behaviour.block_ms:
            time.sleep(behaviour.block_ms / 1000)  # noqa: ASYNC251 - on purpose: the loop stops
        if behaviour.gil_ms:
            ctypes.PyDLL(None).usleep(behaviour.gil_ms * 1000)
        tx.hincrby(tx.key("effects"), order.order_id, 1)
        if behaviour.refused_write:
            tx.hincrby(A_STRING, "field", 1)
        if behaviour.write_args:
            members = [f"{order.order_id}-{n}" for n in range(behaviour.members)]
            tx.call("SADD", tx.key("members"), *members)
        if behaviour.reject:
            raise Reject("drawn to be rejected")
        if self.failed[order.order_id] < behaviour.failures:
            self.failed[order.order_id] += 1
            raise RuntimeError("drawn to fail")


async def _append(redis: Redis, items: list[Order | Odd]) -> set[bytes]:
    """Orders through the producer, odd entries by raw XADD, in the drawn order; the odd ones' ids."""
    odd_ids = set()
    for item in items:
        if isinstance(item, Order):
            await publish_many(redis, STREAM, [item])
        else:
            fields = [part for pair in item.fields for part in pair]
            odd_ids.add(await redis.execute_command("XADD", STREAM, "*", *fields))  # type: ignore[no-untyped-call]
    return odd_ids


async def _drained(redis: Redis, consumer: asyncio.Task[Stats], partial: bool = False) -> None:
    """Until the group is caught up with nothing pending (`partial`: until it was delivered anything)."""
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline:
        if consumer.done():
            consumer.result()  # raises what ended it
            pytest.fail("the consumer stopped by itself")
        if partial:
            groups: Any = await redis.xinfo_groups(STREAM)
            if groups and groups[0]["entries-read"]:
                return
        elif await caught_up(redis, STREAM, [GROUP]):
            return
        await asyncio.sleep(0.02)
    pending: Any = await redis.xpending(STREAM, GROUP)
    pytest.fail(f"the group did not drain within {DRAIN_S} s: {pending}")


def _order_id_of(fields: dict[bytes, bytes]) -> str | None:
    try:
        value = json.loads(fields.get(b"data", b""))
    except ValueError:
        return None
    return value.get("order_id") if isinstance(value, dict) else None


async def _check(
    redis: Redis, config: Settings, handler: Handler, items: list[Order | Odd], odd_ids: set[bytes]
) -> None:
    """Each order handled with its writes applied once, or dead-lettered with none; each odd entry
    dead-lettered once; every dead letter with a reason."""
    letters: Any = await redis.xrange(config.dead_letter_stream)
    sources = Counter(fields[b"source_id"] for _, fields in letters)
    assert all(count == 1 for count in sources.values()), f"an entry dead-lettered twice: {sources}"
    assert all(fields.get(b"error") for _, fields in letters), "a dead letter without a reason"
    assert odd_ids <= set(sources), f"odd entries not dead-lettered: {odd_ids - set(sources)}"
    dead = {_order_id_of(fields) for _, fields in letters}
    reasons = {_order_id_of(fields): fields.get(b"error") for _, fields in letters}
    effects = await redis.hgetall("{orders}:effects")
    for order in (item for item in items if isinstance(item, Order)):
        behaviour, key = handler.plan[order.order_id], order.order_id.encode()
        if behaviour.dead_lettered:
            assert order.order_id in dead, f"{behaviour} not dead-lettered"
            assert key not in effects, f"{behaviour}: the writes of a dead letter were applied"
        else:
            assert order.order_id not in dead, f"{behaviour} dead-lettered: {reasons[order.order_id]!r}"
            assert effects.get(key) == b"1", f"{behaviour}: writes applied {effects.get(key)!r} times"
            assert handler.runs[order.order_id] >= behaviour.failures + 1
    assert len(letters) == len(odd_ids) + sum(
        handler.plan[item.order_id].dead_lettered for item in items if isinstance(item, Order)
    )


async def _bounded_work(redis: Redis, entries: int, seconds: float) -> None:
    """Redis's calls stay in proportion to the entries and the time: no loop over the same entries.

    Idle, a consumer makes a few calls a second (a blocking read per BLOCK_MS, a lease refresh
    per third of CLAIM_IDLE_MS); each entry costs a few (its append, its share of a read and a
    commit, its retries).
    """
    stats: Any = await redis.info("commandstats")
    # Not the test's own polling (XINFO, every 20 ms) and set-up (INFO, CONFIG).
    ours = ("cmdstat_xinfo", "cmdstat_info", "cmdstat_config")
    calls = sum(
        int(v["calls"])
        for name, v in stats.items()
        if name.startswith("cmdstat_") and not name.startswith(ours)
    )
    bound = 100 + 20 * entries + 40 * seconds
    assert calls < bound, f"{calls} Redis calls for {entries} entries in {seconds:.1f} s (bound {bound:.0f})"
