"""The deployment files read as their tools read them: compose's services and variables, Kubernetes
manifests and a container's environment as the kubelet builds it. Shared by test_deploy.py (the
files checked) and test_image.py (the files run with podman)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# Letters and digits, as the compose file and redis-passwords.env.example ask: they go into URLs.
PASSWORDS = {
    "REDIS_ADMIN_PASSWORD": "adm1nPw0rd",
    "PRODUCER_PASSWORD": "pr0ducerPw0rd",
    "CONSUMER_PASSWORD": "c0nsumerPw0rd",
}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    return loaded


def pipeline_services() -> dict[str, dict[str, Any]]:
    """The services of the compose profile "pipeline", their anchors merged in."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if "pipeline" in service.get("profiles", [])
    }


def interpolate(value: str, variables: dict[str, str]) -> str:
    """What compose makes of ${NAME}, ${NAME:?message}, ${NAME:-default} and $$ in `value`."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, kind, rest = match["name"], match["kind"], match["rest"]
        if variables.get(name):
            return variables[name]
        if kind == ":-":
            return rest or ""
        raise AssertionError(f"compose stops: {name} is not set ({rest})")

    pattern = r"(?P<escaped>\$\$)|\$\{(?P<name>\w+)(?:(?P<kind>:[?-])(?P<rest>[^}]*))?\}"
    return re.sub(pattern, one, value)


def service_env(service: dict[str, Any], variables: dict[str, str]) -> dict[str, str]:
    return {
        name: interpolate(str(value), variables) for name, value in service.get("environment", {}).items()
    }


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every resource in deploy/k8s, by file name; the kustomization lists them."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {
        name: [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
        for name in kustomization["resources"]
    }


def resource(kind: str, name: str) -> dict[str, Any]:
    for docs in manifests().values():
        for doc in docs:
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod template's spec of a Deployment, a Job or a CronJob."""
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    found: dict[str, Any] = spec["template"]["spec"]
    return found


def secret_keys() -> set[str]:
    """The keys of the Secret kustomize generates from redis-passwords.env (its example lists them)."""
    lines = (K8S / "redis-passwords.env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if re.match(r"^[A-Z_]+=", line)}


def container_env(
    container: dict[str, Any], pod_name: str, configs: dict[str, dict[str, str]], secrets: dict[str, str]
) -> dict[str, str]:
    """The environment the kubelet gives `container`: envFrom first, then env in order, $(NAME)
    expanded from what is defined before it."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configs[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda match: env.get(match[1], match[0]), str(item["value"]))
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            value = configs[ref["name"]][ref["key"]]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "orders-redis", ref
            value = secrets[ref["key"]]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", item
            value = pod_name
        env[item["name"]] = value
    return env


def config_maps() -> dict[str, dict[str, str]]:
    return {
        doc["metadata"]["name"]: dict(doc["data"])
        for docs in manifests().values()
        for doc in docs
        if doc["kind"] == "ConfigMap"
    }
