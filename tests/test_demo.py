"""The demo and the scripts' ends, with real processes: own keys, throwaway server, signals, closed pipes."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Script, need_redis_server, run_script, script_env, wait_until
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

import producer
from config import Settings
from orders import Order
from producer import publish_many, sample_orders
from tools import demo
from tools.local_redis import free_port

Start = Callable[..., Script]
STREAM = "orders"
DEAD_LETTERS = "orders:dead-letter"


def no_traceback(*outputs: str) -> None:
    for output in outputs:
        assert "Traceback" not in output
        assert "Exception ignored" not in output


class Sandbox:
    """A TMPDIR for a demo whose REDIS_URL is a closed port: its throwaway server lives in there.

    The server is found as a redis-server process whose working directory (its --dir) is inside,
    whatever the demo prints.
    """

    def __init__(self, tmp_path: Path) -> None:
        if not Path("/proc/self/cwd").exists():
            pytest.skip("needs /proc to find the demo's redis-server")
        need_redis_server()
        self.path = tmp_path / "tmp"
        self.path.mkdir()
        self.env = {**script_env(f"redis://127.0.0.1:{free_port()}/0"), "TMPDIR": str(self.path)}

    def servers(self) -> list[int]:
        """Pids of the redis-servers running in a directory under the sandbox (zombies have none)."""
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(self.path):
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile, or not ours to see
                continue
        return found

    async def assert_clean(self) -> None:
        """No server runs on and no temporary directory is left; clean up after a demo that leaked."""
        try:
            await wait_until(lambda: not self.servers(), "the demo's redis-server to end", 5)
            assert list(self.path.iterdir()) == [], "the demo left a temporary directory behind"
        finally:
            for pid in self.servers():
                os.kill(pid, signal.SIGKILL)


def into_head(module: str, env: dict[str, str], lines: int, *args: str) -> tuple[int, str, str]:
    """`python -m module args | head -n lines` in bash: the script's exit code, head's output, its stderr."""
    command = '"$0" -m "$@" | head -n "$HEAD_LINES"; exit "${PIPESTATUS[0]}"'
    result = subprocess.run(
        ["bash", "-c", command, sys.executable, module, *args],
        cwd=ROOT,
        env={**env, "HEAD_LINES": str(lines)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


async def snapshot(redis: Redis) -> dict[bytes, bytes | None]:
    """Every key with its DUMP: a stream's entries, groups, consumers and pending entries included."""
    return {key: await redis.dump(key) async for key in redis.scan_iter(count=1000)}


async def test_demo_shows_fan_out_and_load_balancing(redis: Redis, redis_url: str) -> None:
    result = run_script("tools.demo", script_env(redis_url), "--count", "6")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    [fulfillment] = [line for line in lines if line.startswith("fulfillment_group: ")]
    [email] = [line for line in lines if line.startswith("email_group: ")]
    assert fulfillment.startswith("fulfillment_group: 6/6 orders (fulfillment-1 ")
    assert "fulfillment-2 " in fulfillment
    assert fulfillment.endswith("handled twice: 0")
    assert email == "email_group: 6/6 orders (email-1 6); handled twice: 0"
    # The table alternates only because orders went out one at a time: the output says so.
    assert "whole batches go to one consumer" in result.stdout
    assert "WARNING" not in result.stderr
    assert await redis.dbsize() == 0  # every key the demo made is gone


async def test_demo_starts_its_own_redis_quietly_and_removes_it(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path)
    result = run_script("tools.demo", sandbox.env, "--count", "2")
    assert result.returncode == 0, result.stderr
    assert "email_group: 2/2 orders" in result.stdout
    # The probe of REDIS_URL finding nothing is how the demo decides, not a warning.
    assert "WARNING" not in result.stderr
    assert "not reachable yet" not in result.stderr
    assert "started a throwaway redis-server" in result.stdout
    await sandbox.assert_clean()


async def test_demo_leaves_a_real_pipeline_exactly_as_it_was(redis: Redis, redis_url: str) -> None:
    await redis.xgroup_create(STREAM, "fulfillment_group", id="0", mkstream=True)
    await redis.xgroup_create(STREAM, "email_group", id="0")
    await publish_many(redis, STREAM, sample_orders(5))
    # A real consumer holds entries pending in each group; another is registered and idle.
    await redis.xreadgroup("fulfillment_group", "real-fulfillment", {STREAM: ">"}, count=3)
    await redis.xreadgroup("email_group", "real-email", {STREAM: ">"}, count=1)
    await redis.xgroup_createconsumer(STREAM, "email_group", "idle-email")
    await redis.xadd(DEAD_LETTERS, {"data": "{}", "group": "email_group", "error": "invalid order"})
    await redis.set("{orders}:lease:fulfillment_group:real-fulfillment", "alive")
    pending_before = [await redis.xpending(STREAM, g) for g in ("fulfillment_group", "email_group")]
    before = await snapshot(redis)

    result = run_script("tools.demo", script_env(redis_url), "--count", "4")
    assert result.returncode == 0, result.stderr
    assert "email_group: 4/4 orders (email-1 4)" in result.stdout

    consumers: Any = await redis.xinfo_consumers(STREAM, "fulfillment_group")
    assert [c["name"] for c in consumers] == [b"real-fulfillment"]
    consumers = await redis.xinfo_consumers(STREAM, "email_group")
    assert sorted(c["name"] for c in consumers) == [b"idle-email", b"real-email"]
    assert [await redis.xpending(STREAM, g) for g in ("fulfillment_group", "email_group")] == pending_before
    after = await snapshot(redis)
    assert sorted(after) == sorted(before), "the demo left keys behind or removed some"
    assert after == before, "the demo changed the real stream, its groups or other keys"


async def test_demo_deletes_its_keys_when_it_fails(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = 0

    async def breaks_after_three(redis: Redis, stream: str, order: Order, partitions: int = 1) -> str:
        nonlocal published
        if published == 3:
            raise RuntimeError("the publisher broke")
        published += 1
        return await producer.publish(redis, stream, order, partitions=partitions)

    monkeypatch.setattr(demo, "publish", breaks_after_three)
    with pytest.raises(RuntimeError, match="the publisher broke"):
        await demo.main(settings, argparse.Namespace(count=6, verbose=False, cluster=False))
    assert published == 3
    assert await redis.keys() == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
async def test_a_signal_stops_the_demo_with_its_server_and_directory(
    tmp_path: Path, scripts: Start, signum: int
) -> None:
    sandbox = Sandbox(tmp_path)
    # About 100 s of orders, so the signal comes while they flow; --verbose shows them handled.
    demo = scripts("tools.demo", sandbox.env, "--count", "10000", "--verbose")
    try:
        await wait_until(lambda: "fulfilling order" in demo.output(), "orders to flow", 20)
        assert sandbox.servers(), "the demo's redis-server was not found"
        demo.process.send_signal(signum)
        assert demo.wait(20) == 128 + signum, demo.output()[-2000:]
    finally:
        await sandbox.assert_clean()
    no_traceback(demo.output())


async def test_demo_piped_into_head_removes_its_server_and_directory(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path)
    # Unbuffered (script_env), so `head` has its line and is gone while the demo still runs.
    try:
        code, first_line, stderr = into_head("tools.demo", sandbox.env, 1, "--count", "20")
    finally:
        await sandbox.assert_clean()
    assert "started a throwaway redis-server" in first_line
    assert code == 141, stderr  # 128 + SIGPIPE, as a shell reports a tool a closed pipe stopped
    no_traceback(stderr)


async def test_status_json_into_head_ends_quietly(redis: Redis, redis_url: str) -> None:
    await redis.xgroup_create(STREAM, "fulfillment_group", id="0", mkstream=True)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(3000):  # a consumer list far larger than a pipe holds (64 KiB)
            pipe.xgroup_createconsumer(STREAM, "fulfillment_group", f"consumer-{n}")
        await pipe.execute()
    code, head, stderr = into_head("status", script_env(redis_url), 3, "--json")
    assert code == 141, stderr
    assert len(head.splitlines()) == 3
    no_traceback(stderr)


async def test_deadletter_list_into_head_ends_quietly(redis: Redis, redis_url: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(3000):  # about 400 KB of lines, far more than a pipe holds
            fields: dict[FieldT, EncodableT] = {"data": "{}", "group": "email_group", "consumer": "c"}
            fields.update(source_id=f"{n + 1}-0", deliveries=1, error="invalid order: not an object")
            pipe.xadd(DEAD_LETTERS, fields)
        await pipe.execute()
    code, head, stderr = into_head("deadletter", script_env(redis_url), 1, "list")
    assert code == 141, stderr
    assert len(head.splitlines()) == 1
    no_traceback(stderr)


def test_chaos_removes_its_temporary_directories(tmp_path: Path) -> None:
    need_redis_server()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = ["--orders", "20", "--consumer-kills", "0", "--redis-restarts", "0", "--partitions", "0"]
    args += ["--consumers-per-group", "1", "--seconds", "0.5", "--settle-timeout", "60"]
    result = run_script("tools.chaos", {**os.environ, "TMPDIR": str(tmp)}, *args, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost=0" in result.stdout
    assert list(tmp.iterdir()) == []  # neither chaos-* (its logs) nor orders-redis-* (its server)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_a_signal_stops_the_chaos_soak_with_its_server_and_directories(
    tmp_path: Path, scripts: Start, signum: int
) -> None:
    sandbox = Sandbox(tmp_path)
    args = ["--orders", "100000", "--seconds", "30", "--consumer-kills", "0", "--redis-restarts", "0"]
    soak = scripts("tools.chaos", sandbox.env, *args, "--partitions", "0", "--consumers-per-group", "1")
    try:
        await wait_until(lambda: any(p.name.startswith("chaos-") for p in sandbox.path.iterdir()), "its logs")
        await wait_until(sandbox.servers, "its redis-server", 20)
        soak.process.send_signal(signum)
        assert soak.wait(60) == 128 + signum, soak.output()[-2000:]
    finally:
        await sandbox.assert_clean()
    no_traceback(soak.output())
