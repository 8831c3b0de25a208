"""Run inside a fresh network namespace (`unshare -n`): partition a consumer from Redis, then heal.

Redis listens on 127.0.0.1 (the producer's side) and 127.0.0.2 (the consumer's side);
iptables drops the consumer's side for a while. Prints one JSON line of figures.
Used by tests/test_faults.py; nothing here touches the host's network.
"""

# A scenario script, run alone in its own namespace: blocking calls in it stall nothing else.
# ruff: noqa: ASYNC220, ASYNC221, ASYNC240

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from producer import publish_many, sample_orders  # noqa: E402
from tools.local_redis import start_local_redis  # noqa: E402

PARTITION_S = 4.0
RULES = [
    ["INPUT", "-d", "127.0.0.2", "-p", "tcp", "-j", "DROP"],
    ["OUTPUT", "-s", "127.0.0.2", "-p", "tcp", "-j", "DROP"],
]


def iptables(action: str) -> None:
    for rule in RULES:
        subprocess.run(["iptables", action, *rule], check=True, timeout=10)


async def wait_for(check: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check() if callable(check) else check
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(0.05)
    return False


async def scenario(log_path: Path) -> dict[str, object]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    server = start_local_redis("--bind", "127.0.0.1 127.0.0.2")
    port = server.port
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.2:{port}/0",
        "CONSUMER_NAME": "partitioned",
        "BLOCK_MS": "200",
        "SOCKET_TIMEOUT_MS": "1000",
        "CLAIM_IDLE_MS": "1000",
        "PYTHONUNBUFFERED": "1",
    }
    log = log_path.open("wb")
    consumer = subprocess.Popen(
        [sys.executable, "-m", "consumer1"], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    orders = sample_orders(100)

    async def handled(count: int) -> bool:
        return len(set(re.findall(rb"fulfilling order (\S+):", log_path.read_bytes()))) >= count

    try:
        await wait_for(lambda: redis.exists("orders"), 15)
        await publish_many(redis, "orders", orders[:50])
        first = await wait_for(lambda: handled(50), 15)
        iptables("-A")
        cut = time.monotonic()
        await publish_many(redis, "orders", orders[50:])  # Redis takes them; the consumer cannot reach it
        noticed = await wait_for(lambda: b"Redis unreachable" in log_path.read_bytes(), 20)
        await wait_for(lambda: time.monotonic() - cut > PARTITION_S, PARTITION_S + 1)  # the fault's length
        iptables("-D")
        healed = await wait_for(lambda: handled(100), 60)
        alive = consumer.poll() is None
    finally:
        consumer.terminate()
        consumer.wait(20)
        log.close()
        await redis.aclose()
        server.close()
    output = log_path.read_bytes()
    ran = re.findall(rb"fulfilling order (\S+):", output)
    return {
        "first_half_handled": first,
        "partition_noticed": noticed,
        "all_handled_after_heal": healed,
        "consumer_alive": alive,
        "handled": len(set(ran)),
        "handler_runs": len(ran),
        "warnings": output.count(b"Redis unreachable"),
        "tracebacks": output.count(b"Traceback"),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(scenario(Path(sys.argv[1])))))
