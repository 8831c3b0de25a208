"""Operating it: status, dead-letter tools, lossless trimming, stale consumers, metrics, capabilities."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ROOT, Script, make_settings, run_script, script_env, wait_until
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT
from test_pipeline import Recorder, running

from config import Settings
from core.capabilities import Capabilities, detect, parse_version
from core.dead_letters import dead_letter_fields, original_fields
from core.replies import text
from deadletter import build_parser
from initialization_stream import initialize
from maintenance import remove_stale_consumers, safe_trim_point, trim
from producer import publish_many, sample_orders
from status import caught_up
from tools.local_redis import LocalRedis, free_port

STREAM = "orders"
NO_FEATURES = Capabilities((7, 0, 15))


@pytest.mark.parametrize(
    ("version", "acked", "claim", "idmp"),
    [
        ("7.0.15", False, False, False),
        ("7.4.2", False, False, False),
        ("8.0.0", False, False, False),
        ("8.2.1", True, False, False),
        ("8.4.0", True, True, False),
        ("8.6.0-rc1", True, True, True),
        ("9", True, True, True),
    ],
)
def test_capabilities_follow_the_server_version(version: str, acked: bool, claim: bool, idmp: bool) -> None:
    capabilities = Capabilities(parse_version(version))
    assert (capabilities.acked_trim, capabilities.readgroup_claim, capabilities.xadd_idmp) == (
        acked,
        claim,
        idmp,
    )


def test_parse_version_tolerates_odd_strings() -> None:
    assert parse_version("7.0.15") == (7, 0, 15)
    assert parse_version("8.6.0-rc1") == (8, 6, 0)
    assert parse_version("garbage") == (0, 0, 0)


async def incident(redis: Redis, settings: Settings) -> dict[str, Any]:
    """A lagging email group with a dead consumer holding entries, and two poison entries."""
    await initialize(redis, settings)
    orders = sample_orders(40)
    await publish_many(redis, STREAM, orders)
    await redis.xadd(STREAM, {"data": b"{not json"})
    await redis.xadd(STREAM, {"data": b'{"order_id": "x"}'})
    await redis.xreadgroup(settings.email_group, "dead-pod", {STREAM: ">"}, count=5)
    recorder = Recorder()
    async with running(redis, settings, (settings.fulfillment_group, "f1", recorder.handler("f1"))):
        await wait_until(lambda: caught_up(redis, STREAM, [settings.fulfillment_group]), "fulfillment")
    return {"orders": orders}


async def test_status_shows_an_incident_and_fails_its_thresholds(
    redis: Redis, redis_url: str, settings: Settings
) -> None:
    await incident(redis, settings)
    env = script_env(redis_url, NO_COLOR="1")
    healthy = run_script("status", env)
    assert healthy.returncode == 0, healthy.stderr
    text = healthy.stdout
    assert "stream orders: 42 entries" in text
    assert "email_group" in text
    assert "consumer dead-pod" in text
    assert "dead letters in orders:dead-letter: 2" in text
    assert text.rstrip().endswith("healthy")

    sick = run_script("status", env, "--max-lag", "10", "--max-pending", "4", "--max-dead-letters", "1")
    assert sick.returncode == 3
    last = sick.stdout.rstrip().splitlines()[-1]
    assert last.startswith("UNHEALTHY: ")
    assert "email_group: lag 37 > 10" in last
    assert "email_group: pending 5 > 4" in last
    assert "dead letters 2 > 1" in last

    machine = run_script("status", env, "--json", "--max-pending-age", "3600")
    assert machine.returncode == 0
    report = json.loads(machine.stdout)
    groups = {g["name"]: g for g in report["groups"]}
    assert (groups["email_group"]["pending"], groups["email_group"]["lag"]) == (5, 37)
    assert groups["fulfillment_group"]["pending"] == 0
    assert [c["name"] for c in groups["email_group"]["consumer_list"]] == ["dead-pod"]
    assert report["dead_letters"] == 2
    assert report["problems"] == []
    capabilities = await detect(redis)
    assert report["features"] == {
        "xtrim_acked": capabilities.acked_trim,
        "xreadgroup_claim": capabilities.readgroup_claim,
        "xadd_idmp": capabilities.xadd_idmp,
    }
    # Which reclaim path the consumers take on this server (detected at their start).
    claim = "XREADGROUP CLAIM" if capabilities.readgroup_claim else "XPENDING IDLE + XCLAIM of lapsed leases"
    assert report["paths"]["reclaim"].startswith(claim)
    assert "SECRET" not in machine.stdout


def test_status_usage_errors_exit_2(redis_url: str) -> None:
    for args in (["--watch", "0"], ["--max-lag", "-1"], ["--max-lag", "x"]):
        result = run_script("status", script_env(redis_url), *args)
        assert result.returncode == 2, args


async def test_status_of_a_missing_stream(redis: Redis, redis_url: str) -> None:
    env = script_env(redis_url, NO_COLOR="1")
    for args in ([], ["--max-lag", "0"]):  # a health check never passes on a missing pipeline
        result = run_script("status", env, *args)
        assert result.returncode == 3, args
        assert "does not exist" in result.stdout
        last = result.stdout.rstrip().splitlines()[-1]
        assert last.startswith("UNHEALTHY: ")
        for problem in (
            "stream orders: does not exist",
            "fulfillment_group: missing",
            "email_group: missing",
        ):
            assert problem in last
    machine = run_script("status", env, "--json")
    assert machine.returncode == 3
    report = json.loads(machine.stdout)
    assert report["exists"] is False
    assert [(g["name"], g["exists"]) for g in report["groups"]] == [
        ("fulfillment_group", False),
        ("email_group", False),
    ]
    assert "stream orders: does not exist" in report["problems"]


async def test_deadletter_list_show_purge(redis: Redis, redis_url: str, settings: Settings) -> None:
    await incident(redis, settings)
    env = script_env(redis_url)
    listing = run_script("deadletter", env, "list", "--json")
    rows = json.loads(listing.stdout)
    assert [r["group"] for r in rows] == ["fulfillment_group", "fulfillment_group"]
    assert all(r["deliveries"] == "1" and r["error"].startswith("invalid order") for r in rows)
    text = run_script("deadletter", env, "list").stdout
    assert rows[0]["id"] in text
    shown = json.loads(run_script("deadletter", env, "show", rows[0]["id"]).stdout)
    assert shown["data"] == "{not json"
    assert run_script("deadletter", env, "show", "1-1").returncode == 2
    assert run_script("deadletter", env, "show", "nope").returncode == 2
    assert run_script("deadletter", env, "purge").returncode == 2  # nothing chosen
    purged = run_script("deadletter", env, "purge", rows[0]["id"])
    assert f"{rows[0]['id']}: purged" in purged.stdout
    again = run_script("deadletter", env, "purge", rows[0]["id"])  # idempotent
    assert again.returncode == 0
    assert "not found" in again.stdout
    assert await redis.xlen(settings.dead_letter_stream) == 1


async def test_redrive_goes_to_its_own_group_only(redis: Redis, redis_url: str, settings: Settings) -> None:
    await initialize(redis, settings)
    orders = sample_orders(3)
    fixed_later = orders[1].order_id
    broken = True

    async def picky(order: Any) -> None:
        if broken and order.order_id == fixed_later:
            raise RuntimeError("inventory service down")

    email = Recorder()
    f_group, e_group = settings.groups
    fulfillment = Recorder()

    async def fulfil(order: Any) -> None:
        await picky(order)
        await fulfillment.handler("f")(order)

    await publish_many(redis, STREAM, orders)
    async with running(redis, settings, (f_group, "f", fulfil), (e_group, "e", email.handler("e"))):
        await wait_until(lambda: redis.xlen(settings.dead_letter_stream), "the order to be dead-lettered")
        broken = False
        result = run_script("deadletter", script_env(redis_url), "redrive", "--group", f_group)
        assert result.returncode == 0, result.stderr
        assert "redrive: 1 of 1 entries" in result.stdout
        await wait_until(lambda: fixed_later in fulfillment.order_ids(), "the redriven order")
        await wait_until(lambda: caught_up(redis, STREAM, settings.groups), "both groups to settle")
    assert sorted(fulfillment.order_ids()) == sorted(o.order_id for o in orders)
    assert sorted(email.order_ids()) == sorted(o.order_id for o in orders)  # not twice
    assert await redis.xlen(settings.dead_letter_stream) == 0
    again = run_script("deadletter", script_env(redis_url), "redrive", "--all")
    assert "redrive: 0 of 0 entries" in again.stdout


async def test_redrive_all_interrupted_neither_loses_nor_doubles(
    redis: Redis, redis_url: str, settings: Settings, scripts: Callable[..., Script]
) -> None:
    total = 300
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(total):
            pipe.xadd(settings.dead_letter_stream, {"data": b"{}", "group": "email_group", "n": str(n)})
        await pipe.execute()
    first = scripts("deadletter", script_env(redis_url), "redrive", "--all")
    await wait_until(lambda: _fewer(redis, settings, total - 20), "some entries to be redriven")
    first.process.send_signal(signal.SIGKILL)
    first.wait()
    assert await redis.xlen(STREAM) + await redis.xlen(settings.dead_letter_stream) == total
    second = run_script("deadletter", script_env(redis_url), "redrive", "--all", timeout=60)
    assert second.returncode == 0
    entries: Any = await redis.xrange(STREAM)
    numbers = sorted(int(fields[b"n"]) for _, fields in entries)
    assert numbers == list(range(total))  # each exactly once
    assert all(fields[b"redrive_for"] == b"email_group" for _, fields in entries)
    assert await redis.xlen(settings.dead_letter_stream) == 0


async def _fewer(redis: Redis, settings: Settings, limit: int) -> bool:
    return int(await redis.xlen(settings.dead_letter_stream)) <= limit


@pytest.fixture
async def small_nodes(own_server: LocalRedis) -> Any:
    """A client of a server whose stream nodes hold 10 entries, so approximate trimming shows."""
    client = Redis.from_url(own_server.url)
    await client.config_set("stream-node-max-entries", 10)
    yield client
    await client.aclose()


async def test_trimming_never_removes_what_a_lagging_group_needs(
    small_nodes: Redis, own_server: LocalRedis
) -> None:
    redis = small_nodes
    settings = make_settings(own_server.url)
    await initialize(redis, settings)
    ids = await publish_many(redis, STREAM, sample_orders(1000))
    f_group, e_group = settings.groups
    await redis.xreadgroup(f_group, "f", {STREAM: ">"}, count=1000)
    await redis.xack(STREAM, f_group, *ids)
    # The email group read 300, acked 200: the 100 in between are pending.
    await redis.xreadgroup(e_group, "e", {STREAM: ">"}, count=300)
    await redis.xack(STREAM, e_group, *ids[:200])
    assert await safe_trim_point(redis, STREAM, settings.groups) == tuple(map(int, ids[200].split("-")))
    removed = await trim(redis, settings, NO_FEATURES)
    assert 0 < removed <= 200
    remaining: Any = await redis.xrange(STREAM)
    remaining_ids = [i.decode() for i, _ in remaining]
    assert remaining_ids[-800:] == ids[200:]  # everything from the oldest pending on is still there
    # The email group can still finish every order it has not acked.
    recorder = Recorder()
    async with running(redis, settings, (e_group, "e", recorder.handler("e"))):
        await wait_until(lambda: caught_up(redis, STREAM, [e_group]), "the lagging group to catch up")
    assert len(recorder.handled) == 800


async def test_the_stream_stays_bounded_when_groups_keep_up(
    small_nodes: Redis, own_server: LocalRedis
) -> None:
    redis = small_nodes
    settings = make_settings(own_server.url, MAINTENANCE_INTERVAL_MS="20")
    members = [(g, "c", Recorder().handler("c")) for g in settings.groups]
    lengths = []
    async with running(redis, settings, *members):
        await wait_until(lambda: redis.exists(STREAM), "the groups to be created")
        for _ in range(20):
            await publish_many(redis, STREAM, sample_orders(500))
            await wait_until(lambda: caught_up(redis, STREAM, settings.groups), "the groups to catch up")
            await wait_until(lambda: _fewer_entries(redis, 600), "a trim")
            lengths.append(await redis.xlen(STREAM))
    assert max(lengths) <= 600  # 10,000 published, the stream never held more than a round


async def _fewer_entries(redis: Redis, limit: int) -> bool:
    return int(await redis.xlen(STREAM)) <= limit


async def test_retention_keeps_the_newest_entries(small_nodes: Redis, own_server: LocalRedis) -> None:
    redis = small_nodes
    settings = make_settings(own_server.url, RETENTION_KEEP_ENTRIES="300")
    await initialize(redis, settings)
    ids = await publish_many(redis, STREAM, sample_orders(1000))
    for group in settings.groups:
        await redis.xreadgroup(group, "c", {STREAM: ">"}, count=1000)
        await redis.xack(STREAM, group, *ids)
    await trim(redis, settings, NO_FEATURES)
    length = await redis.xlen(STREAM)
    assert 300 <= length < 1000


async def test_stale_consumers_go_but_never_one_holding_entries(redis: Redis, settings: Settings) -> None:
    settings = dataclasses.replace(settings, stale_consumer_ms=1)
    await initialize(redis, settings)
    ids = await publish_many(redis, STREAM, sample_orders(2))
    group = settings.email_group
    await redis.xreadgroup(group, "gone", {STREAM: ">"}, count=1)
    await redis.xack(STREAM, group, ids[0])
    await redis.xreadgroup(group, "holder", {STREAM: ">"}, count=1)
    await wait_until(lambda: all_idle(redis, group, 5), "both consumers to be idle a little")
    removed = await remove_stale_consumers(redis, settings)
    assert removed == [f"{group}/gone"]
    names = [c["name"] for c in await redis.xinfo_consumers(STREAM, group)]
    assert names == [b"holder"]


async def all_idle(redis: Redis, group: str, ms: int) -> bool:
    return all(c["idle"] >= ms for c in await redis.xinfo_consumers(STREAM, group))


async def test_a_consumer_serves_prometheus_metrics(
    redis: Redis, redis_url: str, scripts: Callable[..., Script]
) -> None:
    port = free_port()
    consumer = scripts("consumer1", script_env(redis_url, CONSUMER_NAME="m1", METRICS_PORT=str(port)))
    await wait_until(lambda: redis.exists(STREAM), "the consumer to start")
    await publish_many(redis, STREAM, sample_orders(25))
    await redis.xadd(STREAM, {"data": b"[]"})

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    def samples() -> dict[tuple[str, str], float]:
        """(sample name, group label) -> value, from the real exposition format."""
        found = {}
        for family in text_string_to_metric_families(scrape()):
            for sample in family.samples:
                found[sample.name, sample.labels.get("group", "")] = sample.value
        return found

    group = "fulfillment_group"

    async def settled() -> bool:
        seen = await asyncio.to_thread(samples)
        return (
            seen.get(("orders_processed_total", group)) == 25
            and seen.get(("orders_dead_letter_length", "")) == 1
        )

    await wait_until(settled, "the metrics to show the work", timeout=15)
    seen = await asyncio.to_thread(samples)
    assert seen["orders_dead_lettered_total", group] == 1
    assert seen["orders_group_lag", group] == 0
    assert seen["orders_group_pending", group] == 0
    assert seen["orders_handler_seconds_count", group] == 25
    consumer.process.send_signal(signal.SIGTERM)
    assert consumer.wait() == 0


def test_metrics_port_in_use_is_one_clear_line(redis_url: str) -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_script("consumer1", script_env(redis_url, METRICS_PORT=str(port)))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("consumer1: error: cannot serve metrics on port")


async def test_maintenance_command(redis: Redis, redis_url: str, settings: Settings) -> None:
    await initialize(redis, settings)
    result = run_script("maintenance", script_env(redis_url))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("trimmed 0 entries")


async def test_status_names_a_missing_configured_group(redis: Redis, redis_url: str) -> None:
    for group in ("fulfillment_group", "email_group", "legacy"):
        await redis.xgroup_create(STREAM, group, id="0", mkstream=True)
    env = script_env(redis_url, NO_COLOR="1", CONSUMER_GROUPS="fulfillment_group,email_group,audit")
    result = run_script("status", env)
    assert result.returncode == 3, result.stderr
    rows = result.stdout.splitlines()
    assert any(row.split()[:2] == ["audit", "missing"] for row in rows)
    assert rows[-1] == "UNHEALTHY: audit: missing !"  # an unconfigured group is shown, not a problem
    report = json.loads(run_script("status", env, "--json").stdout)
    exists = {g["name"]: g["exists"] for g in report["groups"]}
    assert exists == {"fulfillment_group": True, "email_group": True, "legacy": True, "audit": False}
    assert report["problems"] == ["audit: missing"]
    healthy = run_script("status", script_env(redis_url, NO_COLOR="1"))
    assert healthy.returncode == 0
    assert healthy.stdout.rstrip().endswith("healthy")


META_OF_TEST: dict[str, str | int] = {
    "group": "email_group",
    "consumer": "e1",
    "source_id": "1-0",
    "deliveries": 5,
    "error": "boom",
}


def as_stored(record: dict[bytes, bytes | str | int]) -> dict[bytes, bytes]:
    """A record as Redis gives it back: every value bytes."""
    return {k: v if isinstance(v, bytes) else str(v).encode() for k, v in record.items()}


@pytest.mark.parametrize(
    "original",
    [
        {b"data": b"{}"},
        {
            b"data": b"{}",
            b"group": b"mine",
            b"error": b"its own",
            b"deliveries": b"x",
            b"dead_lettered_at": b"t",
        },
        {
            b"original.group": b"a",
            b"group": b"b",
            b"original.original.x": b"c",
            b"original.": b"d",
            b"": b"e",
        },
        {b"consumer": b"\xff\xfe", b"source_id": b"", b"redrive_for": b"fulfillment_group"},
    ],
)
def test_dead_letter_fields_keep_every_original_field(original: dict[bytes, bytes]) -> None:
    record = dead_letter_fields(original, META_OF_TEST)
    assert {k: record[k.encode()] for k in META_OF_TEST} == META_OF_TEST  # metadata under its own names
    stored = as_stored(record) | {
        b"dead_lettered_at": b"2026-11-29T10:00:00.000+00:00"
    }  # added by the writer
    assert original_fields(stored) == original
    assert list(original_fields(stored)) == list(original)  # in their order, too
    for name, value in original.items():
        if name in (b"group", b"dead_lettered_at") or name.startswith(b"original."):
            assert stored[b"original." + name] == value


def test_dead_letter_fields_refuses_unknown_metadata() -> None:
    with pytest.raises(ValueError, match="not dead-letter metadata"):
        dead_letter_fields({b"data": b"{}"}, {"data": "x"})


async def test_redrive_restores_exactly_the_original_fields(
    redis: Redis, redis_url: str, settings: Settings
) -> None:
    original = {b"data": b'{"order_id": "ord-1", "customer_email": "a@b.c"}', b"group": b"mine"}
    record = dead_letter_fields(original, META_OF_TEST) | {b"dead_lettered_at": "2026-11-29T10:00:00Z"}
    dead_id = await add(redis, settings.dead_letter_stream, record)
    env = script_env(redis_url)
    shown = json.loads(run_script("deadletter", env, "show", dead_id).stdout)
    assert (shown["group"], shown["original.group"]) == ("email_group", "mine")  # show: everything
    listed = json.loads(run_script("deadletter", env, "list", "--json").stdout)
    assert [(row["group"], row["order_id"]) for row in listed] == [("email_group", "ord-1")]
    result = run_script("deadletter", env, "redrive", dead_id)
    assert result.returncode == 0, result.stderr
    entries: Any = await redis.xrange(STREAM)
    assert [fields for _, fields in entries] == [
        {**original, b"redrive_for": b"email_group", b"redriven_from": dead_id.encode()}
    ]


async def add(redis: Redis, stream: str, record: dict[bytes, bytes | str | int]) -> str:
    fields: dict[FieldT, EncodableT] = dict(record.items())
    return text(await redis.xadd(stream, fields))


async def dead_letters(redis: Redis, settings: Settings, count: int) -> list[str]:
    ids = []
    for n in range(count):
        record = dead_letter_fields({b"data": b"{}"}, {**META_OF_TEST, "source_id": f"{n + 1}-0"})
        ids.append(await add(redis, settings.dead_letter_stream, record))
    return ids


async def test_deadletter_list_filters_and_limits(redis: Redis, redis_url: str, settings: Settings) -> None:
    env = script_env(redis_url)
    assert run_script("deadletter", env, "list", "--group", "nosuch").stdout.strip() == (
        f"{settings.dead_letter_stream} is empty"
    )
    ids = await dead_letters(redis, settings, 3)
    nosuch = run_script("deadletter", env, "list", "--group", "nosuch")
    assert nosuch.returncode == 0
    assert nosuch.stdout.strip() == "no dead letters of group nosuch (3 in the stream)"
    assert len(run_script("deadletter", env, "list").stdout.splitlines()) == 3  # default: all
    newest = run_script("deadletter", env, "list", "--limit", "1").stdout.splitlines()
    assert len(newest) == 1
    assert newest[0].startswith(ids[-1])
    zero = run_script("deadletter", env, "list", "--limit", "0")
    assert zero.returncode == 2
    assert zero.stderr.strip().splitlines()[-1].endswith("--limit must be 1 or more (leave it out for all)")


async def test_purge_of_many_needs_a_confirmation(redis: Redis, redis_url: str, settings: Settings) -> None:
    ids = await dead_letters(redis, settings, 3)
    env = script_env(redis_url)
    for which in (["--all"], ["--group", "email_group"]):
        refused = run_script("deadletter", env, "purge", *which)  # stdin is a pipe: nobody to ask
        assert refused.returncode == 2, which
        assert refused.stderr.count("\n") == 1
        assert "add --yes" in refused.stderr
    assert await redis.xlen(settings.dead_letter_stream) == 3
    declined = on_a_terminal(env, "n\n", "purge", "--all")
    assert declined.returncode == 1
    assert "purge 3 dead letters from orders:dead-letter for good? [y/N]" in declined.stderr
    assert await redis.xlen(settings.dead_letter_stream) == 3
    confirmed = on_a_terminal(env, "y\n", "purge", "--group", "email_group")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "purge: 3 of 3 entries" in confirmed.stdout
    assert await redis.xlen(settings.dead_letter_stream) == 0
    ids = await dead_letters(redis, settings, 2)
    assert run_script("deadletter", env, "purge", "--all", "--yes").returncode == 0
    assert await redis.xlen(settings.dead_letter_stream) == 0
    assert run_script("deadletter", env, "purge", ids[0]).returncode == 0  # ids: no question


def on_a_terminal(env: dict[str, str], answer: str, *args: str) -> Any:
    """Run deadletter with a pseudo-terminal as stdin, typing `answer`."""
    main, other = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "deadletter", *args],
            cwd=ROOT,
            env=env,
            stdin=other,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(main, answer.encode())
        stdout, stderr = process.communicate(timeout=30)
    finally:
        os.close(main)
        os.close(other)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_every_deadletter_subcommand_shows_its_defaults(redis_url: str) -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings or action.nargs == "*":
                assert "(default: " in action.help, (name, action.dest)
        positionals = [a.metavar for a in sub._actions if not a.option_strings]
        assert positionals in ([], ["ADDRESS"]), name
    for name in commands.choices:
        shown = run_script("deadletter", script_env(redis_url), name, "--help")
        assert shown.returncode == 0
        assert name == "show" or "(default: " in shown.stdout
