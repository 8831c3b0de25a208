"""Fixtures: a throwaway redis-server for the session (or TEST_REDIS_URL), a clean database per test."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from config import Settings
from tools.local_redis import LocalCluster, LocalRedis, server_binary, start_local_cluster, start_local_redis

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Fast settings for tests: short blocking reads, quick retries; claims only where a test asks.
TEST_ENV = {
    "BLOCK_MS": "200",
    "SOCKET_TIMEOUT_MS": "5000",
    "CLAIM_IDLE_MS": "60000",
    "RETRY_DELAY_MS": "20",
    "MAX_DELIVERIES": "3",
    "BATCH_SIZE": "10",
    "LOG_LEVEL": "INFO",
}


def unavailable(message: str) -> NoReturn:
    """Skip a test that lacks a tool, or, under CI=true, fail it: CI must run every test."""
    if IN_CI:
        pytest.fail(message + "; CI must run every test")
    pytest.skip(message)


def need_redis_server() -> None:
    """Skip (or, under CI=true, fail) when there is no redis-server binary to start."""
    if server_binary() is None:
        unavailable(
            "redis-server is not installed (apt-get install redis-server), or REDIS_SERVER names none"
        )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """TEST_REDIS_URL (never database 0), else a redis-server of our own on a free loopback port."""
    given = os.environ.get("TEST_REDIS_URL")
    if given:
        if urlsplit(given).path.strip("/") in ("", "0"):
            pytest.exit("TEST_REDIS_URL must name a database other than 0: the tests flush it", 2)
        yield given
        return
    need_redis_server()
    server = start_local_redis()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def own_server() -> Iterator[LocalRedis]:
    """A redis-server for this test alone, with AOF, for tests that stop, kill or restart it."""
    need_redis_server()
    server = start_local_redis("--appendonly", "yes", "--appendfsync", "always")
    try:
        yield server
    finally:
        server.close()


def make_settings(url: str, **overrides: str) -> Settings:
    return Settings.from_env({"REDIS_URL": url, **TEST_ENV, **overrides})


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return make_settings(redis_url)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


async def wait_until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll `check` (Redis state, a process; may be async) until truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def script_env(url: str, **overrides: str) -> dict[str, str]:
    """The environment for a script run as a real process against `url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CONSUMER_"))}
    return {**env, "REDIS_URL": url, **TEST_ENV, "PYTHONUNBUFFERED": "1", **overrides}


class Script:
    """A project script running as a real process, its output collected in a file."""

    def __init__(self, module: str, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self.handle = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.handle.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


@pytest.fixture
def scripts(tmp_path: Path) -> Iterator[Callable[..., Script]]:
    """Start scripts with `scripts(module, env, *args)`; every one still running is killed at the end."""
    started: list[Script] = []

    def start(module: str, env: dict[str, str], *args: str) -> Script:
        script = Script(module, env, tmp_path / f"{module}-{len(started)}.log", *args)
        started.append(script)
        return script

    yield start
    for script in started:
        script.kill()


def run_script(module: str, env: dict[str, str], *args: str, stdin: str = "", timeout: float = 30) -> Any:
    """Run a script to completion; return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def need_cluster_tools() -> None:
    """Skip (or, under CI=true, fail) without redis-server and redis-cli to build a local cluster."""
    need_redis_server()
    if shutil.which("redis-cli") is None:
        unavailable("redis-cli is not installed (apt-get install redis-tools)")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A local Redis Cluster of 3 masters for the session; tests flush it (cluster_url)."""
    need_cluster_tools()
    local = start_local_cluster(masters=3)
    try:
        yield local
    finally:
        local.close()


@pytest.fixture
def cluster_url(cluster: LocalCluster) -> str:
    """The session's cluster, every master flushed (the function library stays)."""
    for port in cluster.ports:
        subprocess.run(
            ["redis-cli", "-p", str(port), "flushall"], capture_output=True, check=False, timeout=10
        )
    return cluster.url


@pytest.fixture
def cluster_with_replicas() -> Iterator[LocalCluster]:
    """A cluster of 3 masters with a replica each, for this test alone (it kills a master)."""
    need_cluster_tools()
    local = start_local_cluster(masters=3, replicas=1)
    try:
        yield local
    finally:
        local.close()
