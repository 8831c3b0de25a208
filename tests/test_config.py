"""Settings: defaults, overrides, .env handling, and one clear error per bad variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT, run_script, script_env

from config import DEFAULTS, ConfigError, Settings, host_and_port, load_settings, redact_url


def test_defaults_match_the_design() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.redis_max_connections == 5
    assert settings.stream_key == "orders"
    assert settings.groups == ("fulfillment_group", "email_group")
    assert (settings.batch_size, settings.block_ms, settings.claim_idle_ms) == (100, 2000, 60000)
    assert (settings.max_deliveries, settings.max_payload_bytes) == (5, 65536)
    assert settings.dead_letter_stream == "orders:dead-letter"
    assert settings.consumer_name  # host and pid when not given


def test_environment_overrides_and_consumer_name() -> None:
    settings = Settings.from_env({"BATCH_SIZE": "7", "CONSUMER_NAME": "pod-3", "LOG_LEVEL": "debug"})
    assert (settings.batch_size, settings.consumer_name, settings.log_level) == (7, "pod-3", "DEBUG")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"REDIS_MAX_CONNECTIONS": "many"}, "REDIS_MAX_CONNECTIONS"),
        ({"REDIS_MAX_CONNECTIONS": "0"}, "REDIS_MAX_CONNECTIONS"),
        ({"BATCH_SIZE": "-1"}, "BATCH_SIZE"),
        ({"BLOCK_MS": "5000"}, "BLOCK_MS"),
        ({"BLOCK_MS": "2000", "SOCKET_TIMEOUT_MS": "1000"}, "BLOCK_MS"),
        ({"REDIS_URL": "http://localhost:6379"}, "REDIS_URL"),
        ({"STREAM_KEY": "  "}, "STREAM_KEY"),
        ({"EMAIL_GROUP": "fulfillment_group"}, "EMAIL_GROUP"),
        ({"DEAD_LETTER_STREAM": "orders"}, "DEAD_LETTER_STREAM"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"MAX_DELIVERIES": "1.5"}, "MAX_DELIVERIES"),
        ({"REDIS_URL": "rediss://h/0?ssl_ca_cert=/ca.pem"}, "REDIS_URL"),
        ({"DEDUPE_WINDOW_MS": "-5"}, "DEDUPE_WINDOW_MS"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
        ({"CONSUMER_NAME": "pod 3"}, "CONSUMER_NAME"),
        ({"REDIS_SENTINELS": "sentinel-1"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "h:26379,h:0"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "h:26379", "REDIS_CLUSTER": "true"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "h:26379", "REDIS_URL": "unix:///run/redis.sock"}, "REDIS_URL"),
        ({"REDIS_SENTINELS": "h:26379", "REDIS_SENTINEL_MASTER": " "}, "REDIS_SENTINEL_MASTER"),
        ({"REDIS_CLUSTER_NODES": "10.0.0.2:6379"}, "REDIS_CLUSTER_NODES"),
        ({"REDIS_CLUSTER_NODES": "10.0.0.2", "REDIS_CLUSTER": "true"}, "REDIS_CLUSTER_NODES"),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_seed_nodes_and_sentinels_are_lists_of_addresses() -> None:
    cluster = Settings.from_env({"REDIS_CLUSTER": "true", "REDIS_CLUSTER_NODES": " a:7001, [::1]:7002 ,"})
    assert cluster.redis_cluster_nodes == ("a:7001", "[::1]:7002")
    assert [host_and_port(node) for node in cluster.redis_cluster_nodes] == [("a", 7001), ("::1", 7002)]
    assert Settings.from_env({}).redis_sentinels == ()


def test_password_never_in_repr_or_safe_url() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://app:s3cret-pw@redis.internal:6380/2"})
    assert "s3cret-pw" not in repr(settings)
    assert settings.safe_redis_url == "redis://app:***@redis.internal:6380/2"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_dotenv_is_read_and_the_real_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("BATCH_SIZE=42\nSTREAM_KEY=from-file\n")
    settings = load_settings({"STREAM_KEY": "from-env"}, env_file=str(env_file))
    assert (settings.batch_size, settings.stream_key) == (42, "from-env")


def test_env_example_lists_every_variable_with_its_default() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    example = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_]+=", line))
    compose_only = {"REDIS_ADMIN_PASSWORD", "PRODUCER_PASSWORD", "CONSUMER_PASSWORD"}
    assert {k: v for k, v in example.items() if k not in compose_only} == DEFAULTS
    assert {k: example[k] for k in compose_only} == dict.fromkeys(compose_only, "")  # no password in the repo


@pytest.mark.parametrize("name", ["DEDUPE_WINDOW_MS", "PRODUCER_ID"])
def test_env_example_and_the_docs_tell_one_truth_about_what_is_deduplicated(name: str) -> None:
    """What the consumers' window and the producer's record cover, word for word the same in
    .env.example's comment and in docs/configuration.md (formatting and the default left aside)."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith(f"{name}="))
    start = at
    while lines[start - 1].startswith("# "):
        start -= 1
    comment = " ".join(line[2:] for line in lines[start:at]).removeprefix("Empty: the host name. ")
    docs = (ROOT / "docs" / "configuration.md").read_text()
    [row] = [line for line in docs.splitlines() if line.startswith(f"| `{name}` |")]
    meaning = row.split(" | ")[2].rstrip(" |").replace("`", "")
    assert comment == meaning


def test_bad_setting_stops_a_script_with_one_line_and_exit_2() -> None:
    result = run_script("producer", script_env("redis://127.0.0.1:1/0", REDIS_MAX_CONNECTIONS="many"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "producer: error: REDIS_MAX_CONNECTIONS must be a whole number, got 'many'"
    ]
