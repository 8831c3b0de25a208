"""Behaviour about processes, with real processes: signals, kill -9, Redis restarts, exit codes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Script, run_script, script_env, wait_until
from redis.asyncio import Redis
from test_promises import ran

from core.capabilities import detect
from orders import serialize
from producer import publish_many, sample_orders
from status import caught_up
from tools.local_redis import LocalRedis, free_port

Start = Callable[..., Script]
STREAM = "orders"


async def blocked_reader(redis: Redis, name: str) -> bool:
    """True when the consumer named `name` sits in a blocking XREADGROUP."""
    clients = await redis.client_list()
    return any(c["cmd"] == "xreadgroup" and "b" in c["flags"] and c["name"] == name for c in clients)


async def pending(redis: Redis, group: str, consumer: str | None = None) -> int:
    if consumer is None:
        summary = await redis.xpending(STREAM, group)
        return int(summary["pending"])
    rows = await redis.xpending_range(STREAM, group, "-", "+", 1000, consumername=consumer)
    return len(rows)


def no_traceback(*outputs: str) -> None:
    for output in outputs:
        assert "Traceback" not in output


async def test_sigterm_finishes_the_batch_and_exits_0_with_nothing_pending(
    redis: Redis, redis_url: str, scripts: Start
) -> None:
    consumer = scripts("consumer1", script_env(redis_url, CONSUMER_NAME="c1", BATCH_SIZE="50"))
    await wait_until(lambda: blocked_reader(redis, "c1"), "the consumer to block on XREADGROUP")
    await publish_many(redis, STREAM, sample_orders(3000))
    await wait_until(lambda: "fulfilling order" in consumer.output(), "the first order to be handled")
    consumer.process.send_signal(signal.SIGTERM)
    assert consumer.wait(15) == 0
    assert await pending(redis, "fulfillment_group") == 0
    output = consumer.output()
    assert "SIGTERM: finishing the batches in hand" in output
    assert "stopped: processed=" in output
    no_traceback(output)


async def test_sigterm_also_finishes_the_batch_read_ahead(
    redis: Redis, redis_url: str, scripts: Start
) -> None:
    """SIGTERM while a batch runs and the next one is already read: both are finished and acked.

    Batches of 5 orders of 60 ms each, 40 orders waiting. From the third batch on, each batch
    runs while Redis serves the read of the next, so when the signal comes during the third,
    the fourth is in hand too: it must run and be acked, not be left pending. (Redis 8.4+:
    a consumer does not read ahead, so it finishes the third and stops.)
    """
    env = script_env(redis_url, CONSUMER_NAME="c1", BATCH_SIZE="5", HANDLER_MS="60")
    consumer = scripts("tests.slow_service", env)
    await wait_until(lambda: blocked_reader(redis, "c1"), "the consumer to block on XREADGROUP")
    orders = sample_orders(40)
    await publish_many(redis, STREAM, orders)
    await wait_until(
        lambda: f"ran order {orders[10].order_id}" in consumer.output(), "the third batch to run"
    )
    consumer.process.send_signal(signal.SIGTERM)
    assert consumer.wait(15) == 0
    assert await pending(redis, "fulfillment_group") == 0
    output = consumer.output()
    runs = ran([output])
    assert set(runs.values()) == {1}  # none twice
    assert sorted(runs, key=[o.order_id for o in orders].index) == [o.order_id for o in orders[: len(runs)]]
    # Whole batches: the one running at the signal and the one read ahead, then nothing more.
    assert len(runs) % 5 == 0
    assert (15 if (await detect(redis)).readgroup_claim else 20) <= len(runs) < 40
    no_traceback(output)


async def test_a_second_signal_exits_at_once(redis: Redis, redis_url: str, scripts: Start) -> None:
    env = script_env(redis_url, CONSUMER_NAME="c1", BLOCK_MS="4000")
    consumer = scripts("consumer2", env)
    await wait_until(lambda: blocked_reader(redis, "c1"), "the consumer to block on XREADGROUP")
    consumer.process.send_signal(signal.SIGINT)
    await wait_until(lambda: "SIGINT: finishing" in consumer.output(), "the first signal to be seen")
    started = time.monotonic()
    consumer.process.send_signal(signal.SIGINT)
    assert consumer.wait(5) == 128 + signal.SIGINT
    assert time.monotonic() - started < 2.0  # well before the 4 s blocking read ends
    no_traceback(consumer.output())


@pytest.mark.parametrize("restart_as", ["same name", "new name"])
async def test_work_held_by_a_killed_consumer_is_finished(
    redis: Redis, redis_url: str, scripts: Start, restart_as: str
) -> None:
    env = script_env(
        redis_url, CLAIM_IDLE_MS="300"
    )  # also the victim's lease: it lapses 300 ms after the kill
    victim = scripts("consumer1", {**env, "CONSUMER_NAME": "victim", "BLOCK_MS": "4000"})
    await wait_until(lambda: blocked_reader(redis, "victim"), "the victim to block on XREADGROUP")
    # Stopped while blocked: Redis still delivers to it, so the orders sit in its pending list.
    victim.process.send_signal(signal.SIGSTOP)
    orders = sample_orders(6)
    async with redis.pipeline(transaction=True) as multi:  # one MULTI: the blocked read gets all six
        for order in orders:
            multi.xadd(STREAM, {"data": serialize(order)})
        await multi.execute()
    await wait_until(lambda: pending(redis, "fulfillment_group", "victim"), "delivery to the victim")
    victim.process.kill()
    victim.wait()
    assert await pending(redis, "fulfillment_group", "victim") == len(orders)

    name = "victim" if restart_as == "same name" else "rescuer"
    rescuer = scripts("consumer1", {**env, "CONSUMER_NAME": name})
    await wait_until(lambda: caught_up(redis, STREAM, ["fulfillment_group"]), "the orders to be finished")
    output = rescuer.output()
    assert all(f"fulfilling order {o.order_id}:" in output for o in orders)
    if restart_as == "new name":
        assert "claimed 6 entries" in output


async def test_consumers_ride_out_a_redis_crash_and_restart(own_server: LocalRedis, scripts: Start) -> None:
    env = script_env(own_server.url)
    consumers = [
        scripts("consumer1", {**env, "CONSUMER_NAME": "f1"}),
        scripts("consumer2", {**env, "CONSUMER_NAME": "e1"}),
    ]
    client = Redis.from_url(own_server.url)
    try:
        before, after = sample_orders(20), sample_orders(20)
        await wait_until(lambda: blocked_reader(client, "f1"), "consumer1 to start")
        await wait_until(lambda: blocked_reader(client, "e1"), "consumer2 to start")
        await publish_many(client, STREAM, before)
        own_server.kill()  # SIGKILL; AOF with appendfsync always keeps every acknowledged write
        own_server.start()
        await client.connection_pool.disconnect()
        await publish_many(client, STREAM, after)
        await wait_until(
            lambda: caught_up(client, STREAM, ["fulfillment_group"]), "consumer1 to catch up", 30
        )
        await wait_until(lambda: caught_up(client, STREAM, ["email_group"]), "consumer2 to catch up", 30)
    finally:
        await client.aclose()
    for consumer in consumers:
        assert consumer.process.poll() is None, "a consumer died with Redis"
        output = consumer.output()
        assert all(o.order_id in output for o in before + after)
        assert output.count("Redis unreachable") <= 1  # warned once per outage, not per retry
        no_traceback(output)


async def test_unreachable_redis_ends_scripts_with_one_line_and_exit_1(scripts: Start) -> None:
    env = script_env(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    runs = [scripts(module, env) for module in ("producer", "consumer1", "initialization_stream")]
    for run in runs:
        assert run.wait(20) == 1
    assert time.monotonic() - started < 16
    for run, module in zip(runs, ("producer", "consumer1", "initialization_stream"), strict=True):
        output = run.output()
        assert output.strip().splitlines()[-1].startswith(f"{module}: error: cannot reach Redis at")
        assert "hunter2" not in output
        no_traceback(output)


async def test_wrong_password_is_a_clear_error(tmp_path: Path) -> None:
    server = LocalRedis(free_port(), tmp_path, ["--requirepass", "right-pw"])
    server.start()
    try:
        url = f"redis://:wrong-pw@127.0.0.1:{server.port}/0"
        result = run_script("producer", script_env(url))
    finally:
        server.stop()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("producer: error: Redis at")
    assert "refused" in result.stderr
    assert "wrong-pw" not in result.stderr
    no_traceback(result.stderr)


async def test_producer_input_errors_publish_nothing(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    env = script_env(redis_url)
    orders = tmp_path / "orders.jsonl"
    orders.write_text(
        '{"order_id": "a-1", "customer_email": "a@example.com"}\n'
        '{"order_id": "a-2", "customer_email": "a@example.com"}\n'
        '{"order_id": "a-3", "customer_email": "not-an-address"}\n'
    )
    cases = [
        (["--file", str(orders)], "line 3: customer_email does not look like an e-mail address"),
        (["--count", "-1"], "--count must be 0 or more"),
        (["--count", "many"], "invalid int value"),
        (["--count", "1", "--file", str(orders)], "not allowed with argument"),
        (["--file", str(tmp_path / "missing.jsonl")], "No such file or directory"),
    ]
    for args, message in cases:
        result = run_script("producer", env, *args)
        assert result.returncode == 2, args
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2  # argparse adds its usage line
    assert await redis.exists(STREAM) == 0


async def test_producer_publishes_files_stdin_and_samples(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    env = script_env(redis_url)
    orders = tmp_path / "orders.jsonl"
    orders.write_text('{"order_id": "f-1", "customer_email": "f@example.com"}\n\n')
    assert run_script("producer", env, "--file", str(orders)).returncode == 0
    stdin = '{"order_id": "s-1", "customer_email": "s@example.com", "total": 3}\n'
    assert run_script("producer", env, "--file", "-", stdin=stdin).returncode == 0
    assert run_script("producer", env, "--count", "4").returncode == 0
    assert run_script("producer", env).returncode == 0  # default: 10 samples
    entries: Any = await redis.xrange(STREAM)
    assert len(entries) == 1 + 1 + 4 + 10
    assert b'"order_id":"f-1"' in entries[0][1][b"data"]


def test_every_script_has_help() -> None:
    for module in ("producer", "consumer1", "consumer2", "initialization_stream", "tools.demo"):
        result = run_script(module, dict(os.environ), "--help")
        assert result.returncode == 0, module
        assert "usage: python3 -m " + module in result.stdout  # as the README spells it


async def test_a_signal_during_an_outage_stops_without_saying_redis_is_back(
    own_server: LocalRedis, scripts: Start
) -> None:
    """SIGINT while Redis is down: the consumer exits 0 and never claims Redis came back."""
    env = script_env(own_server.url, CONSUMER_NAME="e1")
    client = Redis.from_url(own_server.url)
    try:
        consumer = scripts("consumer2", env)
        await wait_until(lambda: blocked_reader(client, "e1"), "the consumer to start")
    finally:
        await client.aclose()
    own_server.kill()
    await wait_until(lambda: "Redis unreachable" in consumer.output(), "the consumer to see the outage")
    consumer.process.send_signal(signal.SIGINT)
    assert consumer.wait(20) == 0
    output = consumer.output()
    assert "Redis is back" not in output
    assert "stopped" in output.splitlines()[-1]
    no_traceback(output)


async def test_a_signal_while_redis_cannot_be_reached_at_start_exits_at_once(scripts: Start) -> None:
    """Ctrl-C before Redis ever answered: no wait for REDIS_CONNECT_TIMEOUT_MS."""
    env = script_env(f"redis://127.0.0.1:{free_port()}/0", REDIS_CONNECT_TIMEOUT_MS="30000")
    consumer = scripts("consumer2", env)
    await wait_until(lambda: "consumer2" in " ".join(_cmdline(consumer.process.pid)), "the consumer to run")
    await wait_until(lambda: _has_lease_or_loop(consumer), "the consumer to try to connect", 10)
    started = time.monotonic()
    consumer.process.send_signal(signal.SIGINT)
    assert consumer.wait(20) == 0
    assert time.monotonic() - started < 3
    assert "nothing was consumed" in consumer.output()
    no_traceback(consumer.output())


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _has_lease_or_loop(script: Script) -> bool:
    """The consumer's event loop runs (its signal handlers are set from there on)."""
    status = Path(f"/proc/{script.process.pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGINT - 1)) and caught & (1 << (signal.SIGTERM - 1)))
