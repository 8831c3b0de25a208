"""The deployment files checked as far as reading them goes: hadolint for the Dockerfile,
kubernetes-validate for the manifests, and what the compose file and the manifests promise (each
command a real script, the right user for each service, probes on the port the consumer serves,
KEDA's numbers and names). test_image.py runs them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, run_script, script_env, unavailable
from deployment import (
    K8S,
    PASSWORDS,
    compose,
    config_maps,
    container_env,
    manifests,
    pipeline_services,
    pod_spec,
    resource,
    secret_keys,
    service_env,
)

from config import Settings

DEFAULTS = Settings.from_env({})
GROUP_OF = {"consumer1": DEFAULTS.fulfillment_group, "consumer2": DEFAULTS.email_group}
VALIDATE_VERSIONS = ("1.29.0", "1.37.0")  # the oldest Kubernetes still commonly run, and the newest
# What KEDA's redis-streams trigger reads (keda.sh/docs/latest/scalers/redis-streams/).
KEDA_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv",
    "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount",
    "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex",
}  # fmt: skip


def tool(name: str) -> str:
    """A tool installed beside this Python (requirements-dev.txt)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        unavailable(f"{name} is not installed (pip install -r requirements-dev.txt)")
    return found


def workloads() -> list[dict[str, Any]]:
    return [
        doc
        for docs in manifests().values()
        for doc in docs
        if doc["kind"] in ("Deployment", "Job", "CronJob")
    ]


def module_of(command: list[str]) -> str:
    assert command[:2] == ["python", "-m"], command
    return command[2]


def user_of(url: str) -> str:
    match = re.match(r"redis://(\w+):", url)
    assert match is not None, "no user in the URL"
    return match[1]


def pod_env(workload: dict[str, Any]) -> dict[str, str]:
    (container,) = pod_spec(workload)["containers"]
    return container_env(container, "a-pod-name", config_maps(), PASSWORDS)


# The Dockerfile


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_takes_runtime_dependencies_and_the_code_only() -> None:
    dockerfile = "\n".join(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#")
    )
    assert "requirements.txt" in dockerfile
    assert "requirements-dev" not in dockerfile
    assert re.search(r"^ARG BASE=python:3\.11-slim", dockerfile, re.M), "Python 3.11, as tested"
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M), "a numeric user runAsNonRoot can check"
    assert re.search(r'^CMD \["python", "-m", "\w+"\]$', dockerfile, re.M), "exec form: the service is PID 1"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") :][:1] == ["*"], "an allow-list: .env and .git never reach a build"


# docker-compose.yaml


def test_a_plain_compose_up_still_starts_redis_alone() -> None:
    always = {name for name, service in compose()["services"].items() if "profiles" not in service}
    assert always == {"redis"}, "./dev.sh demo and the README run `docker compose up -d --wait`"


def test_the_pipeline_profile_runs_each_service_as_its_user() -> None:
    services = pipeline_services()
    users = {
        name: user_of(service_env(service, PASSWORDS)["REDIS_URL"]) for name, service in services.items()
    }
    assert users == {
        "init": "admin",  # loads the function library
        "fulfillment": "consumer",
        "email": "consumer",
        "maintenance": "admin",  # trims: the consumer user may not
        "dashboard": "admin",
    }
    for service in services.values():
        for value in service["environment"].values():
            assert not re.search(r"://\w+:(?!\$\{)", str(value)), "a password in the compose file"
    assert services["fulfillment"]["deploy"]["replicas"] == 2
    assert services["init"]["restart"] == "no"
    for name in ("fulfillment", "email", "maintenance", "dashboard"):
        # Started once the stream and groups exist; `up --wait` then accepts init's exit.
        assert services[name]["depends_on"]["init"] == {"condition": "service_completed_successfully"}


def test_every_pipeline_command_is_a_script_that_takes_help() -> None:
    services = pipeline_services()
    commands = {name: service["command"] for name, service in services.items()}
    maintenance = commands.pop("maintenance")
    assert maintenance[:2] == ["sh", "-c"]
    assert "python -m maintenance" in maintenance[2]
    assert services["maintenance"]["init"] is True, "SIGTERM must reach the shell loop"
    modules = {module_of(command) for command in commands.values()} | {"maintenance"}
    for module in sorted(modules):
        result = run_script(module, script_env("redis://127.0.0.1:1/0"), "--help")
        assert result.returncode == 0, (module, result.stderr)


def test_consumers_report_health_on_the_port_their_healthcheck_asks() -> None:
    for name in ("fulfillment", "email"):
        service = pipeline_services()[name]
        env = service_env(service, PASSWORDS)
        check = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{env['HEALTH_PORT']}/readyz" in check
        assert env["MAINTENANCE_INTERVAL_MS"] == "0", "the maintenance service trims, as the admin"
        assert "CONSUMER_NAME" not in env, "empty: each replica's host name and pid"
        Settings.from_env(env)  # the settings it is given are valid
        assert int(service["stop_grace_period"].rstrip("s")) >= 10


def test_the_dashboard_stays_on_loopback_with_its_host_check() -> None:
    dashboard = pipeline_services()["dashboard"]
    assert dashboard["network_mode"] == "host"
    command = dashboard["command"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "ports" not in dashboard


# deploy/k8s


@pytest.mark.parametrize("version", VALIDATE_VERSIONS)
def test_the_manifests_validate_against_kubernetes(version: str) -> None:
    files = [str(K8S / name) for name in manifests()]
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *files],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"^INFO .* passed for resource (\S+)", result.stdout, re.M)
    assert len(passed) == sum(doc["kind"] != "ScaledObject" for docs in manifests().values() for doc in docs)


def test_the_validator_rejects_a_misspelled_field(tmp_path: Path) -> None:
    """The check above can fail: a manifest with one field misspelled does not pass."""
    broken = tmp_path / "broken.yaml"
    broken.write_text((K8S / "fulfillment.yaml").read_text().replace("readinessProbe:", "readynessProbe:"))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(broken)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0


def test_the_kustomization_takes_every_manifest_and_the_secret_every_key_used() -> None:
    listed = set(manifests())
    assert listed == {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    used = {
        item["valueFrom"]["secretKeyRef"]["key"]
        for workload in workloads()
        for container in pod_spec(workload)["containers"]
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    assert used == secret_keys() == {"REDIS_ADMIN_PASSWORD", "CONSUMER_PASSWORD"}
    assert "deploy/k8s/redis-passwords.env" in (ROOT / ".gitignore").read_text().split()
    for line in (K8S / "redis-passwords.env.example").read_text().splitlines():
        assert line.startswith("#") or line.endswith("="), "no password in the repository"


def test_every_workload_runs_a_script_as_its_user_without_privileges() -> None:
    expected = {
        "orders-init": ("initialization_stream", "admin"),
        "orders-fulfillment": ("consumer1", "consumer"),
        "orders-email": ("consumer2", "consumer"),
        "orders-maintenance": ("maintenance", "admin"),
    }
    found = {}
    for workload in workloads():
        spec = pod_spec(workload)
        (container,) = spec["containers"]
        env = pod_env(workload)
        user = user_of(env["REDIS_URL"])
        password = PASSWORDS["REDIS_ADMIN_PASSWORD" if user == "admin" else "CONSUMER_PASSWORD"]
        assert env["REDIS_URL"] == f"redis://{user}:{password}@redis:6379/0"  # the ConfigMap's address
        found[workload["metadata"]["name"]] = (module_of(container["command"]), user)
        Settings.from_env(env)
        assert container["image"] == "orders-redis-streams"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert "limits" in container["resources"]
    assert found == expected
    for module, _ in expected.values():
        assert run_script(module, script_env("redis://127.0.0.1:1/0"), "--help").returncode == 0


@pytest.mark.parametrize("name", ["orders-fulfillment", "orders-email"])
def test_each_consumer_pod_has_its_own_name_and_probes_that_mean_something(name: str) -> None:
    deployment = resource("Deployment", name)
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    env = pod_env(deployment)
    assert env["CONSUMER_NAME"] == "a-pod-name", "the pod's name (downward API): unique per pod"
    settings = Settings.from_env(env)
    assert settings.maintenance_interval_ms == 0, "the CronJob trims, as the admin"
    assert settings.health_host == "0.0.0.0", "the kubelet probes the pod's IP"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["health"] == settings.health_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["timeoutSeconds"] > 2, "above the probe's own PING timeout (core/health.py)"
    # SIGTERM waits for the blocking read, then finishes at most two batches.
    assert spec["terminationGracePeriodSeconds"] >= 30 + settings.block_ms / 1000
    assert "replicas" not in deployment["spec"], "KEDA's HPA sets them; an applied number would fight it"
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "a new pod is ready before an old one stops"


def test_maintenance_is_scheduled_as_the_admin_and_never_overlaps() -> None:
    cron = resource("CronJob", "orders-maintenance")
    assert cron["spec"]["schedule"] == "* * * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    settings = Settings.from_env(pod_env(cron))
    assert settings.stale_consumer_ms <= 3_600_000, "pods come and go: their names should not pile up"


def test_a_keda_scaled_object_per_group_in_lag_mode() -> None:
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in manifests()["scaledobjects.yaml"]}
    consumers = {d["metadata"]["name"] for d in workloads() if d["kind"] == "Deployment"}
    assert set(scaled) == consumers
    for name, doc in scaled.items():
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        deployment = resource("Deployment", name)
        (container,) = pod_spec(deployment)["containers"]
        env = pod_env(deployment)
        settings = Settings.from_env(env)
        (trigger,) = doc["spec"]["triggers"]
        assert trigger["type"] == "redis-streams"
        metadata = trigger["metadata"]
        assert set(metadata) <= KEDA_KEYS, set(metadata) - KEDA_KEYS
        assert all(isinstance(value, str) for value in metadata.values()), "KEDA's metadata are strings"
        assert "lagCount" in metadata
        assert "pendingEntriesCount" not in metadata
        assert metadata["stream"] == settings.stream_key
        assert metadata["consumerGroup"] == GROUP_OF[module_of(container["command"])]
        for key in ("addressFromEnv", "usernameFromEnv", "passwordFromEnv"):
            assert metadata[key] in env, f"KEDA reads {metadata[key]} from the Deployment's environment"
        assert env["REDIS_URL"] == (
            f"redis://{env[metadata['usernameFromEnv']]}:{env[metadata['passwordFromEnv']]}"
            f"@{env[metadata['addressFromEnv']]}/0"
        ), "KEDA connects where the consumers do, as their user"
        assert int(metadata["lagCount"]) > settings.batch_size, "one read's worth of new orders is no backlog"
        assert 1 <= doc["spec"]["minReplicaCount"] <= doc["spec"]["maxReplicaCount"]


def test_each_keda_number_says_why_in_a_comment() -> None:
    lines = (K8S / "scaledobjects.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"\s*(minReplicaCount|maxReplicaCount|lagCount):", line):
            assert lines[index - 1].strip().startswith("#"), f"no reason given above: {line.strip()}"
