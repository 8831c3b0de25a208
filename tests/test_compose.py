"""docker-compose.yaml cannot run here (no Docker engine), so check what it promises by parsing it."""

from __future__ import annotations

import re
from typing import Any

import yaml
from conftest import ROOT


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
    assert re.search(r"^user producer on #@PRODUCER_PASSWORD@ .*-@all .*\(~orders \+xadd\)", template, re.M)
