"""The consumer's probes (HEALTH_PORT): what /livez and /readyz say, each condition forced, real processes."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from conftest import Script, run_script, script_env

from config import ConfigError, Settings
from tools.local_redis import LocalRedis, free_port

Start = Callable[..., Script]
STUCK_MS = 1500  # HEALTH_STUCK_MS in these tests; RETRY_MAX_DELAY_MS (probes' longest wait) below it


def probe(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of GET `path`; status 0 when nothing answers within `timeout`."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def poll(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def start_consumer(
    scripts: Start, server: LocalRedis, module: str = "consumer1", **env: str
) -> tuple[Script, int]:
    """A consumer serving its probes, once it says it is ready."""
    assert run_script("initialization_stream", script_env(server.url)).returncode == 0
    port = free_port()
    settings = {
        "HEALTH_PORT": str(port),
        "HEALTH_STUCK_MS": str(STUCK_MS),
        "RETRY_MAX_DELAY_MS": "500",
        **env,
    }
    consumer = scripts(module, script_env(server.url, **settings))
    poll(lambda: probe(port, "/readyz")[0] == 200, "the consumer to be ready")
    return consumer, port


@pytest.mark.slow
def test_a_redis_outage_fails_readiness_but_never_liveness(own_server: LocalRedis, scripts: Start) -> None:
    consumer, port = start_consumer(scripts, own_server)
    assert probe(port, "/livez")[0] == 200
    assert probe(port, "/readyz")[1].startswith("consuming")
    own_server.kill()
    poll(lambda: probe(port, "/readyz")[0] == 503, "readiness to fail")
    # Long past HEALTH_STUCK_MS without a turn of the loop: Redis is away, a restart would not help.
    outage_started = time.monotonic()
    while time.monotonic() - outage_started < 3 * STUCK_MS / 1000:
        status, why = probe(port, "/livez")
        assert status == 200, why
        assert why.startswith("Redis does not answer"), why
        time.sleep(0.1)
    own_server.start()
    poll(lambda: probe(port, "/readyz")[0] == 200, "readiness once Redis is back")
    assert probe(port, "/livez")[0] == 200
    consumer.process.terminate()
    assert consumer.wait() == 0


@pytest.mark.slow
def test_a_stuck_handler_fails_liveness_while_redis_answers(own_server: LocalRedis, scripts: Start) -> None:
    consumer, port = start_consumer(scripts, own_server, "tests.slow_service", HANDLER_MS="600000")
    assert run_script("producer", script_env(own_server.url), "--count", "1").returncode == 0
    poll(lambda: probe(port, "/livez")[0] == 503, "liveness to fail")
    assert probe(port, "/livez")[1].startswith("stuck: no turn of the loop for")
    assert probe(port, "/readyz")[0] == 503
    consumer.kill()


@pytest.mark.slow
def test_a_blocked_event_loop_answers_no_probe(own_server: LocalRedis, scripts: Start) -> None:
    consumer, port = start_consumer(
        scripts, own_server, "tests.slow_service", HANDLER_MS="600000", HANDLER_BLOCKING="1"
    )
    assert run_script("producer", script_env(own_server.url), "--count", "1").returncode == 0
    poll(lambda: probe(port, "/livez", timeout=1)[0] == 0, "the probe to go unanswered")
    consumer.kill()


def test_a_port_in_use_is_one_line_and_exit_1(own_server: LocalRedis) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_script("consumer1", script_env(own_server.url, HEALTH_PORT=str(port)))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"consumer1: error: cannot serve health probes on 127.0.0.1:{port}: Address already in use"
    ]


def test_health_stuck_ms_must_outlast_the_longest_wait_between_turns() -> None:
    with pytest.raises(ConfigError, match="HEALTH_STUCK_MS"):
        Settings.from_env({"HEALTH_PORT": "8080", "HEALTH_STUCK_MS": "30000"})  # probes 37.5 s apart
    assert Settings.from_env({"HEALTH_PORT": "8080"}).health_stuck_ms == 300000
    assert Settings.from_env({"HEALTH_STUCK_MS": "10"}).health_port == 0  # off: not checked
    with pytest.raises(ConfigError, match="HEALTH_PORT"):
        Settings.from_env({"HEALTH_PORT": "70000"})
