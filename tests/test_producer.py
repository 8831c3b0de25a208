"""The producer's command line, mostly with real processes: the cap as sent, signals, memory, output."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Script, run_script, script_env, wait_until
from redis.asyncio import Redis

from core.keys import partition_of, stream_keys
from core.library import Appended
from producer import CHUNK, InputChanged, Interrupted, Run, Track, streams_of
from tools.local_redis import LocalRedis

STREAM = "orders"
BIG = 200_000  # orders in the big file: a few seconds of publishing, 30 MB


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BIG valid orders, one JSON line each, written without the producer's own code."""
    path = tmp_path_factory.mktemp("producer") / "big.jsonl"
    with path.open("w") as handle:
        for n in range(1, BIG + 1):
            handle.write(
                f'{{"order_id":"ord-{n}","customer_email":"customer{n}@example.com",'
                f'"items":[{{"sku":"SKU-{n % 7}","qty":{1 + n % 3}}}],"total":{9.5 + n % 40},'
                f'"created_at":"2026-11-25T10:00:00Z"}}\n'
            )
    return path


def run_with_peak_rss(env: dict[str, str], *args: str, stdin: Path | None = None) -> tuple[int, str]:
    """Run the producer as the only child of a fresh Python; return its peak RSS (KiB) and its output."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:]).returncode\n"
        "print('peak', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)\n"
    )
    with (stdin or Path(os.devnull)).open("rb") as source:
        result = subprocess.run(
            [sys.executable, "-c", wrapper, sys.executable, "-m", "producer", *args],
            cwd=ROOT,
            env=env,
            stdin=source,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    *output, last = result.stdout.splitlines()
    _, peak, code = last.split()
    assert code == "0", result.stderr
    return int(peak), "\n".join(output)


async def test_an_order_over_the_cap_as_sent_publishes_nothing(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    env = script_env(redis_url, MAX_PAYLOAD_BYTES="200")
    template = '{"order_id":"big-1","customer_email":"%s@example.com","total":1}'
    line = template % ("x" * (200 - len(template % "")))
    assert len(line.encode()) == 200  # within the cap as written; sent as "total":1.0, 202 bytes
    orders = tmp_path / "orders.jsonl"
    orders.write_text('{"order_id":"ok-1","customer_email":"a@example.com"}\n' + line + "\n")
    for args, stdin in ((["--file", str(orders)], ""), (["--file", "-"], orders.read_text())):
        result = run_script("producer", env, *args, stdin=stdin)
        assert result.returncode == 2, result.stderr
        [message] = result.stderr.splitlines()
        assert message.endswith(
            " line 2: the order is 202 bytes as sent (200 in the file), over the 200-byte cap on an order "
            "(MAX_PAYLOAD_BYTES); "
            "nothing was published"
        )
    samples = run_script("producer", script_env(redis_url, MAX_PAYLOAD_BYTES="100"), "--count", "5")
    assert samples.returncode == 2
    assert "sample orders are up to" in samples.stderr
    assert await redis.exists(STREAM) == 0


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_signal_while_publishing_reports_exactly_what_redis_confirmed(
    redis: Redis, redis_url: str, scripts: Callable[..., Script], big_file: Path, signum: int, code: int
) -> None:
    producer = scripts("producer", script_env(redis_url), "--file", str(big_file))

    async def some_published() -> bool:
        return bool(await redis.xlen(STREAM))

    await wait_until(some_published, "the first orders in the stream", timeout=30)
    producer.process.send_signal(signum)
    assert producer.wait(30) == code
    output = producer.output()
    name = signal.Signals(signum).name
    found = re.search(rf"interrupted by {name}: ([\d,]+) of {BIG:,} orders confirmed in {STREAM}", output)
    assert found, output
    confirmed = int(found[1].replace(",", ""))
    assert 0 < confirmed < BIG
    assert confirmed == await redis.xlen(STREAM)
    assert f"the other {BIG - confirmed:,} were not sent" in output
    assert "Traceback" not in output
    assert "published" not in output.replace("nothing was published", "")


async def test_a_second_signal_stops_at_once(
    redis: Redis, redis_url: str, scripts: Callable[..., Script], big_file: Path
) -> None:
    producer = scripts("producer", script_env(redis_url), "--file", str(big_file))

    async def some_published() -> bool:
        return bool(await redis.xlen(STREAM))

    await wait_until(some_published, "the first orders in the stream", timeout=30)
    await redis.client_pause(20_000, all=False)  # the chunks in flight hang
    try:
        producer.process.send_signal(signal.SIGINT)
        await wait_until(
            lambda: "SIGINT: sending no more" in producer.output(), "the first signal to be seen"
        )
        producer.process.send_signal(signal.SIGINT)
        assert producer.wait(5) == 130
    finally:
        await redis.client_unpause()
    output = producer.output()
    found = re.search(rf"interrupted again by SIGINT: ([\d,]+) of {BIG:,} orders confirmed", output)
    assert found, output
    confirmed = int(found[1].replace(",", ""))
    assert confirmed <= await redis.xlen(STREAM) <= confirmed + 2 * CHUNK
    assert "Traceback" not in output


async def test_a_signal_while_checking_stdin_publishes_nothing(redis: Redis, redis_url: str) -> None:
    producer = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "producer", "--file", "-"],
        cwd=ROOT,
        env=script_env(redis_url),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert producer.stdin is not None
    try:
        producer.stdin.write(b'{"order_id":"c-1","customer_email":"c@example.com"}\n')
        await producer.stdin.drain()

        def spooling() -> bool:  # the temporary file for stdin exists: the first pass has begun
            for fd in Path(f"/proc/{producer.pid}/fd").iterdir():
                with contextlib.suppress(OSError):  # an fd closed while we look
                    if "(deleted)" in os.readlink(fd):
                        return True
            return False

        await wait_until(spooling, "the producer to read stdin", timeout=30)
        producer.send_signal(signal.SIGINT)  # stdin is still open: it waits for more
        async with asyncio.timeout(30):
            stdout, stderr = await producer.communicate()
    finally:
        if producer.returncode is None:
            producer.kill()
            await producer.wait()
    assert producer.returncode == 130
    assert stderr.decode().splitlines() == ["producer: error: interrupted: nothing was published"]
    assert stdout == b""
    assert await redis.exists(STREAM) == 0


async def test_memory_does_not_grow_with_the_input(redis: Redis, redis_url: str, big_file: Path) -> None:
    env = script_env(redis_url)
    baseline, _ = run_with_peak_rss(env, "--count", "0")
    # Holding 200,000 orders took 130 MB over this baseline (162 MB peak for this file).
    bound = baseline + 20 * 1024
    for args, stdin in (
        (["--file", str(big_file)], None),
        (["--file", "-"], big_file),
        (["--count", str(BIG)], None),
    ):
        peak, output = run_with_peak_rss(env, *args, stdin=stdin)
        assert f"published {BIG:,} new orders to {STREAM} in " in output
        assert peak < bound, f"{args}: peak RSS {peak} KiB, baseline {baseline} KiB"
        assert await redis.xlen(STREAM) == BIG
        await redis.flushdb()  # the stream and the file's checkpoint: stdin has the same orders


async def test_the_result_is_printed_on_stdout(redis: Redis, redis_url: str) -> None:
    env = script_env(redis_url)
    one = run_script("producer", env, "--count", "1")
    assert re.fullmatch(rf"published 1 new order to {STREAM} in \d+\.\d s, 0 already there\n", one.stdout)
    three = run_script("producer", env, "--count", "3")
    assert re.fullmatch(rf"published 3 new orders to {STREAM} in \d+\.\d s, 0 already there\n", three.stdout)
    assert run_script("producer", env, "--file", "-", stdin="\n").stdout == "nothing to publish\n"
    quiet = run_script("producer", env, "--count", "2", "--quiet")
    assert (quiet.returncode, quiet.stdout) == (0, "")
    assert "\r" not in one.stderr + three.stderr  # no progress bar unless stderr is a terminal
    assert await redis.xlen(STREAM) == 1 + 3 + 2


def test_a_long_publish_shows_progress_on_a_terminal(redis_url: str, big_file: Path) -> None:
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new one is 0 wide
    try:
        producer = subprocess.Popen(
            [sys.executable, "-m", "producer", "--file", str(big_file)],
            cwd=ROOT,
            env=script_env(redis_url),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
        )
        os.close(terminal)
        shown = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # read as it comes, or a full terminal would stall it
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    shown += os.read(controller, 65536)
                except OSError:  # the producer exited and closed the terminal
                    break
            elif producer.poll() is not None:
                break
        stdout, _ = producer.communicate(timeout=30)
    finally:
        os.close(controller)
        if producer.poll() is None:
            producer.kill()
            producer.communicate()
    assert producer.returncode == 0
    assert re.search(rb"\d+%\|.*\| [\d.]+k?/200k", shown), shown[-500:]
    assert stdout.decode().startswith(f"published {BIG:,} new orders")


def test_help_shows_defaults_and_quiet() -> None:
    result = run_script("producer", dict(os.environ), "--help")
    assert result.returncode == 0
    assert "(default: 10)" in result.stdout
    assert "--quiet" in result.stdout
    assert "MAX_PAYLOAD_BYTES (default 65536)" in " ".join(result.stdout.split())


async def test_what_a_signal_means_depends_on_when_it_comes() -> None:
    idle = asyncio.create_task(asyncio.sleep(60))  # stands for the run's task, which a signal may cancel
    try:
        before = Run(idle, STREAM)
        before.total = 3
        before.on_signal(signal.SIGINT)  # nothing sent yet: the run is stopped at once
        assert idle.cancelling()
        assert str(before.outcome()) == "interrupted: nothing was published"

        during = Run(idle, STREAM)
        during.total = 3 * CHUNK
        for chunk in during.chunks(iter([("o", b"{}")] * during.total), "input"):
            during.confirm(Appended(["1-0"] * len(chunk), new=True))
            if during.confirmed == CHUNK:
                during.on_signal(signal.SIGTERM)  # no more chunks; this one was confirmed
        failure = during.outcome()
        assert isinstance(failure, Interrupted)
        assert failure.exit_code == 143
        assert str(failure).startswith(f"interrupted by SIGTERM: {CHUNK:,} of {3 * CHUNK:,} orders confirmed")

        after = Run(idle, STREAM)
        after.total = 2
        for chunk in after.chunks(iter([("o", b"{}")] * after.total), "input"):
            after.confirm(Appended(["1-0"] * len(chunk), new=True))
        after.on_signal(signal.SIGINT)  # everything was confirmed already: a normal end
        assert after.outcome() is None
    finally:
        idle.cancel()


# --- publishing the same input again -------------------------------------------------


def write_orders(path: Path, ids: list[str], email: str = "a@example.com") -> Path:
    path.write_text("".join(f'{{"order_id":"{i}","customer_email":"{email}","total":1.5}}\n' for i in ids))
    return path


async def stream_order_ids(redis: Redis, streams: list[str]) -> Counter[str]:
    """How many entries each order id has, over `streams`."""
    found: Counter[str] = Counter()
    for stream in streams:
        entries: Any = await redis.xrange(stream)
        found.update(json.loads(fields[b"data"])["order_id"] for _, fields in entries)
    return found


async def test_an_input_published_again_adds_nothing_and_says_so(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    orders = write_orders(tmp_path / "orders.jsonl", [f"o-{n}" for n in range(1500)])
    env = script_env(redis_url)
    first = run_script("producer", env, "--file", str(orders))
    assert re.fullmatch(
        rf"published 1,500 new orders to {STREAM} in \d+\.\d s, 0 already there\n", first.stdout
    )
    for args, stdin in ((["--file", str(orders)], ""), (["--file", "-"], orders.read_text())):  # stdin too
        again = run_script("producer", env, *args, stdin=stdin)
        assert again.returncode == 0, again.stderr
        assert re.fullmatch(
            rf"published 0 new orders to {STREAM} in \d+\.\d s, 1,500 already there: 1,500 published "
            r"before from this input\n",
            again.stdout,
        )
    assert await redis.xlen(STREAM) == 1500


async def test_an_order_id_on_two_lines_is_published_once_and_named(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    orders = write_orders(tmp_path / "orders.jsonl", ["o-1", "o-2", "o-3", "o-2", "o-4", "o-2", "o-5", "o-1"])
    result = run_script("producer", script_env(redis_url), "--file", str(orders))
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        rf"published 5 new orders to {STREAM} in \d+\.\d s, 3 already there: 3 with the order_id of an "
        r"earlier line \(o-2, o-1\)\n",
        result.stdout,
    )
    assert await stream_order_ids(redis, [STREAM]) == Counter(f"o-{n}" for n in range(1, 6))


@pytest.mark.parametrize("partitions", [1, 3])
async def test_an_interrupted_publish_run_again_sends_the_rest_and_nothing_twice(
    redis: Redis, redis_url: str, scripts: Callable[..., Script], big_file: Path, partitions: int
) -> None:
    env = script_env(redis_url, STREAM_PARTITIONS=str(partitions))
    streams = [STREAM] if partitions == 1 else [f"{{{STREAM}:{i}}}" for i in range(partitions)]
    producer = scripts("producer", env, "--file", str(big_file))

    async def some_published() -> bool:
        return sum([await redis.xlen(stream) for stream in streams]) > 0

    await wait_until(some_published, "the first orders in the stream", timeout=30)
    producer.process.send_signal(signal.SIGINT)
    assert producer.wait(30) == 130
    output = producer.output()
    found = re.search(rf"interrupted by SIGINT: ([\d,]+) of {BIG:,} orders confirmed in {STREAM}", output)
    assert found, output
    confirmed = int(found[1].replace(",", ""))
    assert 0 < confirmed < BIG
    assert output.rstrip().endswith(
        "run the same command on the same input again: it sends the rest and adds nothing twice"
    )
    again = run_script("producer", env, "--file", str(big_file), timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"published {BIG - confirmed:,} new orders to {STREAM} in "), again.stdout
    assert again.stdout.endswith(
        f"s, {confirmed:,} already there: {confirmed:,} published before from this input\n"
    )
    assert await stream_order_ids(redis, streams) == Counter(f"ord-{n}" for n in range(1, BIG + 1))


async def test_a_failed_publish_run_again_sends_the_rest_and_nothing_twice(
    own_server: LocalRedis, tmp_path: Path
) -> None:
    orders = write_orders(tmp_path / "orders.jsonl", [f"o-{n}" for n in range(30_000)])
    client = Redis.from_url(own_server.url)
    try:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", int((await client.info("memory"))["used_memory"]) + 2_000_000)
        env = script_env(own_server.url)
        failed = run_script("producer", env, "--file", str(orders), timeout=60)
        assert failed.returncode == 1
        [line] = failed.stderr.splitlines()[-1:]
        found = re.fullmatch(
            r"producer: error: ([\d,]+) of 30,000 orders confirmed, then Redis failed \(OutOfMemoryError: "
            r".*\); run the same command on the same input again: it sends the rest and adds nothing twice",
            line,
        )
        assert found, failed.stderr
        confirmed = int(found[1].replace(",", ""))
        assert 0 < confirmed == await client.xlen(STREAM)
        await client.config_set("maxmemory", 0)
        again = run_script("producer", env, "--file", str(orders), timeout=60)
        assert again.returncode == 0, again.stderr
        assert f"published {30_000 - confirmed:,} new orders" in again.stdout
        assert (
            f", {confirmed:,} already there: {confirmed:,} published before from this input\n" in again.stdout
        )
        assert await stream_order_ids(client, [STREAM]) == Counter(f"o-{n}" for n in range(30_000))
    finally:
        await client.aclose()


async def test_an_input_that_changed_is_refused_and_one_that_grew_sends_the_rest(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    env = script_env(redis_url)
    ids = [f"o-{n}" for n in range(1200)]
    orders = write_orders(tmp_path / "orders.jsonl", ids)
    assert run_script("producer", env, "--file", str(orders)).returncode == 0
    # The same first order, another order changed: what was published is not known to be what it has.
    changed = orders.read_text().replace('"o-700","customer_email":"a@', '"o-700","customer_email":"b@')
    orders.write_text(changed)
    refused = run_script("producer", env, "--file", str(orders))
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"producer: error: {orders}: its first 1,200 orders are not those an earlier run published from it "
        "(it changed since, or it starts as another input did), and orders already in the stream would run "
        "twice: nothing was published; publish the orders that are not there yet from a file of their own"
    ]
    assert await redis.xlen(STREAM) == 1200
    grown = write_orders(tmp_path / "grown.jsonl", [*ids, "o-new-1", "o-new-2"])
    result = run_script("producer", env, "--file", str(grown))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("published 2 new orders to orders in ")
    assert result.stdout.endswith(", 1,200 already there: 1,200 published before from this input\n")
    assert await stream_order_ids(redis, [STREAM]) == Counter([*ids, "o-new-1", "o-new-2"])


async def test_checkpoints_a_round_apart_skip_what_each_covers_and_a_changed_input_sends_nothing() -> None:
    """A run stopped part way through a round leaves the partitions' checkpoints apart: partition 0
    has its share of the second round, 1 and 2 not. Run again, each partition's share is sent from
    its own checkpoint on, and nothing at all before every checkpoint matched the input."""
    partitions = 3
    records = [(f"o-{n}", b'{"order_id":"o-%d"}' % n) for n in range(2 * partitions * CHUNK)]
    in_round_1 = partitions * CHUNK
    keys = [stream_keys(stream) for stream in streams_of(STREAM, partitions)]

    def share(partition: int, items: list[tuple[str, bytes]]) -> list[bytes]:
        return [payload for order_id, payload in items if partition_of(order_id, partitions) == partition]

    def checkpoint(partition: int, upto: int) -> str:  # as library.lua stores it: state, ids, ...
        track = Track.of_input(keys[partition], "in", None)
        track.advance(share(partition, records[:upto]))
        return f"{track.state} 1-0+1  "

    stored = [checkpoint(0, len(records)), checkpoint(1, in_round_1), checkpoint(2, in_round_1)]
    idle = asyncio.create_task(asyncio.sleep(60))
    try:
        run = Run(idle, STREAM)
        tracks = [Track.of_input(keys[p], "in", stored[p]) for p in range(partitions)]
        sent = list(run.unconfirmed(iter(records), tracks))
        assert sent == [r for r in records[in_round_1:] if partition_of(r[0], partitions) != 0]
        assert run.skipped == in_round_1 + len(share(0, records[in_round_1:]))
        assert [t.state for t in tracks] == [s.split()[0] for s in stored]  # the next chunk follows them

        # Partition 0's last order changed: its checkpoint is checked last, when the other
        # partitions have orders to send (held back until then).
        changed = list(records)
        at = max(n for n, r in enumerate(records) if partition_of(r[0], partitions) == 0)
        changed[at] = (changed[at][0], changed[at][1].replace(b"}", b',"total":1}'))
        tracks = [Track.of_input(keys[p], "in", stored[p]) for p in range(partitions)]
        yielded: list[tuple[str, bytes]] = []
        with pytest.raises(InputChanged):
            yielded.extend(Run(idle, STREAM).unconfirmed(iter(changed), tracks))  # kept up to the raise
        assert yielded == []
    finally:
        idle.cancel()
