"""One master with replicas under Redis Sentinel: every script connects through the sentinels,
follows a failover, and `status`, the dashboard and the metrics name the master in use.

The set-ups are real: a master, two replicas and three sentinels (`redis-server --sentinel`)
the fixtures start on loopback; the failover tests SIGKILL the master or ask for a failover.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Script, need_cluster_tools, run_script, script_env, wait_until
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError
from test_cluster import set_app_users
from test_dashboard import get, start_dashboard

from config import Settings
from core import library
from core.keys import keys_for
from core.replies import parse_id
from core.sentinel import options
from redisPool import where
from status import caught_up
from tools.local_redis import LocalSentinel, free_port, start_local_sentinel

Start = Callable[..., Script]
GROUPS = ("fulfillment_group", "email_group")
OUTBOX = f"{keys_for(Settings.from_env({})).tag}:shipments"  # consumer1's tx.key("shipments")
EMAILED = re.compile(r"sending confirmation e-mail for order (\S+)\n")
UNUSED_URL = "redis://127.0.0.1:1/0"  # through Sentinel REDIS_URL's host is not used: nothing listens here
SENTINEL_PASSWORD = "s3nt-Kq7-pw"
BATCH = 200


@pytest.fixture
def sentinel() -> Iterator[LocalSentinel]:
    """A master, 2 replicas and 3 sentinels for this test alone (AOF always), failing over after 1.5 s."""
    need_cluster_tools()
    local = start_local_sentinel(2, 3, 1500, "--appendonly", "yes", "--appendfsync", "always")
    try:
        yield local
    finally:
        local.close()


@pytest.fixture
async def master(sentinel: LocalSentinel) -> AsyncIterator[Redis]:
    """The tests' own client of the master, whichever the sentinels name."""
    addresses = [("127.0.0.1", s.port) for s in sentinel.sentinels]
    manager = Sentinel(addresses, socket_timeout=2)
    client = manager.master_for(sentinel.name, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()
        await manager.aclose()


def sentinel_env(local: LocalSentinel, url: str = UNUSED_URL, **overrides: str) -> dict[str, str]:
    """A script's environment through the sentinels; no trimming, so the tests read every entry back."""
    through = {"REDIS_SENTINELS": local.addresses, "REDIS_SENTINEL_MASTER": local.name}
    return script_env(url, **{**through, "MAINTENANCE_INTERVAL_MS": "0", **overrides})


async def reply(port: int, *command: Any) -> Any:
    """One command on the server at `port`, on a connection of its own."""
    client = Redis(port=port, socket_timeout=5)
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def client_names(port: int) -> set[str]:
    client = Redis(port=port, socket_timeout=5)
    try:
        return {entry["name"] for entry in await client.client_list() if entry["name"]}
    finally:
        await client.aclose()


async def finished(client: Redis) -> bool:
    """Both groups caught up on the master; False while it is changing hands."""
    try:
        return await caught_up(client, "orders", GROUPS)
    except (RedisError, OSError):
        return False


async def order_ids(client: Redis, stream: str, field: bytes = b"data") -> Counter[str]:
    entries: Any = await client.xrange(stream)
    if field == b"data":
        return Counter(json.loads(fields[field])["order_id"] for _, fields in entries)
    return Counter(fields[field].decode() for _, fields in entries)


def test_the_settings_take_the_sentinels_and_their_credentials() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "rediss://consumer:c0ns@ignored:1/3?ssl_cert_reqs=none",
            "REDIS_SENTINELS": "10.0.0.1:26379, 10.0.0.2:26379,[::1]:26380",
            "REDIS_SENTINEL_MASTER": "orders-master",
            "REDIS_SENTINEL_USERNAME": "watcher",
            "REDIS_SENTINEL_PASSWORD": "s3cret-watch",
        }
    )
    assert settings.redis_sentinels == ("10.0.0.1:26379", "10.0.0.2:26379", "[::1]:26380")
    assert "s3cret-watch" not in repr(settings)
    sentinels, to_sentinels, to_master = options(settings)
    assert sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)]
    assert (to_sentinels["username"], to_sentinels["password"]) == ("watcher", "s3cret-watch")
    assert to_sentinels["ssl"] is True
    assert to_sentinels["ssl_cert_reqs"] == "none"
    assert (to_master["username"], to_master["password"], to_master["db"], to_master["ssl"]) == (
        "consumer",
        "c0ns",
        3,
        True,
    )
    assert "host" not in to_master
    assert "port" not in to_master
    assert "s3cret" not in where(settings)
    assert "c0ns" not in where(settings)


async def test_every_script_runs_through_sentinel_and_names_the_master_in_use(
    sentinel: LocalSentinel, master: Redis, scripts: Start
) -> None:
    """REDIS_URL names nothing that listens: everything goes through the sentinels. After a
    SENTINEL FAILOVER, status, the dashboard and the metrics name the new master, and the running
    consumers and lease keepers move to it although the old master is still up and a master."""
    env = sentinel_env(sentinel, CLAIM_IDLE_MS="3000")
    init = run_script("initialization_stream", env)
    assert init.returncode == 0, init.stderr
    metrics_port = free_port()
    consumers = [
        scripts("consumer1", {**env, "CONSUMER_NAME": "fulfillment-1", "METRICS_PORT": str(metrics_port)}),
        scripts("consumer2", {**env, "CONSUMER_NAME": "email-1"}),
    ]
    published = run_script("producer", env, "--count", "100")
    assert published.returncode == 0, published.stderr
    await wait_until(lambda: finished(master), "both groups to finish 100 orders", 30)
    first = sentinel.master_port()
    # The lease keepers (processes of their own) connect through the sentinels too.
    lease_keepers = {"fulfillment-1-lease", "email-1-lease"}
    await wait_until(lambda: _names_include(first, lease_keepers), "the lease keepers on the master", 20)
    _, base = await start_dashboard(scripts, env)

    async def named(port: int) -> bool:
        _, body = await get(f"{base}/api/status")
        ran = run_script("status", env, "--json")
        assert ran.returncode == 0, ran.stderr
        shown = json.loads(ran.stdout)
        scraped = await asyncio.to_thread(master_metric, metrics_port)
        address = f"127.0.0.1:{port}"
        return (body["report"].get("master"), shown.get("master"), scraped) == (
            address,
            address,
            ("mymaster", address),
        )

    await wait_until(lambda: named(first), "status, the dashboard and the metrics to name the master", 30)
    text = run_script("status", env)
    assert f"master mymaster at 127.0.0.1:{first}" in text.stdout, text.stdout + text.stderr

    # A coordinated failover: a replica becomes the master. The old one stays a master until the
    # sentinels make it a replica; here they cannot (it refuses REPLICAOF, as if cut off from
    # them), so it keeps taking the writes of whoever still uses it.
    assert await reply(first, "ACL", "SETUSER", "default", "-replicaof", "-slaveof")
    assert sentinel.ask("sentinel", "failover", sentinel.name) == ["OK"]
    await wait_until(lambda: sentinel.failed_over(first), "a replica to be promoted", 30)
    second = sentinel.master_port()
    await wait_until(
        lambda: named(second), "status, the dashboard and the metrics to name the new master", 30
    )
    # The running consumers move to the new master by themselves: new orders are handled there.
    published = run_script("producer", env, "--count", "50")
    assert published.returncode == 0, published.stderr
    new_master = Redis(port=second)
    try:
        await wait_until(lambda: finished(new_master), "both groups to finish the 50 new orders", 30)
        assert await new_master.xlen("orders") == 150
    finally:
        await new_master.aclose()
    await wait_until(lambda: _names_include(second, lease_keepers), "the lease keepers on the new master", 20)
    assert not await _is_replica(first)  # all along
    for consumer in consumers:
        assert consumer.process.poll() is None, consumer.output()
        assert "Traceback" not in consumer.output()


async def _is_replica(port: int) -> bool:
    role: Any = await reply(port, "ROLE")
    return bool(role[0] == b"slave")


async def _names_include(port: int, names: set[str]) -> bool:
    return names <= await client_names(port)


def master_metric(port: int) -> tuple[str, str] | None:
    """The labels of orders_redis_master on a consumer's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "orders_redis_master" and sample.value == 1:
                return sample.labels["name"], sample.labels["address"]
    return None


@pytest.mark.parametrize("min_replicas", [1, 0], ids=["durable", "not-durable"])
async def test_a_master_killed_under_load_is_ridden_out(
    sentinel: LocalSentinel, master: Redis, scripts: Start, min_replicas: int
) -> None:
    """SIGKILL the master while orders flow: the sentinels promote a replica, and the producer, the
    consumers and their lease keepers follow it. The race replication loses is forced: both replicas
    are paused (SIGSTOP) and their links cut while the master appends, and resumed as it dies.
    Without PUBLISH_MIN_REPLICAS the orders it confirmed meanwhile are lost; with it, none. The
    fulfillment service's Redis-side effects stay exactly once; handlers run twice only for the
    orders whose commits the new master never got."""
    env = sentinel_env(
        sentinel,
        BATCH_SIZE=str(BATCH),
        PUBLISH_MIN_REPLICAS=str(min_replicas),
        CLAIM_IDLE_MS="10000",
        REDIS_CONNECT_TIMEOUT_MS="30000",  # the producer keeps sending through the failover
    )
    init = run_script("initialization_stream", env)
    assert init.returncode == 0, init.stderr
    for port in sentinel.replica_ports():  # the function library reached them (FUNCTION LOAD replicates)
        assert await reply(port, "FUNCTION", "LIST", "LIBRARYNAME", f"orders_{library.version()}")
    consumers = [
        scripts("consumer1", {**env, "CONSUMER_NAME": "fulfillment-1"}),
        scripts("consumer2", {**env, "CONSUMER_NAME": "email-1"}),
    ]
    total = 40_000
    producer = scripts("producer", env, "--count", str(total))
    await wait_until(lambda: _length_at_least(master, 2_000), "orders to flow", 30)

    victim, bound = await kill_master_ahead_of_its_replicas(sentinel, master, producer)
    await wait_until(lambda: sentinel.failed_over(victim), "the sentinels to promote a replica", 30)
    promoted = sentinel.master_port()

    assert producer.wait(120) == 0, producer.output()[-3000:]
    confirmed = int(re.search(r"published ([\d,]+) orders", producer.output())[1].replace(",", ""))  # type: ignore[index]
    assert confirmed == total
    try:
        await wait_until(lambda: finished(master), "both groups to finish", 90)
    except BaseException:
        for consumer in consumers:
            print(consumer.output()[-3000:])
        raise
    found = await order_ids(master, "orders")
    assert max(found.values()) == 1  # never twice in the stream, even with chunks sent again
    lost = total - len(found)
    print(
        f"Sentinel failover with PUBLISH_MIN_REPLICAS={min_replicas}: {lost} of {total} confirmed orders lost"
    )
    if min_replicas:
        assert lost == 0  # nothing was confirmed that a replica did not have
    else:
        assert lost > 0  # the chunks the master confirmed while its replicas were paused
    # Redis-side effects, committed with each ack: exactly once per order in the stream.
    assert await order_ids(master, OUTBOX, b"order_id") == found
    # Effects outside Redis: again only for what the replicas had not seen acked.
    emailed = Counter(EMAILED.findall(consumers[1].output()))
    twice = sum(n - 1 for n in emailed.values())
    print(f"handled twice by the email service: {twice}, at most {bound}")
    assert twice <= bound
    # The library was on the promoted replica: nobody had to load it again.
    assert await reply(promoted, "FUNCTION", "LIST", "LIBRARYNAME", f"orders_{library.version()}")
    lease_keepers = {"fulfillment-1-lease", "email-1-lease"}
    await wait_until(
        lambda: _names_include(promoted, lease_keepers), "the lease keepers on the new master", 20
    )
    for consumer in consumers:
        assert consumer.process.poll() is None, consumer.output()  # rode it out, no crash
        assert "Traceback" not in consumer.output()
        assert "library is gone" not in consumer.output()


async def kill_master_ahead_of_its_replicas(
    sentinel: LocalSentinel, master: Redis, producer: Script
) -> tuple[int, int]:
    """SIGKILL the master once it holds orders its replicas lack: they are paused (SIGSTOP) and their
    links cut first, then resumed as it dies. Returns its port, and how many email orders at most
    the new master cannot know were handled: those a replica held pending when paused, and those
    the master delivered after what a replica had seen delivered."""
    victim, replicas = sentinel.master_port(), sentinel.replica_ports()
    known = [await _group(port, "email_group") for port in replicas]
    for port in replicas:
        sentinel.server(port).process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        assert await reply(victim, "CLIENT", "KILL", "TYPE", "replica") == len(replicas)
        before = int(await master.xlen("orders"))

        async def behind() -> bool:  # appended since, the replicas not having it
            return await _length_at_least(master, before + 1) or "NotReplicated" in producer.output()

        await wait_until(behind, "orders appended that the replicas do not have", 30)
        # Its writes (reads for groups, commits) held from here, so what it delivered is known at the kill.
        assert await reply(victim, "CLIENT", "PAUSE", "10000", "WRITE")
        delivered = (await _group(victim, "email_group"))["last-delivered-id"]
        seen = min((group["last-delivered-id"] for group in known), key=parse_id)
        since = await reply(victim, "XRANGE", "orders", b"(" + seen, delivered)
        sentinel.server(victim).kill()
    finally:
        for port in replicas:
            sentinel.server(port).process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    return victim, max(int(group["pending"]) for group in known) + len(since)


async def _length_at_least(client: Redis, length: int) -> bool:
    try:
        return int(await client.xlen("orders")) >= length
    except (RedisError, OSError):
        return False


async def _group(port: int, name: str) -> dict[str, Any]:
    client = Redis(port=port, socket_timeout=5)
    try:
        groups = await client.xinfo_groups("orders")
    finally:
        await client.aclose()
    return next(g for g in groups if g["name"].decode() == name)


@pytest.fixture
def guarded_sentinel() -> Iterator[LocalSentinel]:
    """Sentinels that require a password (requirepass), over a master and 2 replicas."""
    need_cluster_tools()
    local = start_local_sentinel(2, 3, 1500, password=SENTINEL_PASSWORD)
    try:
        yield local
    finally:
        local.close()


async def test_least_privilege_users_through_sentinels_that_require_a_password(
    guarded_sentinel: LocalSentinel, scripts: Start, tmp_path: Path
) -> None:
    """The producer and consumer users of redis/users.acl.template on every server, the sentinels'
    own password in REDIS_SENTINEL_PASSWORD: the pipeline runs. A wrong one ends a script at once
    with one line naming the setting, never the password; a master name the sentinels do not
    know, with one line saying so."""
    local = guarded_sentinel
    set_app_users([server.port for server in local.servers], tmp_path)
    guarded = {"REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD}
    init = run_script("initialization_stream", sentinel_env(local, **guarded))
    assert init.returncode == 0, init.stderr
    as_consumer = sentinel_env(local, "redis://consumer:c0ns@127.0.0.1:1/0", **guarded)
    as_producer = sentinel_env(local, "redis://producer:pr0d@127.0.0.1:1/0", **guarded)
    consumers = [scripts(module, as_consumer) for module in ("consumer1", "consumer2")]
    published = run_script("producer", as_producer, "--count", "60")
    assert published.returncode == 0, published.stderr
    client = Redis(port=local.master_port())
    try:
        await wait_until(lambda: finished(client), "both groups to finish 60 orders", 30)
        assert await client.xlen(OUTBOX) == 60
    finally:
        await client.aclose()
    for consumer in consumers:
        assert "error" not in consumer.output().lower(), consumer.output()

    started = time.monotonic()
    wrong = run_script("status", sentinel_env(local, REDIS_SENTINEL_PASSWORD="not-it-Zx9"))
    assert time.monotonic() - started < 8  # refused: no waiting out REDIS_CONNECT_TIMEOUT_MS
    assert wrong.returncode == 1
    [line] = wrong.stderr.strip().splitlines()
    assert "REDIS_SENTINEL_PASSWORD" in line, line
    assert "not-it-Zx9" not in line

    unknown = sentinel_env(
        local, REDIS_SENTINEL_MASTER="elsewhere", REDIS_CONNECT_TIMEOUT_MS="500", **guarded
    )
    [line] = run_script("status", unknown).stderr.strip().splitlines()
    assert line.count("knows no master 'elsewhere'") == 3, line


def test_no_sentinel_answering_is_one_line_naming_each(tmp_path: Path) -> None:
    silent = [free_port(), free_port()]
    addresses = ",".join(f"127.0.0.1:{port}" for port in silent)
    env = script_env(UNUSED_URL, REDIS_SENTINELS=addresses, REDIS_CONNECT_TIMEOUT_MS="500")
    result = run_script("status", env)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"status: error: cannot reach Redis at master mymaster of Sentinel {addresses}")
    assert all(f"sentinel 127.0.0.1:{port} ConnectionError" in line for port in silent), line
    assert len(line) < 400, line  # not redis-py's repr of each sentinel's client


def test_a_short_chaos_soak_through_sentinel_loses_nothing_and_applies_effects_once() -> None:
    """`python -m tools.chaos --sentinel` in small: consumer SIGKILLs and a master's SIGKILL while
    orders flow, publishing with PUBLISH_MIN_REPLICAS=1; judged by the Redis-side effects."""
    need_cluster_tools()
    args = ["--sentinel", "--orders", "3000", "--consumer-kills", "2", "--redis-restarts", "1"]
    args += ["--seconds", "8", "--redis-effects"]
    result = run_script("tools.chaos", script_env(UNUSED_URL), *args, timeout=300)
    line = result.stdout.strip().splitlines()[-1]
    figures = dict(item.split("=", 1) for item in line.removeprefix("chaos: ").split())
    assert (figures["published"], figures["lost"], figures["unexpected"]) == ("3000", "0", "0"), line
    assert (figures["consumer_kills"], figures["redis_restarts"]) == ("2", "1"), line
    assert (figures["redis_effects_missing"], figures["redis_effect_duplicates"]) == ("0", "0"), line
    assert result.returncode == 0, result.stdout + result.stderr
