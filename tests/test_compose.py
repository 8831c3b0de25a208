"""docker-compose.yaml cannot run here (no Docker engine), so check what it promises by parsing it."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT, need_cluster_tools

from tools.local_redis import free_cluster_port, server_binary


def redis_service() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    service: dict[str, Any] = compose["services"]["redis"]
    assert "redis-data" in compose["volumes"]
    return service


def test_redis_is_7_4_or_newer() -> None:
    match = re.fullmatch(r"redis:(\d+)\.(\d+)[\w.-]*", redis_service()["image"])
    assert match is not None
    assert (int(match[1]), int(match[2])) >= (7, 4)


def test_persistence_and_no_eviction() -> None:
    command = redis_service()["command"]
    options = dict(zip(command[0::2], command[1::2], strict=True))
    assert options == {"--appendonly": "yes", "--appendfsync": "everysec", "--maxmemory-policy": "noeviction"}


def test_published_on_loopback_only_with_a_named_volume_and_healthcheck() -> None:
    service = redis_service()
    assert service["ports"] == ["127.0.0.1:6379:6379"]
    assert "redis-data:/data" in service["volumes"]
    check = service["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL"
    assert "redis-cli --user admin ping" in check[1]


def test_acl_users_come_from_the_template_with_passwords_from_the_environment() -> None:
    service = redis_service()
    assert service["entrypoint"] == ["/bin/sh", "/etc/redis-acl/start.sh"]
    assert "./redis:/etc/redis-acl:ro" in service["volumes"]
    for name in ("REDIS_ADMIN_PASSWORD", "PRODUCER_PASSWORD", "CONSUMER_PASSWORD"):
        assert service["environment"][name].startswith(f"${{{name}:?")  # required, never a default
    template = (ROOT / "redis" / "users.acl.template").read_text()
    assert "user default off" in template
    assert re.search(
        r"^user producer on #@PRODUCER_PASSWORD@ .*-@all .*\(~orders ~{orders:\*} \+xadd\)", template, re.M
    )


def cluster_profile() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    services = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())["services"]
    nodes = [service for name, service in services.items() if name.startswith("redis-node-")]
    return nodes, services["cluster-init"]


def test_the_cluster_profile_has_3_masters_and_3_replicas_and_leaves_the_default_alone() -> None:
    nodes, init = cluster_profile()
    assert "profiles" not in redis_service()  # `docker compose up` still starts the one Redis
    assert len(nodes) == 6
    ports = [node["command"][node["command"].index("--port") + 1] for node in nodes]
    assert ports == [str(7001 + i) for i in range(6)]
    for node in nodes:
        options = node["command"]
        assert node["profiles"] == ["cluster"]
        assert options[options.index("--cluster-enabled") + 1] == "yes"
        assert options[options.index("--bind") + 1] == "127.0.0.1"
        assert options[options.index("--maxmemory-policy") + 1] == "noeviction"
        assert node["entrypoint"] == ["/bin/sh", "/etc/redis-acl/start.sh"]
        assert node["environment"]["REDIS_ADMIN_PASSWORD"].startswith("${REDIS_ADMIN_PASSWORD:?")
    assert init["profiles"] == ["cluster"]
    assert set(init["depends_on"]) == {f"redis-node-{i}" for i in range(1, 7)}
    script = init["command"][0]
    assert "--cluster-replicas 1" in script
    assert re.findall(r"127\.0\.0\.1:(\d+)", script) == ports


def test_the_cluster_profile_forms_a_cluster_whose_replicas_sync_as_admin(tmp_path: Path) -> None:
    """Run each node's command through redis/start.sh, as its container would (docker-entrypoint.sh
    replaced by a shim that runs its arguments), on free ports; then cluster-init's command."""
    need_cluster_tools()
    nodes, init = cluster_profile()
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "docker-entrypoint.sh").write_text(f'#!/bin/sh\nshift\nexec {server_binary()} "$@"\n')
    (shim / "docker-entrypoint.sh").chmod(0o755)
    passwords = {"REDIS_ADMIN_PASSWORD": "adm1n-pw", "PRODUCER_PASSWORD": "p", "CONSUMER_PASSWORD": "c"}
    ports = {str(7001 + i): str(free_cluster_port()) for i in range(6)}
    processes = []
    try:
        for index, node in enumerate(nodes):
            data = tmp_path / f"node-{index}"
            data.mkdir()
            command = [ports.get(part, part) for part in node["command"]]
            env = {
                **os.environ,
                **passwords,
                "PATH": f"{shim}:{os.environ['PATH']}",
                "CLUSTER_NODE": "1",
                "ACL_FILE": str(data / "users.acl"),
                "REPLICATION_CONF": str(data / "replication.conf"),
            }
            processes.append(
                subprocess.Popen(
                    ["sh", str(ROOT / "redis" / "start.sh"), *command, "--logfile", "redis.log"],
                    cwd=data,
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
            )
            assert "adm1n-pw" not in " ".join(command)
        admin = {**os.environ, "REDISCLI_AUTH": passwords["REDIS_ADMIN_PASSWORD"]}
        script = re.sub(r"\b700[1-6]\b", lambda match: ports[match[0]], init["command"][0])
        deadline = time.monotonic() + 20
        while not all(_answers(port, admin) for port in ports.values()):
            assert time.monotonic() < deadline, "the nodes did not start"
            time.sleep(0.05)
        subprocess.run(["sh", "-c", script], env=admin, check=True, capture_output=True, timeout=60)
        first = next(iter(ports.values()))
        deadline = time.monotonic() + 30
        while _online_replicas(ports.values(), admin) < 3:  # synced from their masters, as admin
            assert time.monotonic() < deadline, "the replicas did not sync"
            time.sleep(0.1)
        info = subprocess.run(
            ["redis-cli", "--user", "admin", "-p", first, "cluster", "info"],
            env=admin, capture_output=True, text=True, check=True, timeout=10,
        )  # fmt: skip
        assert "cluster_state:ok" in info.stdout
        # cluster-init again (a restart of the profile) leaves the formed cluster alone.
        subprocess.run(["sh", "-c", script], env=admin, check=True, capture_output=True, timeout=60)
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _answers(port: str, env: dict[str, str]) -> bool:
    reply = subprocess.run(
        ["redis-cli", "--user", "admin", "-p", port, "ping"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return reply.stdout.strip() == "PONG"


def _online_replicas(ports: Iterable[str], env: dict[str, str]) -> int:
    count = 0
    for port in ports:
        reply = subprocess.run(
            ["redis-cli", "--user", "admin", "-p", port, "info", "replication"],
            env=env, capture_output=True, text=True, check=False, timeout=10,
        )  # fmt: skip
        count += reply.stdout.count("state=online")
    return count
