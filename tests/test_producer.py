"""The producer's command line, mostly with real processes: the cap as sent, signals, memory, output."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
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
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, Script, run_script, script_env, wait_until
from redis.asyncio import Redis

from producer import CHUNK, Interrupted, Run

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
            " line 2: the order is 202 bytes as sent (200 in the file), over the 200-byte cap; "
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
        assert f"published {BIG:,} orders to {STREAM} in " in output
        assert peak < bound, f"{args}: peak RSS {peak} KiB, baseline {baseline} KiB"
        assert await redis.xlen(STREAM) == BIG
        await redis.delete(STREAM)


async def test_the_result_is_printed_on_stdout(redis: Redis, redis_url: str) -> None:
    env = script_env(redis_url)
    one = run_script("producer", env, "--count", "1")
    assert re.fullmatch(rf"published 1 order to {STREAM} in \d+\.\d s\n", one.stdout)
    three = run_script("producer", env, "--count", "3")
    assert re.fullmatch(rf"published 3 orders to {STREAM} in \d+\.\d s\n", three.stdout)
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
    assert stdout.decode().startswith(f"published {BIG:,} orders")


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
            during.confirm(["1-0"] * len(chunk))
            if during.confirmed == CHUNK:
                during.on_signal(signal.SIGTERM)  # no more chunks; this one was confirmed
        failure = during.outcome()
        assert isinstance(failure, Interrupted)
        assert failure.exit_code == 143
        assert str(failure).startswith(f"interrupted by SIGTERM: {CHUNK} of {3 * CHUNK:,} orders confirmed")

        after = Run(idle, STREAM)
        after.total = 2
        for chunk in after.chunks(iter([("o", b"{}")] * after.total), "input"):
            after.confirm(["1-0"] * len(chunk))
        after.on_signal(signal.SIGINT)  # everything was confirmed already: a normal end
        assert after.outcome() is None
    finally:
        idle.cancel()
