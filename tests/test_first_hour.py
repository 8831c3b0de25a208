"""A new user's first hour: README commands, --help, an unreachable or locked Redis, small snags."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Script, need_redis_server, run_script, script_env, wait_until
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from config import ConfigError, Settings, lookalikes
from core import metrics
from orders import InvalidOrder, parse_order
from stream_consumer import Stats
from tools.local_redis import LocalRedis, start_local_redis

README = (ROOT / "README.md").read_text()
# The README and the pages it links to, in docs/: what a user reads.
DOCS = README + "".join(path.read_text() for path in sorted((ROOT / "docs").glob("*.md")))
# Every module a user runs with `python3 -m NAME`: the top level's and the development tools' (tools.NAME).
SCRIPTS = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for path in [*ROOT.glob("*.py"), *ROOT.glob("tools/*.py")]
    if 'if __name__ == "__main__":' in path.read_text()
)
PASSWORD = "pw-Zq81-first-hour"  # a secret that must never show up in any output


def readme_section(heading: str) -> str:
    """The text under a `#`-heading of the README or a page of docs/, up to the next heading of the
    same or a higher level."""
    for page in [README, *(path.read_text() for path in sorted((ROOT / "docs").glob("*.md")))]:
        match = re.search(rf"^(#+) {re.escape(heading)}\n", page, re.M)
        if match:
            level = len(match.group(1))
            end = re.compile(rf"^#{{1,{level}}} ", re.M).search(page, match.end())
            return page[match.end() : end.start() if end else len(page)]
    raise AssertionError(f"neither the README nor docs/ has a section {heading!r}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    return lines[0]


# 1. "Running the pieces yourself"


def test_running_the_pieces_runs_without_docker_or_a_python_command() -> None:
    section = readme_section("Running the pieces yourself")
    commands = [line.split("#")[0].strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)
                for line in block.splitlines()]  # fmt: skip
    commands = [command for command in commands if command]
    assert any(c.startswith("python3 -m venv .venv") and ". .venv/bin/activate" in c for c in commands)
    assert any(c.startswith("redis-server ") for c in commands), "a Redis without Docker"
    assert any("docker compose up" in c for c in commands), "and the Docker way beside it"
    assert not re.search(r"(?<![\w/.-])python -m", section), "Debian has python3, not python: one spelling"
    assert "compose only" in section, "the .env passwords step says it is for compose"
    for requirements in re.findall(r"pip install -r (\S+)", section):
        assert (ROOT / requirements).is_file(), requirements


def test_running_the_pieces_names_real_modules_that_take_help() -> None:
    section = readme_section("Running the pieces yourself")
    modules = set(re.findall(r"python3 -m (\w+)", section)) - {"venv", "pip"}
    modules |= set(re.findall(r"\./dev\.sh run (\w+)", section)) - {"MODULE"}
    assert {"initialization_stream", "consumer1", "consumer2", "producer", "status"} <= modules
    for module in sorted(modules):
        assert (ROOT / f"{module}.py").is_file(), module
        result = run_script(module, script_env("redis://127.0.0.1:1/0"), "--help")
        assert result.returncode == 0, (module, result.stderr)
        assert result.stdout.startswith("usage:"), module


# 3. --help shows defaults


def _parser_of(module: str) -> argparse.ArgumentParser | None:
    build = getattr(importlib.import_module(module), "build_parser", None)
    return None if build is None else build()


def _parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[
    tuple[tuple[str, ...], argparse.ArgumentParser]
]:  # fmt: skip
    """The parser and its subcommands' parsers, each with the words that reach it."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*words, name))


def _options_with_defaults(parser: argparse.ArgumentParser) -> list[str]:
    """Options whose default is a value (not None, and not a flag's False), as --help would show them."""
    return [
        action.option_strings[-1]
        for action in parser._actions
        if action.option_strings
        and action.help != argparse.SUPPRESS
        and action.default not in (None, False, argparse.SUPPRESS)
    ]


def _help_entry(help_text: str, option: str) -> str:
    """The lines of `--help` that describe `option`, up to the next option."""
    match = re.search(rf"^  (?:-\w, )?{re.escape(option)}\b.*?(?=^  -|^$|\Z)", help_text, re.M | re.S)
    assert match, f"{option} is not in the help"
    return match.group(0)


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_option_with_a_default_says_so_in_help(module: str) -> None:
    parser = _parser_of(module)
    for words, sub in _parsers(parser) if parser is not None else [((), None)]:
        result = run_script(module, script_env("redis://127.0.0.1:1/0"), *words, "--help")
        assert result.returncode == 0, (module, words, result.stderr)
        if sub is None:  # no build_parser: a script without options
            assert re.findall(r"^  (-\S+)", result.stdout, re.M) == ["-h,"], module
            continue
        for option in _options_with_defaults(sub):
            entry = _help_entry(result.stdout, option)
            assert "default" in entry, f"python -m {module} {' '.join(words)} --help: {option} {entry!r}"


def test_options_whose_default_depends_on_something_else_say_what_it_is() -> None:
    for module, option in (("tools.bench", "--orders"), ("status", "--timeout")):
        result = run_script(module, script_env("redis://127.0.0.1:1/0"), "--help")
        assert "default" in _help_entry(result.stdout, option), (module, option)


def test_dev_sh_usage_points_at_help() -> None:
    result = subprocess.run(
        [str(ROOT / "dev.sh")], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "--help" in result.stderr
    assert "./dev.sh run" in result.stderr


# 2. Unreachable or refusing Redis


def test_connect_timeout_setting() -> None:
    assert Settings.from_env({}).redis_connect_timeout_ms == 10_000
    assert Settings.from_env({"REDIS_CONNECT_TIMEOUT_MS": "1500"}).redis_connect_timeout_ms == 1500
    with pytest.raises(ConfigError, match="REDIS_CONNECT_TIMEOUT_MS"):
        Settings.from_env({"REDIS_CONNECT_TIMEOUT_MS": "soon"})


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("status", ()),
        ("producer", ("--count", "1")),
        ("initialization_stream", ()),
        ("consumer1", ()),
        ("deadletter", ("list",)),
        ("maintenance", ()),
    ],
)
def test_an_unreachable_redis_is_one_line_within_the_connect_timeout(
    module: str, args: tuple[str, ...]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    started = time.monotonic()
    result = run_script(module, script_env(url, REDIS_CONNECT_TIMEOUT_MS="1000"), *args, timeout=15)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert line.startswith(f"{module}: error: cannot reach Redis at {url} after 1s"), line
    assert took < 3, f"gave up after {took:.1f}s"


def test_status_timeout_overrides_the_setting() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    result = run_script("status", script_env(url), "--timeout", "1.5", timeout=15)  # setting: 10 s
    took = time.monotonic() - started
    assert result.returncode == 1
    assert "after 1.5s" in one_line(result.stderr)
    assert took < 3, f"gave up after {took:.1f}s"
    bad = run_script("status", script_env(url), "--timeout", "0")
    assert bad.returncode == 2
    assert "--timeout must be more than 0 seconds" in bad.stderr


@pytest.fixture
def locked_server() -> Iterator[LocalRedis]:
    """A redis-server whose default user needs PASSWORD."""
    need_redis_server()
    server = start_local_redis("--requirepass", PASSWORD)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("module", ["status", "consumer1", "producer"])
def test_a_missing_password_says_one_is_needed_and_where_it_goes(
    locked_server: LocalRedis, module: str
) -> None:
    url = f"redis://127.0.0.1:{locked_server.port}/0"
    result = run_script(module, script_env(url, REDIS_CONNECT_TIMEOUT_MS="5000"), timeout=15)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith(f"{module}: error: Redis at {url} needs a password: put it in REDIS_URL"), line
    assert "redis://USER:PASSWORD@HOST:PORT/DB" in line
    assert "HELLO" not in line
    assert "NOAUTH" not in line
    assert PASSWORD not in result.stdout + result.stderr


def test_a_wrong_password_is_one_line_without_the_secret(locked_server: LocalRedis) -> None:
    wrong = "not-" + PASSWORD
    url = f"redis://:{wrong}@127.0.0.1:{locked_server.port}/0"
    started = time.monotonic()
    result = run_script("status", script_env(url), timeout=15)
    assert result.returncode == 1
    assert time.monotonic() - started < 3  # refused at once, not retried until the deadline
    line = one_line(result.stderr)
    assert "refused the user or password of REDIS_URL" in line, line
    assert PASSWORD not in result.stdout + result.stderr


# 4. Small things


def test_unexpected_fields_are_named_never_their_values() -> None:
    base = '{"order_id": "ord-1", "customer_email": "ann@example.com"'

    def refusal(extra: str) -> str:
        with pytest.raises(InvalidOrder) as refused:
            parse_order(base + extra + "}", 65536)
        return str(refused.value)

    one = refusal(', "note": "call ann on 555-0100"')
    assert one.startswith('unexpected field "note"; allowed: created_at, customer_email, ')
    assert "555-0100" not in one
    assert refusal(', "zip": "12345", "gift_wrap": 1').startswith('2 unexpected fields "gift_wrap", "zip"; ')
    # A key that could be personal data is counted, not shown.
    mixed = refusal(', "note": 1, "bob@example.com": 1, "+1 555 0100": 1')
    assert mixed.startswith('3 unexpected fields "note" and 2 more; ')
    assert "bob" not in mixed
    assert "555" not in mixed
    assert refusal(', "bob@example.com": 1').startswith("unexpected field (name not shown); ")
    assert refusal(', "a b": 1, "b\\u0007": 1').startswith("2 unexpected fields (names not shown); ")
    many = "".join(f', "f{i}": {i}' for i in range(8))
    assert refusal(many).startswith('8 unexpected fields "f0", "f1", "f2", "f3", "f4" and 3 more; ')


def test_a_leading_byte_order_mark_is_accepted() -> None:
    payload = '{"order_id": "ord-1", "customer_email": "ann@example.com"}'
    assert parse_order(b"\xef\xbb\xbf" + payload.encode(), 65536).order_id == "ord-1"
    assert parse_order("\ufeff" + payload, 65536).order_id == "ord-1"
    with pytest.raises(InvalidOrder):  # one mark at the start, not anywhere
        parse_order(payload.replace("{", "{\ufeff", 1), 65536)


async def test_the_producer_publishes_a_file_saved_with_a_byte_order_mark(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    orders = tmp_path / "orders.jsonl"
    lines = [f'{{"order_id": "ord-{n}", "customer_email": "ann@example.com"}}' for n in (1, 2)]
    orders.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8-sig")  # as Notepad saves it
    assert orders.read_bytes().startswith(b"\xef\xbb\xbf")
    result = await asyncio.to_thread(run_script, "producer", script_env(redis_url), "--file", str(orders))
    assert result.returncode == 0, result.stderr
    entries = await redis.xrange(Settings.from_env({}).stream_key)
    assert [fields[b"data"] for _, fields in entries or [] if fields] == [
        b'{"order_id":"ord-1","customer_email":"ann@example.com"}',
        b'{"order_id":"ord-2","customer_email":"ann@example.com"}',
    ]


def test_metrics_start_listens_on_the_host_given() -> None:
    port = free_port()
    collector = metrics.start(port, Stats(), "g", "c", host="127.0.0.2")
    try:
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as response:
            assert b"orders_processed_total" in response.read()
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        collector.close()


def test_metrics_host_setting() -> None:
    assert Settings.from_env({}).metrics_host == "127.0.0.1"
    assert Settings.from_env({"METRICS_HOST": "0.0.0.0"}).metrics_host == "0.0.0.0"
    with pytest.raises(ConfigError, match="METRICS_HOST"):
        Settings.from_env({"METRICS_HOST": " "})


async def test_a_consumer_serves_metrics_on_loopback_only_and_the_readme_lists_each(
    redis: Redis, redis_url: str, scripts: Callable[..., Script]
) -> None:
    port = free_port()
    consumer = scripts("consumer1", script_env(redis_url, METRICS_PORT=str(port)))

    def scrape() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                body: bytes = response.read()
                return body.decode()
        except OSError:
            return None

    await wait_until(lambda: asyncio.to_thread(scrape), "the consumer to serve metrics", timeout=15)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.2", port), timeout=5):
        pass  # not on every interface: another loopback address is refused
    text = await asyncio.to_thread(scrape)
    assert text is not None
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
        if family.name.startswith("orders_")
        and not family.name.endswith("_created")  # a histogram's start time
    }
    assert "orders_deleted_skipped_total" in exported
    listed = set(re.findall(r"`(orders_\w+)`", DOCS))
    assert exported - listed == set(), "exported but not in the docs' metrics list"
    assert {f"orders_{name}_total" for name in metrics.COUNTERS} <= exported
    consumer.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(consumer.wait) == 0


def test_every_script_is_covered() -> None:
    assert {
        "tools.bench",
        "tools.chaos",
        "consumer1",
        "consumer2",
        "deadletter",
        "tools.demo",
        "producer",
    } | {"status"} <= set(SCRIPTS), SCRIPTS


def test_a_misspelled_setting_is_named_with_the_closest_one(redis_url: str) -> None:
    assert lookalikes(["BACTH_SIZE", "PATH", "HOME", "REDIS_ADMIN_PASSWORD", "BATCH_SIZE"]) == [
        "BACTH_SIZE is not a setting, so it is ignored; did you mean BATCH_SIZE?"
    ]
    result = run_script("status", script_env(redis_url, BACTH_SIZE="10"))
    warned = [line for line in result.stderr.splitlines() if "BACTH_SIZE" in line]
    assert len(warned) == 1
    assert "did you mean BATCH_SIZE?" in warned[0]


async def test_initialization_says_each_group_once_and_status_shows_a_whole_reason(
    redis: Redis, redis_url: str
) -> None:
    env = script_env(redis_url)
    result = run_script("initialization_stream", env)
    assert result.returncode == 0, result.stderr
    for group in ("fulfillment_group", "email_group"):
        assert (result.stdout + result.stderr).count(f"group {group}") == 1
    reason = "invalid order: customer_email does not look like an e-mail address - " + "x" * 60 + " END"
    await redis.xadd(
        "orders:dead-letter",
        {"group": "email_group", "consumer": "c", "source_id": "1-0", "deliveries": 1, "error": reason},
    )
    shown = run_script("status", env)
    assert reason in shown.stdout


@pytest.mark.parametrize(
    ("command", "installed"), [("demo", "requirements.txt"), ("test", "requirements-dev.txt")]
)
def test_dev_sh_installs_what_each_command_needs(tmp_path: Path, command: str, installed: str) -> None:
    """`./dev.sh demo` installs the runtime requirements only (the development ones are ten times
    larger); `./dev.sh test` the development ones. A stand-in .venv records what pip is asked."""
    for name in ("dev.sh", "requirements.txt", "requirements-dev.txt"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "dev.sh").chmod(0o755)
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    record = tmp_path / "pip.log"
    (venv / "python").write_text(f'#!/bin/sh\necho "$@" >> {record}\nexit 3\n')  # stops after pip
    (venv / "python").chmod(0o755)
    (venv / "ruff").write_text("#!/bin/sh\nexit 3\n")
    (venv / "ruff").chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "TEST_REDIS_URL": "redis://127.0.0.1:1/9",
    }
    subprocess.run(["./dev.sh", command], cwd=tmp_path, env=env, capture_output=True, timeout=30, check=False)
    asked = record.read_text()
    assert f"-m pip install --disable-pip-version-check -q -r {installed}" in asked
    assert asked.count("pip install") == 1


def test_redis_cluster_true_against_one_redis_says_so_at_once(redis_url: str) -> None:
    started = time.monotonic()
    result = run_script("status", script_env(redis_url, REDIS_CLUSTER="true"))
    assert time.monotonic() - started < 5
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"status: error: Redis at {redis_url} is not a Redis Cluster (cluster mode is not enabled on it): "
        "set REDIS_CLUSTER=false to use it as one Redis"
    ]


def test_the_groups_setting_survives_a_bash_export_and_the_old_name_still_works(redis_url: str) -> None:
    """bash owns GROUPS (`export GROUPS=...` is dropped): the setting is CONSUMER_GROUPS; the old
    name, from .env or a container's environment, still works and says it was renamed."""
    three = "fulfillment_group,email_group,analytics_group"
    exported = subprocess.run(
        ["bash", "-c", f"export CONSUMER_GROUPS={three}; exec {sys.executable} -m status --json"],
        cwd=ROOT, env=script_env(redis_url), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert "analytics_group" in {g["name"] for g in json.loads(exported.stdout)["groups"]}
    old = run_script("status", script_env(redis_url, GROUPS=three), "--json")
    assert "analytics_group" in {g["name"] for g in json.loads(old.stdout)["groups"]}
    assert "GROUPS is now called CONSUMER_GROUPS" in old.stderr


def test_a_line_far_over_the_cap_is_named_by_the_cap_alone(redis_url: str, tmp_path: Path) -> None:
    """Not "more than 131,074 bytes, over the 65536-byte cap": the line is only read that far."""
    orders = tmp_path / "orders.jsonl"
    orders.write_text('{"order_id": "o-1", "customer_email": "a@b.co", "note": "' + "x" * 5000 + '"}\n')
    result = run_script("producer", script_env(redis_url, MAX_PAYLOAD_BYTES="1000"), "--file", str(orders))
    assert result.returncode == 2
    [message] = result.stderr.splitlines()
    assert "line 1: longer than the 1,000-byte cap on an order (MAX_PAYLOAD_BYTES)" in message
