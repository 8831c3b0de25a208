"""Partitioned streams on a real local Redis Cluster: routing, fan-out, reclaim, dead letters, failover.

Every test runs real processes (initialization_stream, producer, consumers) against clusters
of redis-server processes the fixtures start on loopback; the failover tests SIGKILL a master.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import subprocess
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
from conftest import ROOT, Script, need_cluster_tools, run_script, script_env, wait_until
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from test_dashboard import get, post, start_dashboard
from test_demo import Sandbox

from config import Settings
from core.groups import ensure_groups
from core.keys import keys_for, partition_of, partition_stream, partitions
from core.replies import parse_id
from orders import Order
from producer import publish_many, sample_orders
from redisPool import make_cluster, redis_connect
from tools.local_redis import LocalCluster, LocalRedis, free_port, start_local_cluster

Start = Callable[..., Script]
PARTITIONS = 3
PARTS = partitions(Settings.from_env({"REDIS_CLUSTER": "true", "STREAM_PARTITIONS": str(PARTITIONS)}))
STREAMS = [part.stream_key for part in PARTS]
DEAD_LETTERS = [part.dead_letter_stream for part in PARTS]
OUTBOXES = [f"{keys_for(part).tag}:shipments" for part in PARTS]  # consumer1's tx.key("shipments")
GROUPS = ("fulfillment_group", "email_group")


def cluster_env(url: str, **overrides: str) -> dict[str, str]:
    """Three partitions on the cluster; no trimming, so the tests can read every entry back."""
    return script_env(
        url, REDIS_CLUSTER="true", STREAM_PARTITIONS=str(PARTITIONS), MAINTENANCE_INTERVAL_MS="0", **overrides
    )


@pytest.fixture
async def client(cluster_url: str) -> AsyncIterator[RedisCluster]:
    redis = await RedisCluster.from_url(cluster_url).initialize()
    try:
        yield redis
    finally:
        await redis.aclose()


async def order_ids(redis: RedisCluster, stream: str) -> list[str]:
    entries: Any = await redis.xrange(stream)
    return [json.loads(fields[b"data"])["order_id"] for _, fields in entries]


async def done(redis: RedisCluster, group: str, total: int) -> bool:
    """`group` has nothing pending and has been delivered `total` entries over every partition,
    or every entry each partition holds (after a failover its count of entries read can lag)."""
    delivered = pending = 0
    every = True
    for stream in STREAMS:
        try:
            infos = {g["name"].decode(): g for g in await redis.xinfo_groups(stream)}
            last = (await redis.xinfo_stream(stream))["last-generated-id"]
        except Exception:  # no stream yet
            return False
        info = infos.get(group)
        if info is None:
            return False
        delivered += int(info["entries-read"] or 0)
        pending += int(info["pending"])
        every = every and parse_id(info["last-delivered-id"]) >= parse_id(last)
    return pending == 0 and (delivered >= total or every)


async def kill_master_ahead_of_its_replica(
    cluster: LocalCluster, client: RedisCluster, producer: Script
) -> LocalRedis:
    """SIGKILL the master of partition 0 once it holds orders its replica lacks: the replica is
    paused (SIGSTOP) and its link cut first, then resumed as the master dies."""
    victim = client.get_node_from_key(STREAMS[0])
    assert victim is not None
    killed = cluster.node(int(victim.port))
    replica = cluster.node(cluster.replica_of(killed.port))
    assert replica.process is not None
    before = int(await client.xlen(STREAMS[0]))
    replica.process.send_signal(signal.SIGSTOP)  # it falls behind its master from here:
    cut = await asyncio.to_thread(  # its link dropped, and it is too still to come back
        subprocess.run,
        ["redis-cli", "-p", str(killed.port), "client", "kill", "type", "replica"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    assert cut.stdout.strip() == "1"
    before = max(before, int(await client.xlen(STREAMS[0])))
    try:
        # Appended since, the replica not having it (durable: the producer then waits on WAIT).
        async def behind() -> bool:
            return await partition_grew(client, before + 1) or "NotReplicated" in producer.output()

        await wait_until(behind, "orders appended that the replica does not have", 30)
        killed.kill()
    finally:
        replica.process.send_signal(signal.SIGCONT)
    return killed


async def partition_grew(client: RedisCluster, length: int) -> bool:
    return int(await client.xlen(STREAMS[0])) >= length


def set_app_users(ports: list[int], tmp_path: Path) -> None:
    """The producer and consumer users of redis/users.acl.template (passwords pr0d, c0ns) on the
    servers at `ports` (ACL SETUSER is not replicated); the default user stays on, for the tests'
    own client."""
    passwords = {"REDIS_ADMIN_PASSWORD": "adm1n", "PRODUCER_PASSWORD": "pr0d", "CONSUMER_PASSWORD": "c0ns"}
    acl = tmp_path / "users.acl"
    render = {**os.environ, **passwords, "ACL_FILE": str(acl), "RENDER_ONLY": "1"}
    subprocess.run(["sh", str(ROOT / "redis" / "start.sh")], env=render, check=True, timeout=10)
    for line in acl.read_text().splitlines():
        name, rules = line.split()[1], re.findall(r"\([^)]*\)|\S+", line)[2:]
        if name in ("producer", "consumer"):
            for port in ports:
                command = ["redis-cli", "-p", str(port), "acl", "setuser", name, *rules]
                reply = subprocess.run(command, capture_output=True, text=True, check=True, timeout=10)
                assert reply.stdout.strip() == "OK", reply.stdout


def init(url: str, **overrides: str) -> None:
    result = run_script("initialization_stream", cluster_env(url, **overrides))
    assert result.returncode == 0, result.stderr


def test_the_routing_rule_is_crc32_of_the_order_id() -> None:
    assert partition_of("ord-1", 3) == 576472767 % 3 == 0
    assert [partition_stream("orders", i, 3) for i in range(3)] == ["{orders:0}", "{orders:1}", "{orders:2}"]
    assert DEAD_LETTERS == ["{orders:0}:dead-letter", "{orders:1}:dead-letter", "{orders:2}:dead-letter"]
    assert partition_stream("orders", 0, 1) == "orders"  # one partition: the key stays as it is


async def test_fan_out_balance_and_routing_across_partitions(
    cluster: LocalCluster, cluster_url: str, client: RedisCluster, scripts: Start
) -> None:
    init(cluster_url)
    # The three partitions' streams live on three different masters of this cluster.
    owners = {client.get_node_from_key(stream).port for stream in STREAMS}  # type: ignore[union-attr]
    assert len(owners) == 3
    fulfillment = [
        scripts("consumer1", cluster_env(cluster_url, CONSUMER_NAME=f"fulfillment-{n}")) for n in (1, 2)
    ]
    email = scripts("consumer2", cluster_env(cluster_url, CONSUMER_NAME="email-1"))

    async def all_reading() -> bool:  # every consumer waits on every partition before orders come
        for stream in STREAMS:
            if len(await client.xinfo_consumers(stream, "fulfillment_group")) < 2:
                return False
        return True

    await wait_until(all_reading, "both fulfillment consumers to read every partition", 20)
    published = run_script("producer", cluster_env(cluster_url), "--count", "300")
    assert published.returncode == 0, published.stderr
    for group in GROUPS:
        await wait_until(functools.partial(done, client, group, 300), f"{group} to finish 300 orders", 30)

    seen: list[str] = []
    for index, stream in enumerate(STREAMS):
        ids = await order_ids(client, stream)
        assert ids, f"partition {stream} got no orders"
        assert {partition_of(order_id, PARTITIONS) for order_id in ids} == {index}
        seen += ids
    assert len(seen) == len(set(seen)) == 300
    # The fulfillment handler's Redis effects, committed with each order: once per order.
    shipped: list[str] = []
    for outbox in OUTBOXES:
        entries: Any = await client.xrange(outbox)
        shipped += [fields[b"order_id"].decode() for _, fields in entries]
    assert Counter(shipped) == Counter(seen)
    # Both fulfillment consumers shared the work; the email consumer had every order.
    for consumer in fulfillment:
        assert "fulfilling order" in consumer.output()
    await wait_until(lambda: email.output().count("order ord-") >= 300, "the email log lines", 10)

    status = run_script("status", cluster_env(cluster_url), "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["length"] == 300
    assert [part["stream"] for part in report["partitions"]] == STREAMS
    assert {part["node"] for part in report["partitions"]} == {f"127.0.0.1:{port}" for port in owners}
    assert {g["name"]: g["pending"] for g in report["groups"]} == dict.fromkeys(GROUPS, 0)
    assert {c["name"] for g in report["groups"] for c in g["consumer_list"]} >= {
        "fulfillment-1",
        "fulfillment-2",
        "email-1",
    }


async def test_a_killed_consumers_entries_are_reclaimed_in_every_partition(
    cluster_url: str, client: RedisCluster, scripts: Start
) -> None:
    env = cluster_env(cluster_url, CLAIM_IDLE_MS="1000", SERVICE_GROUP="fulfillment_group")
    init(cluster_url)
    published = run_script("producer", env, "--count", "90")
    assert published.returncode == 0, published.stderr
    victim = scripts("tests.slow_service", {**env, "CONSUMER_NAME": "victim", "HANDLER_MS": "600000"})

    async def holds_in_every_partition() -> bool:
        for stream in STREAMS:
            summary: Any = await client.xpending(stream, "fulfillment_group")
            if not summary["pending"]:
                return False
        return True

    await wait_until(holds_in_every_partition, "the victim to hold entries in every partition", 20)
    victim.process.send_signal(signal.SIGKILL)
    victim.wait()
    rescuer = scripts("tests.slow_service", {**env, "CONSUMER_NAME": "rescuer", "HANDLER_MS": "0"})
    await wait_until(lambda: done(client, "fulfillment_group", 90), "the rescuer to finish", 30)
    ran = re.findall(r"ran order (\S+)", rescuer.output())
    every = [order_id for stream in STREAMS for order_id in await order_ids(client, stream)]
    assert len(every) == 90
    assert set(ran) == set(every)


async def test_a_poison_entry_in_one_partition_is_dead_lettered_there(
    cluster_url: str, client: RedisCluster, scripts: Start
) -> None:
    init(cluster_url)
    await client.xadd(STREAMS[1], {"data": b"not json"})
    scripts("consumer2", cluster_env(cluster_url, CONSUMER_NAME="email-1"))
    published = run_script("producer", cluster_env(cluster_url), "--count", "30")
    assert published.returncode == 0, published.stderr
    await wait_until(lambda: done(client, "email_group", 31), "the email group to finish", 30)
    assert [await client.xlen(dead) for dead in DEAD_LETTERS] == [0, 1, 0]

    listed = run_script("deadletter", cluster_env(cluster_url), "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(row["partition"], row["group"]) for row in rows] == [(STREAMS[1], "email_group")]
    shown = run_script("deadletter", cluster_env(cluster_url), "show", rows[0]["id"])
    assert shown.returncode == 0
    assert "not json" in shown.stdout
    status = json.loads(run_script("status", cluster_env(cluster_url), "--json").stdout)
    assert status["dead_letters"] == 1
    purged = run_script("deadletter", cluster_env(cluster_url), "purge", "--all", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert "purge: 1 of 1 entries" in purged.stdout
    assert sum([await client.xlen(dead) for dead in DEAD_LETTERS]) == 0


@pytest.mark.parametrize("min_replicas", [1, 0], ids=["durable", "not-durable"])
async def test_a_master_killed_under_load_is_ridden_out(
    cluster_with_replicas: LocalCluster, scripts: Start, min_replicas: int
) -> None:
    """SIGKILL the master of a partition while orders flow: its replica takes over, everyone
    reconnects by themselves. The race replication loses is forced: the replica is paused
    (SIGSTOP) and its link cut while the master appends a chunk, and resumed as the master dies. Without
    PUBLISH_MIN_REPLICAS the orders the master confirmed meanwhile are lost; with it, none."""
    url = cluster_with_replicas.url
    # Acks the dying master confirmed but never replicated come back pending on the new master;
    # a consumer that saw no error finds them again once idle for CLAIM_IDLE_MS: 10 s here,
    # well inside the 60 s this test waits for each group (TEST_ENV's 60 s is not).
    env = cluster_env(url, BATCH_SIZE="200", PUBLISH_MIN_REPLICAS=str(min_replicas), CLAIM_IDLE_MS="10000")
    init(url)
    client = await RedisCluster.from_url(url).initialize()
    try:
        consumers = [scripts(module, env) for module in ("consumer1", "consumer2")]
        total = 20_000
        producer = scripts("producer", env, "--count", str(total))

        async def flowing() -> bool:
            return sum([await client.xlen(stream) for stream in STREAMS]) >= 2_000

        await wait_until(flowing, "orders to flow", 30)
        killed = await kill_master_ahead_of_its_replica(cluster_with_replicas, client, producer)
        # Its replica takes over; then, as an orchestrator would, the killed node is started
        # again and rejoins as the new master's replica (until then WAIT has no replica to count).
        await wait_until(lambda: cluster_with_replicas.failed_over(killed.port), "a replica to take over", 30)
        killed.start()

        assert producer.wait(60) == 0, producer.output()
        confirmed = int(re.search(r"published ([\d,]+) new orders", producer.output())[1].replace(",", ""))  # type: ignore[index]
        assert confirmed == total

        async def present() -> Counter[str]:
            found: Counter[str] = Counter()
            for stream in STREAMS:
                found.update(await order_ids(client, stream))
            return found

        await wait_until(lambda: done(client, "email_group", 1), "the cluster to answer again", 30)
        found = await present()
        assert max(found.values()) == 1  # never twice, even with chunks sent again
        lost = total - len(found)
        print(f"failover with PUBLISH_MIN_REPLICAS={min_replicas}: {lost} of {total} confirmed orders lost")
        if min_replicas:
            assert lost == 0  # nothing was confirmed that the replica did not have
        else:
            assert lost > 0  # the chunks the master confirmed while its replica was paused
            said = re.findall(r"no longer has ([\d,]+) orders? of this run", producer.output())
            assert sum(int(n.replace(",", "")) for n in said) == lost  # and the producer says so
        for group in GROUPS:
            try:
                await wait_until(functools.partial(done, client, group, len(found)), f"{group} to finish", 60)
            except BaseException:
                for consumer in consumers:  # their last lines, to tell why
                    print(consumer.output()[-3000:])
                raise
        for consumer in consumers:
            assert consumer.process.poll() is None, consumer.output()  # rode it out, no crash
            assert "Traceback" not in consumer.output()
    finally:
        await client.aclose()


async def test_scripts_started_after_the_node_of_redis_url_died_start_from_the_other_seeds(
    cluster_with_replicas: LocalCluster, scripts: Start
) -> None:
    """The master REDIS_URL names is SIGKILLed and its replica takes over: every script started
    afterwards (and each consumer's lease keeper, a process of its own) reaches the cluster
    through the other nodes named in REDIS_CLUSTER_NODES."""
    local = cluster_with_replicas
    named = local.nodes[0].port
    assert named in local.master_ports()
    seeds = ",".join(f"127.0.0.1:{port}" for port in local.ports if port != named)
    env = cluster_env(local.url, REDIS_CLUSTER_NODES=seeds)
    local.node(named).kill()
    await wait_until(lambda: local.failed_over(named), "a replica to take over", 30)

    init(local.url, REDIS_CLUSTER_NODES=seeds)
    consumers = [
        scripts("consumer1", {**env, "CONSUMER_NAME": "fulfillment-1"}),
        scripts("consumer2", {**env, "CONSUMER_NAME": "email-1"}),
    ]
    published = run_script("producer", env, "--count", "60")
    assert published.returncode == 0, published.stderr
    alive = [local.node(port) for port in local.ports if port != named]
    client = await RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", node.port) for node in alive]
    ).initialize()
    try:
        for group in GROUPS:
            await wait_until(functools.partial(done, client, group, 60), f"{group} to finish 60 orders", 30)
        keepers = functools.partial(lease_keepers, local, {"fulfillment-1-lease", "email-1-lease"})
        await wait_until(keepers, "the lease keepers connected to the cluster", 20)
    finally:
        await client.aclose()
    assert json.loads(run_script("status", env, "--json").stdout)["length"] == 60
    for module, args in (("deadletter", ["list"]), ("maintenance", [])):
        result = run_script(module, env, *args)
        assert result.returncode == 0, (module, result.stderr)
    for consumer in consumers:
        assert "lease keeper process ended" not in consumer.output(), consumer.output()
        assert "Traceback" not in consumer.output()


async def lease_keepers(cluster: LocalCluster, names: set[str]) -> bool:
    """Every one of `names` is a client of one of the cluster's masters."""
    found = set()
    for port in cluster.master_ports():
        node = Redis(port=port)
        try:
            found |= {client["name"] for client in await node.client_list()}
        finally:
            await node.aclose()
    return names <= found


async def test_the_least_privilege_users_run_the_pipeline_on_the_cluster(
    cluster: LocalCluster, cluster_url: str, client: RedisCluster, scripts: Start, tmp_path: Path
) -> None:
    """The producer and consumer users of redis/users.acl.template, set on every node, publish
    and consume partitioned orders (the function library runs with their key rules)."""
    set_app_users(cluster.ports, tmp_path)
    init(cluster_url)
    host = cluster_url.removeprefix("redis://")
    as_consumer = cluster_env(f"redis://consumer:c0ns@{host}", CONSUMER_NAME="email-1")
    as_producer = cluster_env(f"redis://producer:pr0d@{host}")
    consumers = [scripts(module, as_consumer) for module in ("consumer1", "consumer2")]
    published = run_script("producer", as_producer, "--count", "60")
    assert published.returncode == 0, published.stderr
    for group in GROUPS:
        await wait_until(functools.partial(done, client, group, 60), f"{group} to finish 60 orders", 30)
    for consumer in consumers:
        assert "error" not in consumer.output().lower(), consumer.output()
    # consumer1's transactional writes, committed under the consumer user in each partition's slot
    shipped = [await client.xlen(outbox) for outbox in OUTBOXES]
    assert sum(shipped) == 60
    assert all(shipped)


async def test_the_demo_runs_partitioned_on_the_cluster_and_leaves_no_key(
    cluster: LocalCluster, cluster_url: str
) -> None:
    result = run_script(
        "tools.demo", script_env(cluster_url, REDIS_CLUSTER="true"), "--cluster", "--count", "6"
    )
    assert result.returncode == 0, result.stderr
    assert "fulfillment_group: 6/6 orders" in result.stdout
    assert "email_group: 6/6 orders (email-1 6); handled twice: 0" in result.stdout
    assert "partitions: 3 streams on a Redis Cluster" in result.stdout
    for port in cluster.ports:  # every key the demo made, on every master, is gone
        node = Redis(port=port)
        try:
            assert await node.dbsize() == 0
        finally:
            await node.aclose()


async def test_the_demo_starts_a_cluster_of_its_own_and_removes_it(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path)
    need_cluster_tools()
    result = run_script("tools.demo", sandbox.env, "--cluster", "--count", "3", timeout=90)
    assert result.returncode == 0, result.stderr
    assert "started a throwaway Redis Cluster of 3 masters" in result.stdout
    assert "email_group: 3/3 orders" in result.stdout
    await sandbox.assert_clean()


async def test_the_dashboard_sums_the_partitions_and_redrives_in_the_right_one(
    cluster_url: str, client: RedisCluster, scripts: Start
) -> None:
    init(cluster_url)
    await client.xadd(STREAMS[2], {"data": b"not json"})  # dead-lettered in partition 2
    env = cluster_env(cluster_url, DASHBOARD_TOKEN="t0ken")
    scripts("consumer2", env)
    published = run_script("producer", env, "--count", "40")
    assert published.returncode == 0, published.stderr
    await wait_until(lambda: done(client, "email_group", 41), "the email group to finish", 30)
    _, base = await start_dashboard(scripts, env)

    async def shows_everything() -> bool:
        _, body = await get(f"{base}/api/status")
        return bool(body["report"]["dead_letters"] == 1)

    await wait_until(shows_everything, "the dashboard to show the dead letter", 20)
    _, body = await get(f"{base}/api/status")
    report = body["report"]
    assert report["length"] == 41
    assert [part["stream"] for part in report["partitions"]] == STREAMS
    [row] = report["newest_dead_letters"]
    status, shown = await get(f"{base}/api/dead-letters/{row['id']}")
    assert status == 200
    assert shown["data"] == "not json"
    status, moved = await post(
        f"{base}/api/dead-letters/{row['id']}/purge", Authorization="Bearer t0ken", Origin=base
    )
    assert status == 200, moved
    assert await client.xlen(DEAD_LETTERS[2]) == 0


async def test_metrics_show_each_partition_and_the_totals(
    cluster_url: str, client: RedisCluster, scripts: Start
) -> None:
    init(cluster_url)
    port = free_port()
    scripts("consumer2", cluster_env(cluster_url, METRICS_PORT=str(port)))
    published = run_script("producer", cluster_env(cluster_url), "--count", "30")
    assert published.returncode == 0, published.stderr
    await wait_until(lambda: done(client, "email_group", 30), "the email group to finish", 30)

    def samples() -> dict[tuple[str, str], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        found = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.labels.get("group") == "email_group":
                    found[sample.name, sample.labels.get("partition", "")] = sample.value
        return found

    async def refreshed() -> bool:
        seen = await asyncio.to_thread(samples)
        gauges = [seen.get((name, stream)) for name in ("orders_partition_lag", "orders_partition_pending")
                  for stream in STREAMS]  # fmt: skip
        return gauges == [0] * 6 and seen.get(("orders_processed_total", "")) == 30

    await wait_until(refreshed, "every partition's gauges to say caught up", 30)
    seen = await asyncio.to_thread(samples)
    assert (seen["orders_group_lag", ""], seen["orders_group_pending", ""]) == (0, 0)  # the sums


async def test_a_connection_closed_under_its_reconnect_is_retried_as_lost(cluster_url: str) -> None:
    """After a failover redis-py closes a node's free connections while another task may just have
    taken one. Forced here: the first connection to a node is closed after its send found it
    open and before it writes (its handshake's HELLO), as that clean-up closed it in the
    failover test. The command goes through on a fresh connection, as after any lost one; it
    used to raise AttributeError past every retry (a consumer died of it in the failover test
    above)."""
    settings = Settings.from_env({"REDIS_URL": cluster_url, "REDIS_CLUSTER": "true"})
    cluster: Any = make_cluster(settings)
    closed: list[object] = []
    guarded: type[Any] = cluster.connection_kwargs["connection_class"]

    class ClosedOnce(guarded):  # type: ignore[misc]
        async def _send_packed_command(self, command: Any) -> None:
            if not closed:  # the clean-up's close, between the send's check and its write
                closed.append(self)
                await self.disconnect()
            await super()._send_packed_command(command)

    try:
        await cluster.initialize()  # connected to the node of the URL only
        url_port = urlsplit(cluster_url).port
        stream = next(s for s in STREAMS if cluster.get_node_from_key(s).port != url_port)
        cluster.get_node_from_key(stream).connection_class = ClosedOnce  # its first connection
        assert await cluster.xadd(stream, {"data": b"x"})
        assert closed  # the race was forced, and the command went through all the same
    finally:
        await cluster.aclose()


async def test_groups_are_made_when_a_failover_left_a_slot_map_refresh_due(cluster_url: str) -> None:
    """A lost connection leaves redis-py's cluster client owing a slot-map refresh (its
    `_initialize`, set here as a failover sets it). redis-py 8.1 queues a MULTI's commands from
    a thread with an event loop of its own, which would make that refresh there, on this loop's
    lock and connections: a consumer starting during a failover died of a RuntimeError. The
    groups are made all the same, and the client keeps working on this loop."""
    settings = Settings.from_env({"REDIS_URL": cluster_url, "REDIS_CLUSTER": "true"})
    async with redis_connect(settings) as redis:
        cluster: Any = redis
        for n in range(2):  # uncontended, then with another task refreshing at the same time
            cluster._initialize = True
            stream = f"{STREAMS[0]}:groups-{n}"
            other = asyncio.create_task(cluster.initialize()) if n else None
            assert await ensure_groups(redis, stream, GROUPS) == list(GROUPS)
            if other is not None:
                await other
            assert {g["name"].decode() for g in await redis.xinfo_groups(stream)} == set(GROUPS)


@pytest.mark.slow
async def test_live_work_stays_with_its_owner_when_every_node_restarts(scripts: Start) -> None:
    """Every node SIGKILLed and started again (AOF) while the owner runs an order in each partition,
    a second consumer waiting: the owner's lease outlives the restart (its keeper rides out any
    cluster error), so no live order is run twice."""
    need_cluster_tools()
    local = start_local_cluster(masters=3)
    client = await RedisCluster.from_url(local.url).initialize()
    try:
        env = cluster_env(local.url, CLAIM_IDLE_MS="9000", SOCKET_TIMEOUT_MS="1000", BLOCK_MS="200")
        init(local.url)
        owner = scripts("tests.slow_service", {**env, "CONSUMER_NAME": "owner", "HANDLER_MS": "14000"})
        one_each: dict[int, Order] = {}
        for order in sample_orders(60):
            one_each.setdefault(partition_of(order.order_id, PARTITIONS), order)
        await publish_many(cast(Redis, client), "orders", list(one_each.values()), partitions=PARTITIONS)

        async def held_in_every_partition() -> bool:
            for stream in STREAMS:
                summary: Any = await client.xpending(stream, "fulfillment_group")
                if not summary["pending"]:
                    return False
            return True

        await wait_until(held_in_every_partition, "the owner to hold an order in every partition", 20)
        for node in local.nodes:
            node.kill()
        # The outage is the condition forced: 3.5 s, longer than the lease's refresh interval (a third
        # of CLAIM_IDLE_MS), so a refresh fails on what a cluster client raises with no node up, and
        # shorter than the lease itself (an outage longer than CLAIM_IDLE_MS lapses every lease).
        await asyncio.sleep(3.5)
        for node in local.nodes:
            node.start()
        other = scripts("tests.slow_service", {**env, "CONSUMER_NAME": "other", "HANDLER_MS": "0"})
        await wait_until(lambda: done(client, "fulfillment_group", PARTITIONS), "every order settled", 60)
        ran = Counter(re.findall(r"ran order (\S+)", owner.output() + other.output()))
        assert ran == Counter({order.order_id: 1 for order in one_each.values()})
        assert "ran order" not in other.output()
        assert owner.process.poll() is None
    finally:
        await client.aclose()
        local.close()
