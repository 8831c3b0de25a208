"""The demo and the scripts' ends, with real processes: own keys, throwaway server, signals, closed pipes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, Script, need_redis_server, run_script, script_env
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

Start = Callable[..., Script]
STREAM = "orders"
DEAD_LETTERS = "orders:dead-letter"


def no_traceback(*outputs: str) -> None:
    for output in outputs:
        assert "Traceback" not in output
        assert "Exception ignored" not in output


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
    result = run_script("chaos", {**os.environ, "TMPDIR": str(tmp)}, *args, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost=0" in result.stdout
    assert list(tmp.iterdir()) == []  # neither chaos-* (its logs) nor orders-redis-* (its server)

