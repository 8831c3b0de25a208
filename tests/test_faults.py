"""Faults and duplicates with real servers and processes: nothing lost, nothing run twice where avoidable."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import hiredis
import pytest
from conftest import (
    IN_CI,
    Script,
    make_settings,
    need_redis_server,
    run_script,
    script_env,
    wait_until,
)
from redis.asyncio import Redis
from redis.typing import EncodableT, StreamIdT
from test_pipeline import Recorder, running
from test_promises import held_over

from config import Settings
from core.capabilities import detect
from core.groups import ensure_groups
from core.keys import keys_for
from core.library import Fence
from core.reading import Batch
from core.replies import Committed, entries_of
from initialization_stream import initialize
from orders import Order, serialize
from producer import PublishError, publish, publish_many, sample_orders
from redisPool import redis_connect
from status import caught_up
from stream_consumer import Hooks, StreamConsumer
from tools import chaos
from tools.local_redis import LocalRedis, start_local_redis

STREAM = "orders"
Start = Callable[..., Script]
EFFECT = {
    "fulfillment_group": re.compile(r"fulfilling order (\S+):"),
    "email_group": re.compile(r"sending confirmation e-mail for order (\S+)$", re.M),
}


def effects(outputs: list[str], group: str) -> Counter[str]:
    """How many times each order's handler ran in `group`, read from the consumers' log lines."""
    return Counter(order_id for output in outputs for order_id in EFFECT[group].findall(output))


def check(published: list[Order], outputs: dict[str, list[str]]) -> dict[str, int]:
    """Per group: lost (published, never handled), unexpected (handled, never published), duplicates."""
    wanted = {o.order_id for o in published}
    figures = {}
    for group, logs in outputs.items():
        ran = effects(logs, group)
        figures[f"{group} lost"] = len(wanted - set(ran))
        figures[f"{group} unexpected"] = len(set(ran) - wanted)
        figures[f"{group} duplicates"] = sum(n - 1 for n in ran.values() if n > 1)
    return figures


# --- the dedupe guard ----------------------------------------------------------------


async def test_a_producer_retry_runs_the_handler_once(redis: Redis, settings: Settings) -> None:
    await initialize(redis, settings)
    order = sample_orders(1)[0]
    for _ in range(3):  # as after a lost XADD reply: the same order, three entries
        await redis.xadd(STREAM, {"data": serialize(order)})
    recorder = Recorder()
    group = settings.fulfillment_group
    async with running(redis, settings, (group, "c", recorder.handler("c"))) as tasks:
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "the entries to be settled")
    assert recorder.order_ids() == [order.order_id]
    assert tasks[0].result().duplicates_skipped == 2


async def test_a_replay_reruns_our_orders_but_not_other_clients_copies(
    redis: Redis, settings: Settings
) -> None:
    """A replay (XGROUP SETID) is a request to run again: orders from our producer run again.

    The dedupe guard keeps done marks only for entries from other clients (no `producer`
    field), for DEDUPE_WINDOW_MS: their copies, replayed or appended again, still run once.
    """
    await initialize(redis, settings)
    ours, theirs = sample_orders(5), sample_orders(5)
    await publish_many(redis, STREAM, ours)
    for order in theirs:
        await redis.xadd(STREAM, {"data": serialize(order)})
    group = settings.email_group
    recorder = Recorder()
    async with running(redis, settings, (group, "c", recorder.handler("c"))):
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "the first pass")
        await redis.xgroup_setid(STREAM, group, "0")  # every entry delivered again
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "the replay")
    ran = Counter(recorder.order_ids())
    assert ran == Counter({o.order_id: 2 for o in ours} | {o.order_id: 1 for o in theirs})
    assert await redis.zcard(f"{{{STREAM}}}:done:{group}") == len(theirs)  # no marks for ours


async def test_without_the_guard_a_duplicate_runs_twice(redis: Redis, settings: Settings) -> None:
    settings = dataclasses.replace(settings, dedupe_window_ms=0)
    await initialize(redis, settings)
    order = sample_orders(1)[0]
    for _ in range(2):
        await redis.xadd(STREAM, {"data": serialize(order)})
    recorder = Recorder()
    group = settings.email_group
    async with running(redis, settings, (group, "c", recorder.handler("c"))):
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "both entries")
    assert recorder.order_ids() == [order.order_id] * 2


async def test_a_slow_handler_claimed_by_another_consumer_runs_once(redis: Redis, settings: Settings) -> None:
    settings = dataclasses.replace(settings, claim_idle_ms=100)
    group = settings.fulfillment_group
    await initialize(redis, settings)
    runs: list[str] = []
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(order: Order) -> None:
        runs.append("slow")
        started.set()
        await release.wait()  # far longer than CLAIM_IDLE_MS

    async def quick(order: Order) -> None:
        runs.append("quick")

    await publish_many(redis, STREAM, sample_orders(1))
    async with running(redis, settings, (group, "slow", slow)):
        async with asyncio.timeout(10):
            await started.wait()
        claimer = StreamConsumer(redis, settings, group, "quick", quick)
        claiming = asyncio.create_task(claimer.run())
        await wait_until(lambda: held_over(redis, group, 500), "several claim passes over the slow entry")
        release.set()
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "the slow handler to finish and ack")
        claimer.stop.set()
        await claiming
    assert runs == ["slow"]
    assert claimer.stats.reclaimed == 0  # its owner's lease was alive: never taken over


# --- faults with real processes -----------------------------------------------------


class Services:
    """consumer1 and consumer2 processes against a server of the test's own."""

    def __init__(self, server: LocalRedis, scripts: Start, **env: str) -> None:
        base = script_env(server.url, SOCKET_TIMEOUT_MS="1000", BLOCK_MS="200", CLAIM_IDLE_MS="1000", **env)
        self.consumers = {
            "fulfillment_group": [scripts("consumer1", {**base, "CONSUMER_NAME": "f1"})],
            "email_group": [scripts("consumer2", {**base, "CONSUMER_NAME": "e1"})],
        }

    def outputs(self) -> dict[str, list[str]]:
        return {group: [c.output() for c in running] for group, running in self.consumers.items()}

    def alive(self) -> bool:
        return all(c.process.poll() is None for running in self.consumers.values() for c in running)

    async def started(self, redis: Redis) -> None:
        for name in ("f1", "e1"):
            await wait_until(lambda n=name: _blocked(redis, n), f"consumer {name} to start")  # type: ignore[misc]


async def _blocked(redis: Redis, name: str) -> bool:
    return any(c["name"] == name and c["cmd"] == "xreadgroup" for c in await redis.client_list())


def warnings(services: Services) -> list[int]:
    """How often each consumer has said Redis is unreachable."""
    return [o.count("Redis unreachable") for logs in services.outputs().values() for o in logs]


def assert_clean(figures: dict[str, int]) -> None:
    assert all(value == 0 for value in figures.values()), figures


async def test_redis_paused_longer_than_the_socket_timeout(own_server: LocalRedis, scripts: Start) -> None:
    pipeline = Services(own_server, scripts)
    redis = Redis.from_url(own_server.url)
    try:
        await pipeline.started(redis)
        orders = sample_orders(20)
        await publish_many(redis, STREAM, orders[:10])
        assert own_server.process is not None
        own_server.process.send_signal(signal.SIGSTOP)
        await wait_until(
            lambda: all("Redis unreachable" in o for logs in pipeline.outputs().values() for o in logs),
            "both consumers to notice the pause",
        )
        own_server.process.send_signal(signal.SIGCONT)
        await publish_many(redis, STREAM, orders[10:])
        await wait_until(
            lambda: caught_up(redis, STREAM, EFFECT), "consumers to catch up after the pause", 30
        )
    finally:
        await redis.aclose()
    assert pipeline.alive()
    assert_clean(check(orders, pipeline.outputs()))
    assert all(o.count("Redis unreachable") == 1 for logs in pipeline.outputs().values() for o in logs)


async def test_client_kill_and_client_pause(own_server: LocalRedis, scripts: Start) -> None:
    pipeline = Services(own_server, scripts)
    redis = Redis.from_url(own_server.url)
    orders = sample_orders(30)
    try:
        await pipeline.started(redis)
        await publish_many(redis, STREAM, orders[:10])
        await wait_until(lambda: caught_up(redis, STREAM, EFFECT), "the first orders")
        for client in await redis.client_list():
            if client["name"] in ("f1", "e1"):
                await redis.client_kill_filter(_id=client["id"])
        await publish_many(redis, STREAM, orders[10:20])
        await wait_until(lambda: caught_up(redis, STREAM, EFFECT), "orders after CLIENT KILL")
        before = warnings(pipeline)
        await redis.client_pause(500, all=False)  # WRITE only, shorter than the socket timeout:
        await publish_many(redis, STREAM, orders[20:25])  # absorbed without a warning
        await wait_until(lambda: caught_up(redis, STREAM, EFFECT), "orders after a short CLIENT PAUSE")
        assert warnings(pipeline) == before
        # Longer than the socket timeout and the client's quick retries together: said once.
        await redis.client_pause(15_000, all=False)
        await wait_until(
            lambda: all(n > b for n, b in zip(warnings(pipeline), before, strict=True)),
            "the consumers to time out during the pause",
        )
        await redis.client_unpause()
        await publish_many(redis, STREAM, orders[25:])
        await wait_until(lambda: caught_up(redis, STREAM, EFFECT), "orders after CLIENT PAUSE", 30)
    finally:
        await redis.aclose()
    assert pipeline.alive()
    assert_clean(check(orders, pipeline.outputs()))


@pytest.mark.parametrize("fsync", ["always", "everysec"])
async def test_redis_killed_under_load_and_restarted(
    own_server: LocalRedis, scripts: Start, fsync: str
) -> None:
    redis = Redis.from_url(own_server.url)
    await redis.config_set("appendfsync", fsync)
    pipeline = Services(own_server, scripts)
    confirmed: list[Order] = []
    attempted: list[Order] = []
    try:
        await pipeline.started(redis)
        for round_number in range(20):
            chunk = sample_orders(200)
            attempted.extend(chunk)
            if round_number == 10:
                own_server.kill()  # mid-load
                own_server.start()
                await redis.connection_pool.disconnect()
            try:
                await publish_many(redis, STREAM, chunk)
                confirmed.extend(chunk)
            except PublishError:
                pass  # outcome unknown: neither counted as lost nor as unexpected
        await wait_until(
            lambda: caught_up(redis, STREAM, EFFECT), "the consumers to finish after the crash", 60
        )
    finally:
        await redis.aclose()
    assert pipeline.alive()
    figures = check(confirmed, pipeline.outputs())
    unexpected = check(attempted, pipeline.outputs())
    assert unexpected["fulfillment_group unexpected"] == unexpected["email_group unexpected"] == 0
    assert figures["fulfillment_group duplicates"] == figures["email_group duplicates"] == 0
    if fsync == "always":  # every acknowledged XADD was on disk before its reply
        assert figures["fulfillment_group lost"] == figures["email_group lost"] == 0


async def test_trimmed_pending_entries_are_acked_and_counted(redis: Redis, settings: Settings) -> None:
    settings = dataclasses.replace(settings, claim_idle_ms=50)
    group = settings.email_group
    await initialize(redis, settings)
    await publish_many(redis, STREAM, sample_orders(30))
    await redis.xreadgroup(group, "dead", {STREAM: ">"}, count=20)  # 20 pending on a dead consumer
    await redis.xtrim(STREAM, maxlen=5, approximate=False)  # an operator trims past the lagging group
    recorder = Recorder()
    async with running(redis, settings, (group, "alive", recorder.handler("alive"))) as tasks:
        await wait_until(lambda: caught_up(redis, STREAM, [group]), "the group to settle")
    stats = tasks[0].result()
    assert len(recorder.handled) == 5
    assert stats.deleted_skipped == 20
    assert await redis.xlen(settings.dead_letter_stream) == 0


async def test_an_unsynced_aof_tail_is_survived(own_server: LocalRedis, scripts: Start) -> None:
    redis = Redis.from_url(own_server.url)
    pipeline = Services(own_server, scripts)
    orders = sample_orders(40)
    try:
        await pipeline.started(redis)
        await publish_many(redis, STREAM, orders[:20])
        await wait_until(lambda: caught_up(redis, STREAM, EFFECT), "the first orders")
        own_server.kill()
        tails = sorted((own_server.directory / "appendonlydir").glob("*.incr.aof"))
        with tails[-1].open("r+b") as aof:  # cut the last command in half, as a crash before fsync would
            aof.truncate(max(0, aof.seek(0, 2) - 7))
        own_server.start()
        await redis.connection_pool.disconnect()
        await publish_many(redis, STREAM, orders[20:])
        await wait_until(lambda: caught_up(redis, STREAM, EFFECT), "consumers after the restart", 30)
    finally:
        await redis.aclose()
    assert pipeline.alive()
    figures = check(orders, pipeline.outputs())
    for group in EFFECT:
        assert (figures[f"{group} lost"], figures[f"{group} unexpected"]) == (0, 0)
        # The cut tail held the last commit (done marks and XACK): that batch runs again, at most.
        assert figures[f"{group} duplicates"] <= 10


def test_figures_helpers_count_what_they_say() -> None:
    orders = sample_orders(3)
    logs = [
        f"x INFO consumer1: fulfilling order {orders[0].order_id}: 1 items, 1 units\n"
        f"x INFO consumer1: fulfilling order {orders[0].order_id}: 1 items, 1 units\n"
        "x INFO consumer1: fulfilling order stranger: 1 items, 1 units\n"
    ]
    figures = check(orders, {"fulfillment_group": logs})
    assert figures == {
        "fulfillment_group lost": 2,
        "fulfillment_group unexpected": 1,
        "fulfillment_group duplicates": 1,
    }


@pytest.mark.parametrize("mode", ["log lines", "redis effects"])
def test_a_short_chaos_soak_loses_nothing_and_bounds_duplicates(mode: str) -> None:
    """`python -m tools.chaos` in small: consumer SIGKILLs and a Redis SIGKILL while orders flow.

    Judged by the handlers' log lines (at least once: a batch per kill may run again) or by
    the fulfillment service's Redis-side effects (exactly once).
    """
    need_redis_server()
    kills, partitions = 3, int(chaos.can_partition())
    args = ["--orders", "4000", "--consumer-kills", str(kills), "--redis-restarts", "1", "--seconds", "8"]
    args += ["--partitions", str(partitions)] + (["--redis-effects"] if mode == "redis effects" else [])
    result = run_script("tools.chaos", dict(os.environ), *args, timeout=300)
    line = result.stdout.strip().splitlines()[-1]
    figures = dict(item.split("=", 1) for item in line.removeprefix("chaos: ").split())
    assert figures["published"] == "4000"
    assert figures["lost"] == "0"
    assert figures["unexpected"] == "0"
    assert (figures["consumer_kills"], figures["redis_restarts"]) == (str(kills), "1")
    assert figures["partitions"] == str(partitions)
    assert (figures["redis_effects_missing"], figures["redis_effect_duplicates"]) == ("0", "0")
    # A consumer killed mid-batch may have run handlers it had not committed yet: at most a batch each.
    duplicates = int(figures["effective_duplicates"])
    assert duplicates <= kills * 50
    assert int(figures["raw_redeliveries"]) >= duplicates
    if mode == "redis effects":
        assert result.returncode == 0
    else:
        assert result.returncode == (0 if duplicates == 0 else 1)


def test_a_network_partition_between_consumer_and_redis_heals(tmp_path: Path) -> None:
    """iptables inside a network namespace of the test's own (unshare -n): the host is untouched."""
    need_redis_server()
    can = shutil.which("unshare") and shutil.which("iptables") and shutil.which("ip")
    probe = (
        subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10, check=False)
        if can
        else None
    )
    if probe is None or probe.returncode != 0:
        reason = "needs unshare -n, ip and iptables (apt-get install iptables) and the right to use them"
        if IN_CI and can:
            pytest.fail(reason)
        pytest.skip(reason)
    scenario = Path(__file__).with_name("partition_scenario.py")
    result = subprocess.run(
        ["unshare", "-n", sys.executable, str(scenario), str(tmp_path / "consumer.log")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures == {
        "first_half_handled": True,
        "partition_noticed": True,
        "all_handled_after_heal": True,
        "consumer_alive": True,
        "handled": 100,
        "handler_runs": 100,  # nothing lost, nothing run twice
        "warnings": 1,  # one warning for the whole outage
        "tracebacks": 0,
    }


class _Proxy:
    """A TCP proxy to Redis on a free loopback port; `_serve` handles each connection."""

    server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class ReplyDropper(_Proxy):
    """A TCP proxy to Redis that swallows the first reply matching `drop(command, reply)`, or,
    given `request`, the first request matching it (it never reaches Redis).

    Requests and replies are parsed with hiredis to pair each reply with its command; replies
    are re-encoded (RESP3), which redis-py reads the same. The connection stays open, so the
    client sees what a lost packet looks like: silence, then its socket timeout.
    """

    def __init__(
        self,
        target_port: int,
        drop: Callable[[bytes, Any], bool],
        limit: int = 1,
        request: Callable[[list[bytes]], bool] | None = None,
    ) -> None:
        self.target_port, self.drop, self.dropped, self.limit = target_port, drop, 0, limit
        self.request = request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        names: list[bytes] = []
        silent = False  # after a lost reply or request, nothing more passes, as on a cut connection

        async def requests() -> None:
            nonlocal silent
            parser = hiredis.Reader()
            while data := await reader.read(65536):
                parser.feed(data)
                out = []
                while (command := parser.gets()) is not False:
                    if not silent and self.request and self.dropped < self.limit and self.request(command):
                        self.dropped += 1
                        silent = True
                    if not silent:
                        names.append(command[0].upper())
                        out.append(hiredis.pack_command(tuple(command)))
                up_writer.write(b"".join(out))
                await up_writer.drain()

        async def replies() -> None:
            nonlocal silent
            parser = hiredis.Reader()
            while data := await up_reader.read(65536):
                parser.feed(data)
                out = []
                while (reply := parser.gets()) is not False:
                    name = names.pop(0)
                    if not silent and self.dropped < self.limit and self.drop(name, reply):
                        self.dropped += 1
                        silent = True
                    if not silent:
                        out.append(_resp(reply))
                writer.write(b"".join(out))
                await writer.drain()

        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            await asyncio.gather(requests(), replies())
        writer.close()
        up_writer.close()


def _resp(reply: Any) -> bytes:  # noqa: PLR0911 - one return per RESP3 type
    """RESP3, as redis-py 8 speaks it after its HELLO 3."""
    if reply is None:
        return b"_\r\n"
    if isinstance(reply, hiredis.ReplyError):
        return b"-" + str(reply).encode() + b"\r\n"
    if isinstance(reply, bool):
        return b"#t\r\n" if reply else b"#f\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, float):
        return b",%r\r\n" % reply
    if isinstance(reply, dict):
        return b"%%%d\r\n" % len(reply) + b"".join(_resp(k) + _resp(v) for k, v in reply.items())
    if isinstance(reply, list):
        return b"*%d\r\n" % len(reply) + b"".join(_resp(item) for item in reply)
    return b"$%d\r\n%s\r\n" % (len(reply), reply)


def _is_append(name: bytes, reply: Any) -> bool:
    """The reply to the library's append: a list of entry ids."""
    return name == b"FCALL" and isinstance(reply, list) and bool(reply) and isinstance(reply[0], bytes)


@pytest.mark.parametrize("call", ["publish", "publish_many"])
async def test_a_lost_publish_reply_is_sent_again_and_adds_nothing_twice(
    own_server: LocalRedis, call: str
) -> None:
    dropper = ReplyDropper(own_server.port, _is_append)
    port = await dropper.start()
    settings = make_settings(f"redis://127.0.0.1:{port}/0", SOCKET_TIMEOUT_MS="500", BLOCK_MS="200")
    direct = Redis.from_url(own_server.url)
    orders = sample_orders(1 if call == "publish" else 1200)
    try:
        await initialize(direct, settings)
        async with redis_connect(settings) as redis:
            if call == "publish":  # redis-py's retry sends it again
                await publish(redis, STREAM, orders[0])
            else:  # the chunks in flight are sent again on a new connection
                assert len(await publish_many(redis, STREAM, orders)) == 1200
        assert dropper.dropped == 1
        assert await direct.xlen(STREAM) == len(orders)  # every order once
        recorder = Recorder()
        async with running(direct, settings, ("email_group", "c", recorder.handler("c"))) as tasks:
            await wait_until(lambda: caught_up(direct, STREAM, ["email_group"]), "every order settled")
        assert sorted(recorder.order_ids()) == sorted(o.order_id for o in orders)
        assert tasks[0].result().duplicates_skipped == 0
    finally:
        await direct.aclose()
        await dropper.close()


@pytest.mark.parametrize("lost", ["FLUSHALL", "a restart without persistence"])
async def test_a_long_lived_publisher_adds_nothing_twice_after_redis_lost_everything(lost: str) -> None:
    """A web service's publisher keeps its client while Redis loses its data, the consumers make
    the stream again (MKSTREAM, no IDMP window set: on 8.6, Redis's default of 100 ids), and then
    a chunk's reply is lost: it is sent again and still adds nothing twice."""
    need_redis_server()
    server = start_local_redis("--appendonly", "no")
    dropper = ReplyDropper(server.port, _is_append, limit=0)  # none dropped until the data is gone
    port = await dropper.start()
    settings = make_settings(f"redis://127.0.0.1:{port}/0", SOCKET_TIMEOUT_MS="500")
    direct = Redis.from_url(server.url)
    try:
        await initialize(direct, settings)
        async with redis_connect(settings) as publisher:
            await publish_many(publisher, STREAM, sample_orders(1200))
            if lost == "FLUSHALL":
                await direct.flushall()
            else:
                server.kill()
                server.start()
                await direct.connection_pool.disconnect()
            await ensure_groups(direct, STREAM, settings.groups, "0")  # as a consumer recovers it
            dropper.limit = 1
            orders = sample_orders(1000)
            assert len(await publish_many(publisher, STREAM, orders)) == len(orders)
        assert dropper.dropped == 1
        entries: Any = await direct.xrange(STREAM)
        published = Counter(json.loads(fields[b"data"])["order_id"] for _, fields in entries)
        assert published == Counter(order.order_id for order in orders)  # each once
    finally:
        await direct.aclose()
        await dropper.close()
        server.close()


async def test_a_lost_xreadgroup_reply_is_recovered(own_server: LocalRedis) -> None:
    def entries(name: bytes, reply: Any) -> bool:
        entries: list[Any] = next(iter(reply.values()), []) if isinstance(reply, dict) else []
        return name == b"XREADGROUP" and bool(entries)

    dropper = ReplyDropper(own_server.port, entries)
    port = await dropper.start()
    settings = make_settings(
        f"redis://127.0.0.1:{port}/0", SOCKET_TIMEOUT_MS="500", BLOCK_MS="200", CLAIM_IDLE_MS="300"
    )
    direct = Redis.from_url(own_server.url)
    orders = sample_orders(5)
    try:
        await initialize(direct, settings)
        recorder = Recorder()
        member = ("email_group", "c", recorder.handler("c"))
        async with redis_connect(settings) as redis, running(redis, settings, member) as tasks:
            await wait_until(lambda: _blocked(direct, settings.consumer_name), "the consumer to block")
            await publish_many(direct, STREAM, orders)
            await wait_until(lambda: len(recorder.handled) == 5, "the orders of the lost reply")
        assert dropper.dropped == 1
        assert sorted(recorder.order_ids()) == sorted(o.order_id for o in orders)  # each once
        if not (await detect(direct)).readgroup_claim:
            assert tasks[0].result().reclaimed == 0  # found again in its own pending list, not claimed
        # (On 8.4+ redis-py's retry of the read may claim them back, idle, by XREADGROUP CLAIM.)
    finally:
        await direct.aclose()
        await dropper.close()


def _is_commit(name: bytes, reply: Any) -> bool:
    """The reply to the commit: [acked, [ids taken over], [refused staged writes], name taken]."""
    return name == b"FCALL" and isinstance(reply, list) and len(reply) == 4 and isinstance(reply[1], list)


async def _drain_through(
    dropper: ReplyDropper, server: LocalRedis, window: str, with_read: bool = True
) -> None:
    """Publish 20 orders and drain them with one email consumer through `dropper` (500 ms
    socket timeout); assert the dropper struck once and every order ran exactly once."""
    port = await dropper.start()
    settings = make_settings(f"redis://127.0.0.1:{port}/0", SOCKET_TIMEOUT_MS="500", DEDUPE_WINDOW_MS=window)
    direct = Redis.from_url(server.url)
    orders = sample_orders(20)
    try:
        await initialize(direct, settings)
        await publish_many(direct, STREAM, orders)
        recorder = Recorder()
        async with redis_connect(settings) as redis:
            consumer = StreamConsumer(redis, settings, "email_group", "c", recorder.handler("c"))
            consumer.reader.one_trip = with_read  # False: as on a cluster, the commit goes by itself
            task = asyncio.create_task(consumer.run())
            try:
                await wait_until(lambda: caught_up(direct, STREAM, ["email_group"]), "every order acked")
            finally:
                consumer.stop.set()
                async with asyncio.timeout(10):
                    await task
        assert dropper.dropped == 1
        assert sorted(recorder.order_ids()) == sorted(o.order_id for o in orders)  # each exactly once
    finally:
        await direct.aclose()
        await dropper.close()


@pytest.mark.parametrize("window", ["3600000", "0"], ids=["guard-on", "guard-off"])
@pytest.mark.parametrize("with_read", [True, False], ids=["with-the-read", "alone"])
async def test_a_lost_ack_reply_neither_loses_nor_reruns(
    own_server: LocalRedis, window: str, with_read: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The commit's reply is lost; the commit is sent again and nothing runs twice.

    With the read (one Redis): the consumer sends it again itself, knowing it is a second try,
    so it says only that Redis was unreachable; the entries that read delivered are read again
    from its own pending entries at once, not after CLAIM_IDLE_MS. Alone (as on a cluster):
    redis-py sends it again by itself, and the consumer names both possible causes of entries
    that were no longer pending. Either way no line says another consumer holds them.
    """
    await _drain_through(ReplyDropper(own_server.port, _is_commit), own_server, window, with_read)
    assert "while this one worked on them" not in caplog.text
    if with_read:
        assert "Redis unreachable (TimeoutError" in caplog.text
        assert "no longer pending at commit" not in caplog.text
    else:
        assert "no longer pending at commit" in caplog.text


@pytest.mark.parametrize("window", ["3600000", "0"], ids=["guard-on", "guard-off"])
async def test_a_commit_lost_on_its_way_is_sent_again_and_nothing_reruns(
    own_server: LocalRedis, window: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The commit sent with the next read never reaches Redis (then the connection goes silent).

    What it would have acked is kept and committed by the next try: not left pending to be
    read again from the consumer's own entries and run a second time.
    """

    def commit_call(command: list[bytes]) -> bool:
        return command[0].upper() == b"FCALL" and command[1].endswith(b"_commit")

    await _drain_through(
        ReplyDropper(own_server.port, lambda *_: False, request=commit_call), own_server, window
    )
    assert "Redis unreachable (TimeoutError" in caplog.text


async def _batch_on_a(redis: Redis, settings: Settings, count: int) -> tuple[str, list[bytes]]:
    """`count` new orders read by consumer "a" of the email group: the group and the entry ids."""
    await publish_many(redis, STREAM, sample_orders(count))
    group = settings.email_group
    return group, [entry_id for entry_id, _ in entries_of(await redis.xreadgroup(group, "a", {STREAM: ">"}))]


@pytest.mark.parametrize("taken", [[0], [4], [9], [0, 3, 9]], ids=["first", "middle", "last", "several"])
async def test_the_commit_acks_only_what_is_still_pending_on_this_consumer(
    redis: Redis, settings: Settings, taken: list[int]
) -> None:
    """The fence, wherever in the batch the entries another consumer took over sit.

    Plain ids (ack only) are acked straight from the arguments while every one is still ours;
    from the first that is not, one by one. Either way: entries claimed by another consumer
    are not acked and are reported, one acked already counts in neither, the rest are acked,
    and a staged write applies only with an entry that is still ours.
    """
    await initialize(redis, settings)
    group, ids = await _batch_on_a(redis, settings, 12)
    plain, rich = ids[:10], ids[10:]
    claimed: list[StreamIdT] = [*[plain[n] for n in taken], rich[0]]
    await redis.xclaim(STREAM, group, "b", 0, claimed)
    await redis.xack(STREAM, group, plain[6])
    fence = Fence(redis, keys_for(settings), group, "a", 0)
    writes: list[list[EncodableT]] = [["HINCRBY", "{orders}:effects", "n", 1]]
    reply = await fence.commit(plain, [(rich[0], "", writes), (rich[1], "", writes)])
    acked, fenced, errors = reply.acked, reply.fenced, reply.errors
    owned_by_b = {plain[n] for n in taken} | {rich[0]}
    assert (acked, set(fenced), errors) == (len(ids) - len(owned_by_b) - 1, owned_by_b, [])
    rows = await redis.xpending_range(STREAM, group, "-", "+", 100)
    assert {(row["message_id"], row["consumer"]) for row in rows} == {(i, b"b") for i in owned_by_b}
    assert await redis.hget("{orders}:effects", "n") == b"1"  # rich[1]'s write only


async def test_a_consumer_alone_in_its_group_commits_by_xack_and_still_fences(
    redis: Redis, settings: Settings
) -> None:
    """No other consumer of the group has an entry pending, so every pending entry is ours.

    The commit then acks plain ids by XACK alone, reading no pending rows (one summary XPENDING).
    Entries another consumer took over and finished count as not acked. A staged write still
    applies only with an entry that is pending on us.
    """
    await initialize(redis, settings)
    group, ids = await _batch_on_a(redis, settings, 12)
    plain, rich = ids[:10], ids[10:]
    await redis.xclaim(STREAM, group, "b", 0, [plain[2], rich[0]])
    await redis.xack(STREAM, group, plain[2], rich[0])  # b finished them: it holds nothing now
    fence = Fence(redis, keys_for(settings), group, "a", 0)
    writes: list[list[EncodableT]] = [["HINCRBY", "{orders}:effects", "n", 1]]
    reply = await fence.commit(plain, [(rich[0], "", writes), (rich[1], "", writes)])
    assert (reply.acked, reply.fenced, reply.errors) == (len(ids) - 2, [], [])
    assert (await redis.xpending(STREAM, group))["pending"] == 0
    assert await redis.hget("{orders}:effects", "n") == b"1"  # rich[1]'s write only

    _, ids = await _batch_on_a(redis, settings, 5)
    await redis.config_resetstat()
    assert await fence.commit(ids, []) == Committed(5, [], [], name_taken=False)
    assert (await redis.info("commandstats"))["cmdstat_xpending"]["calls"] == 1


async def test_one_pooled_connection_is_enough_for_a_consumer(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """REDIS_MAX_CONNECTIONS=1: the consumer's read of the next batch holds a connection while
    this batch's dedupe-guard calls need another; the pool has room for both."""
    settings = make_settings(redis_url, REDIS_MAX_CONNECTIONS="1", BATCH_SIZE="5")
    await initialize(redis, settings)
    orders = sample_orders(30)
    for order in orders:  # not from this project's producer: each passes the dedupe guard
        await redis.xadd(STREAM, {"data": serialize(order)})
    recorder = Recorder()
    async with (
        redis_connect(settings) as client,
        running(client, settings, ("email_group", "c", recorder.handler("c"))),
    ):
        await wait_until(lambda: caught_up(redis, STREAM, ["email_group"]), "every order acked")
    assert sorted(recorder.order_ids()) == sorted(o.order_id for o in orders)
    assert "Redis" not in caplog.text, caplog.text  # no error, no retry


class Gate(_Proxy):
    """A TCP proxy to Redis that can be cut: `cut()` closes every connection through it and
    refuses new ones (each is closed at once) until `heal()`, as a Redis that went away."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.open = target_port, True
        self.writers: set[asyncio.StreamWriter] = set()

    async def cut(self) -> None:
        """Close every connection through the gate; return once each close has gone out."""
        self.open = False
        for writer in list(self.writers):
            writer.close()
        for writer in list(self.writers):
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    def heal(self) -> None:
        self.open = True

    async def close(self) -> None:
        await self.cut()
        await super().close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.add(up_writer)
        if not self.open:  # cut before, or while this connection was being made
            for end in (writer, up_writer):
                end.close()
                self.writers.discard(end)
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()

        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        for end in (writer, up_writer):
            end.close()
            self.writers.discard(end)


class _CutWhenAhead:
    """A read hook that cuts `gate` the first time a batch was read ahead, and drops the pooled
    connections: the next send finds Redis gone before anything goes out."""

    def __init__(self, gate: Gate) -> None:
        self.gate, self.redis, self.was_cut, self.holding = gate, cast(Redis, None), False, False

    async def __call__(self, batch: Batch) -> None:
        if batch.ahead and not self.was_cut:
            self.was_cut = self.holding = True
            await self.gate.cut()
            # Else a connection whose close the event loop has not seen yet takes the next send,
            # and the failure only shows after it: then the batch is handled, as any batch in
            # hand when an outage begins, and its commit is sent again once Redis is back.
            await self.redis.connection_pool.disconnect()


@pytest.mark.parametrize("window", ["3600000", "0"], ids=["guard-on", "guard-off"])
async def test_a_batch_read_ahead_is_not_handled_while_redis_is_away(
    own_server: LocalRedis, window: str
) -> None:
    """Redis goes away while the consumer holds a full batch read ahead, before the turn that
    would handle it sends anything: the batch is dropped, not run while Redis is away (its
    commit could not land, and its lease lapses meanwhile), and read again from the
    consumer's own pending entries once Redis is back; every order then runs exactly once.
    On Redis 8.4+ (XREADGROUP ... CLAIM) too: the lease keeper keeps a batch read ahead fresh."""
    gate = Gate(own_server.port)
    port = await gate.start()
    settings = make_settings(
        f"redis://127.0.0.1:{port}/0", SOCKET_TIMEOUT_MS="500", BATCH_SIZE="5", DEDUPE_WINDOW_MS=window
    )
    direct = Redis.from_url(own_server.url)
    orders = sample_orders(15)
    run_while_away: list[str] = []
    recorder = Recorder()
    record = recorder.handler("c")

    async def handler(order: Order) -> None:
        if not gate.open:
            run_while_away.append(order.order_id)
        await record(order)

    try:
        await initialize(direct, settings)
        await publish_many(direct, STREAM, orders)
        cut = _CutWhenAhead(gate)
        async with redis_connect(settings) as redis:
            cut.redis = redis
            consumer = StreamConsumer(redis, settings, "email_group", "c", handler, hooks=Hooks(read=cut))
            task = asyncio.create_task(consumer.run())
            try:
                # Three failed turns (each doubles the back-off): it tried, and backed off, again.
                await wait_until(
                    lambda: consumer.recovery.backoff >= 0.8, "three failed turns with Redis away"
                )
                assert not gate.open
                assert run_while_away == []
                gate.heal()
                await wait_until(lambda: caught_up(direct, STREAM, ["email_group"]), "every order acked")
            finally:
                consumer.stop.set()
                async with asyncio.timeout(10):
                    await task
        assert sorted(recorder.order_ids()) == sorted(o.order_id for o in orders)  # each exactly once
        assert task.result().reclaimed == 0  # read again from its own pending entries, not claimed
        assert cut.was_cut
    finally:
        await direct.aclose()
        await gate.close()


async def test_deliveries_whose_reply_was_lost_are_not_counted_as_tries(own_server: LocalRedis) -> None:
    """The reply of a read that delivered orders is lost, then the reply of the read that takes them
    again from the consumer's own pending entries: Redis counts each as a delivery, though no
    handler ran. Every order here fails MAX_DELIVERIES - 1 times before it succeeds: none may be
    dead-lettered, for deliveries that never ran are not tries (found by the generative suite)."""

    def entries(name: bytes, reply: Any) -> bool:
        """A read's reply with entries, or the library's redeliver's: [[id, fields, count], ...]."""
        if name == b"XREADGROUP":
            return isinstance(reply, dict) and bool(next(iter(reply.values()), []))
        first = reply[0] if name == b"FCALL" and isinstance(reply, list) and reply else None
        return isinstance(first, list) and len(first) == 3 and isinstance(first[0], bytes)

    dropper = ReplyDropper(own_server.port, entries, limit=2)
    port = await dropper.start()
    settings = make_settings(f"redis://127.0.0.1:{port}/0", SOCKET_TIMEOUT_MS="500")
    direct = Redis.from_url(own_server.url)
    orders = sample_orders(5)
    runs: Counter[str] = Counter()

    async def handler(order: Order) -> None:
        runs[order.order_id] += 1
        if runs[order.order_id] < settings.max_deliveries:
            raise RuntimeError("failing until its last try")

    try:
        await initialize(direct, settings)
        member = ("email_group", "c", handler)
        async with redis_connect(settings) as redis, running(redis, settings, member):
            await wait_until(lambda: _blocked(direct, settings.consumer_name), "the consumer to block")
            await publish_many(direct, STREAM, orders)
            await wait_until(lambda: caught_up(direct, STREAM, ["email_group"]), "every order acked", 30)
        assert dropper.dropped == 2
        assert await direct.xlen(settings.dead_letter_stream) == 0
        assert runs == {order.order_id: settings.max_deliveries for order in orders}
    finally:
        await direct.aclose()
        await dropper.close()
