"""The service image, built from the Dockerfile with podman, run as compose and Kubernetes run it.

No Docker engine and no image registry here: podman builds on a Debian 12 base made locally
(scripts/base-image.sh, cached outside the repository) and runs each container on the host's
network against a redis-server on 127.0.0.1, which has the ACL users of redis/users.acl.template.
"""

from __future__ import annotations

import functools
import json
import os
import resource as limits
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, need_redis_server, run_script, script_env, unavailable
from deployment import (
    PASSWORDS,
    compose,
    config_maps,
    container_env,
    pipeline_services,
    pod_spec,
    resource,
    service_env,
)

import redis
from tools.local_redis import LocalRedis, free_port, server_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the first build bootstraps its base

# runc: Debian 12's crun refuses a machine with cgroup v1 and v2 mounted side by side (hybrid).
PODMAN = ["podman", "--runtime", "runc"]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
GROUPS = ("fulfillment_group", "email_group")


def run_flags() -> list[str]:
    """Host networking (Redis is on 127.0.0.1), and limits this machine allows: by default podman
    asks for more open files and processes than the hard limits here, which root without
    CAP_SYS_RESOURCE may not raise."""
    hard = limits.getrlimit(limits.RLIMIT_NOFILE)[1]
    nofile = hard if 0 < hard < 65536 else 65536
    return ["--network", "host", "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image built from the Dockerfile on the local base; its id."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        unavailable("podman and runc are not installed (apt-get install podman runc debootstrap)")
    base = subprocess.run(
        ["bash", str(ROOT / "scripts" / "base-image.sh")],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert base.returncode == 0, base.stderr[-3000:]
    iid = tmp_path_factory.mktemp("image") / "iid"
    build = ["build", "--network", "host", "--build-arg", f"BASE={base.stdout.strip()}"]
    build += ["--iidfile", str(iid), "--tag", "localhost/orders-redis-streams:test"]
    if CA_BUNDLE.is_file():  # pip in the build trusts what this machine trusts (a TLS-inspecting proxy)
        build += ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    built = podman(*build, str(ROOT), timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return iid.read_text().strip()


class Containers:
    """Containers of one test, from one image; every one left is removed at the end."""

    def __init__(self, image: str, tmp_path: Path) -> None:
        self.image, self.tmp_path = image, tmp_path
        self.prefix = f"orders-test-{os.getpid()}-{tmp_path.name}"[:60]
        self.names: list[str] = []

    def _env_file(self, name: str, env: dict[str, str]) -> str:
        path = self.tmp_path / f"{name}.env"
        path.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
        return str(path)

    def start(self, name: str, argv: list[str], env: dict[str, str], *flags: str) -> str:
        """Start a container in the background; its full name."""
        full = f"{self.prefix}-{name}"
        self.names.append(full)
        started = podman(
            "run", "-d", "--name", full, *run_flags(), "--env-file", self._env_file(name, env), *flags,
            self.image, *argv,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        return full

    def run(self, argv: list[str], env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
        """Run a container to its end (a one-shot job)."""
        name = f"once-{len(self.names)}"
        env_file = self._env_file(name, env)
        return podman("run", "--rm", *run_flags(), "--env-file", env_file, *flags, self.image, *argv)

    def logs(self, name: str) -> str:
        shown = podman("logs", name)
        return shown.stdout + shown.stderr

    def exec(self, name: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return podman("exec", name, *argv, timeout=30)

    def stop(self, name: str, grace_s: int) -> tuple[int, float]:
        """SIGTERM to the container's PID 1, SIGKILL after `grace_s`: (its exit code, seconds it took)."""
        started = time.monotonic()
        stopped = podman("stop", "--time", str(grace_s), name, timeout=grace_s + 60)
        assert stopped.returncode == 0, stopped.stderr
        took = time.monotonic() - started
        code = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        return int(code), took

    def processes(self, name: str) -> list[list[str]]:
        """[pid, ppid, user, args] of each process in the container."""
        shown = podman("top", name, "pid", "ppid", "user", "args")
        assert shown.returncode == 0, shown.stderr
        return [line.strip().split(None, 3) for line in shown.stdout.splitlines()[1:]]

    def close(self) -> None:
        for name in self.names:
            podman("rm", "--force", "--time", "0", name)


@pytest.fixture
def containers(image: str, tmp_path: Path) -> Iterator[Containers]:
    made = Containers(image, tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[int]:
    """Redis started as compose's redis service starts it (redis/start.sh renders the ACL users,
    then its command), on a free loopback port; docker-entrypoint.sh is a shim that runs Redis."""
    need_redis_server()
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "docker-entrypoint.sh").write_text(f'#!/bin/sh\nshift\nexec {server_binary()} "$@"\n')
    (shim / "docker-entrypoint.sh").chmod(0o755)
    port = free_port()
    command = compose()["services"]["redis"]["command"]
    env = {
        **os.environ,
        **PASSWORDS,
        "PATH": f"{shim}:{os.environ['PATH']}",
        "ACL_FILE": str(tmp_path / "acl"),
    }
    process = subprocess.Popen(
        ["sh", str(ROOT / "redis" / "start.sh"), *command, "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(tmp_path), "--logfile", "redis.log"],
        env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: _answers(port), "Redis to start")
        yield port
    finally:
        process.terminate()
        process.wait(10)


def _answers(port: int) -> bool:
    try:
        return bool(
            redis.Redis(port=port, username="admin", password=PASSWORDS["REDIS_ADMIN_PASSWORD"]).ping()
        )
    except redis.RedisError:
        return False


def admin(port: int) -> redis.Redis:
    return redis.Redis(port=port, username="admin", password=PASSWORDS["REDIS_ADMIN_PASSWORD"])


def wait_for(check: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def caught_up(client: redis.Redis, groups: tuple[str, ...]) -> bool:
    """Each group was delivered the newest entry and acked everything (ids, not lag)."""
    try:
        last = client.xinfo_stream("orders")["last-generated-id"]
        infos = {g["name"]: g for g in client.xinfo_groups("orders")}
    except redis.ResponseError:
        return False
    wanted = [infos.get(group.encode()) for group in groups]
    return all(g is not None and g["pending"] == 0 and g["last-delivered-id"] == last for g in wanted)


def consumers_of(client: redis.Redis, group: str) -> set[str]:
    return {c["name"].decode() for c in client.xinfo_consumers("orders", group)}


def passes(containers: Containers, name: str, check: list[str]) -> bool:
    return containers.exec(name, check).returncode == 0


def answers_200(url: str) -> bool:
    return http_get(url)[0] == 200


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


# 1. The image alone


def test_the_image_runs_as_a_non_root_user_with_runtime_dependencies_only(image: str) -> None:
    config = json.loads(podman("inspect", image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    shown = podman("run", "--rm", *run_flags(), image, "python", "-m", "pip", "list", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    installed = {package["name"].lower() for package in json.loads(shown.stdout)}
    assert {"redis", "msgspec", "aiohttp"} <= installed
    assert not installed & {"pytest", "mypy", "ruff", "playwright"}, "development packages in the image"
    listed = podman("run", "--rm", *run_flags(), image, "sh", "-c", "ls -a /app; id -u")
    assert ".env" not in listed.stdout.split()
    assert "tests" not in listed.stdout.split()
    assert listed.stdout.split()[-1] == "10001"


def test_sigterm_to_the_container_finishes_the_batch_in_hand_and_ends_the_lease_keeper(
    containers: Containers, own_server: LocalRedis
) -> None:
    """The consumer is PID 1 (exec form): SIGTERM reaches it, it finishes its orders, and its lease
    keeper (which ignores SIGTERM) is told to stop and releases the lease before the exit."""
    assert run_script("initialization_stream", script_env(own_server.url)).returncode == 0
    env = {
        "REDIS_URL": own_server.url, "CONSUMER_NAME": "slow-1", "HANDLER_MS": "300",
        "BATCH_SIZE": "10", "BLOCK_MS": "200",
    }  # fmt: skip
    tests = f"{ROOT / 'tests'}:/app/tests:ro"  # the slow test service, beside the image's code
    name = containers.start("slow", ["python", "-m", "tests.slow_service"], env, "--volume", tests)
    client = redis.Redis.from_url(own_server.url)
    wait_for(lambda: "slow-1" in consumers_of(client, "fulfillment_group"), "the consumer to read")
    tree = containers.processes(name)
    assert tree[0][:3] == ["1", "0", "orders"], tree
    assert tree[0][3].endswith("-m tests.slow_service"), tree
    assert any(row[1] == "1" and row[3].endswith("-m core.lease") for row in tree), tree
    lease = "{orders}:lease:fulfillment_group:slow-1"
    assert client.exists(lease)
    published = run_script("producer", script_env(own_server.url), "--count", "5")
    assert published.returncode == 0, published.stderr
    wait_for(lambda: client.xpending("orders", "fulfillment_group")["pending"] == 5, "the batch in hand")
    code, took = containers.stop(name, grace_s=30)
    assert code == 0, containers.logs(name)
    assert took < 20, f"stopped after {took:.1f}s: SIGTERM did not reach the consumer"
    assert containers.logs(name).count("ran order") == 5
    assert client.xpending("orders", "fulfillment_group")["pending"] == 0
    assert not client.exists(lease), "the keeper did not release the lease: it was killed, not stopped"


# 2. docker-compose.yaml's pipeline


def test_the_compose_pipeline_runs_as_compose_would_start_it(containers: Containers, acl_redis: int) -> None:
    """Each service of the profile with its command and environment (passwords interpolated, the
    host `redis` being 127.0.0.1 here), each replica with its own host name as compose gives it."""
    services = pipeline_services()
    assert set(services) == {"init", "fulfillment", "email", "maintenance", "dashboard"}

    def container_args(name: str, hostname: str) -> tuple[list[str], dict[str, str], list[str]]:
        service = services[name]
        env = service_env(service, PASSWORDS)
        env["REDIS_URL"] = env["REDIS_URL"].replace("@redis:6379/", f"@127.0.0.1:{acl_redis}/")
        env["REDIS_URL"] = env["REDIS_URL"].replace("@127.0.0.1:6379/", f"@127.0.0.1:{acl_redis}/")
        flags = ["--hostname", hostname, *(["--init"] if service.get("init") else [])]
        return list(service["command"]), env, flags

    argv, env, flags = container_args("init", "init")
    done = containers.run(argv, env, *flags)
    assert done.returncode == 0, done.stdout + done.stderr
    health: dict[str, tuple[str, list[str]]] = {}  # container: (its health port, the healthcheck)
    for name in ("fulfillment", "email"):
        for replica in range(1, services[name].get("deploy", {}).get("replicas", 1) + 1):
            argv, env, flags = container_args(name, f"{name}-{replica}")
            port = str(free_port())  # on the host's network each needs its own
            check = [part.replace(env["HEALTH_PORT"], port) for part in services[name]["healthcheck"]["test"]]
            env["HEALTH_PORT"] = port
            health[containers.start(f"{name}-{replica}", argv, env, *flags)] = (port, check[1:])
    assert len(health) == 3, "fulfillment scaled to two, email one"
    argv, env, flags = container_args("maintenance", "maintenance")
    maintenance = containers.start("maintenance", argv, env, *flags)
    argv, env, flags = container_args("dashboard", "dashboard")
    page = str(free_port())
    argv = [page if part == "8090" else part for part in argv]
    containers.start("dashboard", argv, env, *flags)

    for name, (_, check) in health.items():  # the compose healthcheck, run in the container
        wait_for(functools.partial(passes, containers, name, check), f"{name} healthy")
    producer = f"redis://producer:{PASSWORDS['PRODUCER_PASSWORD']}@127.0.0.1:{acl_redis}/0"
    published = run_script("producer", script_env(producer), "--count", "30")
    assert published.returncode == 0, published.stderr
    client = admin(acl_redis)
    wait_for(lambda: caught_up(client, GROUPS), "both groups to handle every order")
    # Each replica a consumer of its own: its container's host name and pid (1, as PID 1).
    assert consumers_of(client, "fulfillment_group") == {"fulfillment-1-1", "fulfillment-2-1"}
    assert consumers_of(client, "email_group") == {"email-1-1"}
    handled = "".join(containers.logs(name) for name in health if "-fulfillment-" in name)
    assert handled.count("fulfilling order") == 30
    wait_for(lambda: "trimmed" in containers.logs(maintenance), "maintenance to run as the admin")
    status, body = http_get(f"http://127.0.0.1:{page}/api/status")
    assert status == 200, body
    assert {group["name"] for group in json.loads(body)["report"]["groups"]} == set(GROUPS)

    grace = int(services["fulfillment"]["stop_grace_period"].rstrip("s"))
    for name in health:
        code, took = containers.stop(name, grace)
        assert code == 0, (name, containers.logs(name)[-2000:])
        assert took < grace, (name, took)
    _, took = containers.stop(maintenance, 10)
    assert took < 5, "the maintenance loop ignored SIGTERM"


# 3. deploy/k8s


def test_the_kubernetes_containers_run_as_their_manifests_say(containers: Containers, acl_redis: int) -> None:
    """Each workload's container as the kubelet would run it: its command, its environment (the
    ConfigMap, the Secret, the pod's name, $(NAME) expanded), its securityContext (read-only root
    file system, no capabilities, its user), its probes, its grace period."""
    configs = config_maps()
    configs["orders-config"]["REDIS_ADDRESS"] = f"127.0.0.1:{acl_redis}"

    def pod(
        workload: dict[str, Any], pod_name: str
    ) -> tuple[list[str], dict[str, str], list[str], dict[str, Any]]:
        spec = pod_spec(workload)
        (container,) = spec["containers"]
        env = container_env(container, pod_name, configs, PASSWORDS)
        security, own = spec["securityContext"], container["securityContext"]
        assert security["runAsNonRoot"] is True
        flags = ["--hostname", pod_name, "--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
        if own.get("readOnlyRootFilesystem"):
            flags += ["--read-only", "--read-only-tmpfs=false"]  # no writable /tmp either
        flags += [flag for cap in own["capabilities"]["drop"] for flag in ("--cap-drop", cap)]
        if own.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        return list(container["command"]), env, flags, container

    argv, env, flags, _ = pod(resource("Job", "orders-init"), "orders-init-x7k2p")
    done = containers.run(argv, env, *flags)
    assert done.returncode == 0, done.stdout + done.stderr

    deployment = resource("Deployment", "orders-fulfillment")
    pod_name = "orders-fulfillment-5d8f9c7b6-q4wzt"
    argv, env, flags, container = pod(deployment, pod_name)
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "health"]
    assert env["HEALTH_PORT"] == str(port)
    assert env["HEALTH_HOST"] == "0.0.0.0"
    env["HEALTH_PORT"] = str(free_port())  # on the host's network, not 8080 for everyone
    name = containers.start("fulfillment", argv, env, *flags)
    probes = {probe: container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe")}
    for path in probes.values():
        url = f"http://127.0.0.1:{env['HEALTH_PORT']}{path}"
        wait_for(functools.partial(answers_200, url), f"{path} to answer 200")
    producer = f"redis://producer:{PASSWORDS['PRODUCER_PASSWORD']}@127.0.0.1:{acl_redis}/0"
    assert run_script("producer", script_env(producer), "--count", "20").returncode == 0
    client = admin(acl_redis)
    wait_for(lambda: caught_up(client, ("fulfillment_group",)), "the pod to handle every order")
    assert consumers_of(client, "fulfillment_group") == {pod_name}
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    code, took = containers.stop(name, grace)
    assert code == 0, containers.logs(name)[-2000:]
    assert took < grace, took
    assert "SIGTERM: finishing the batches in hand" in containers.logs(name)

    argv, env, flags, _ = pod(resource("CronJob", "orders-maintenance"), "orders-maintenance-29061234-abcde")
    done = containers.run(argv, env, *flags)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("trimmed ")
