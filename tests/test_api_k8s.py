"""The HTTP API's manifests: what is particular to the API. Schemas, hardening, real settings,
probes, checkov and the local run of every Deployment cover it with the rest (tests/test_k8s.py,
tests/test_deploy_run.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.fixtures import cluster as local


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return local.build_overlay(local.OVERLAYS / "production")


def _api(manifests: list[dict]) -> tuple[dict, dict, dict[str, str]]:
    deployment = local.find(manifests, "Deployment", "esp-api")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (ref,) = container["envFrom"]
    return deployment, container, local.find(manifests, "ConfigMap", ref["configMapRef"]["name"])["data"]


def test_api_runs_from_the_worker_image_on_its_declared_port(production: list[dict]) -> None:
    deployment, container, env = _api(production)
    (worker,) = local.find(production, "Deployment", "esp-worker")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == worker["image"] and container["args"] == ["api"]
    assert env["ESP_API_HOST"] == "0.0.0.0" and env["ESP_PROJECT"] != "" and env["ESP_LOG_FORMAT"] == "json"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": int(env["ESP_API_PORT"])}
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > float(env["ESP_API_SHUTDOWN_GRACE_S"])
    account = local.find(production, "ServiceAccount", "esp-api")
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].startswith("esp-api@")


@pytest.mark.parametrize("kind, name", [("Service", "esp-api"), ("PodDisruptionBudget", "esp-api"), ("NetworkPolicy", "esp-api-ingress"), ("PodMonitoring", "esp-api")])
def test_api_companions_select_the_api_pods(production: list[dict], kind: str, name: str) -> None:
    labels = local.find(production, "Deployment", "esp-api")["spec"]["template"]["metadata"]["labels"]
    spec = local.find(production, kind, name)["spec"]
    selector = spec.get("selector") or spec["podSelector"]
    assert selector.get("matchLabels", selector).items() <= labels.items()


def test_api_autoscales_and_opens_only_its_port(production: list[dict]) -> None:
    hpa = local.find(production, "HorizontalPodAutoscaler", "esp-api")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "esp-api" and hpa["minReplicas"] >= 2
    policy = local.find(production, "NetworkPolicy", "esp-api-ingress")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [8080]
    labels = local.find(production, "Deployment", "esp-api")["spec"]["template"]["metadata"]["labels"]
    # Egress through the shared rules: TF Serving's gRPC port, and Pub/Sub for suggested scores.
    assert labels["esp-tf-serving-client"] == "true" and labels["esp-google-apis"] == "true"
    service = local.find(production, "Service", "esp-api")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service] == [(80, "http")]


def _api_lists(manifests: list[dict]) -> dict[str, list[dict]]:
    spec = local.find(manifests, "Deployment", "esp-api")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return {"env": container.get("env", []), "volumeMounts": container.get("volumeMounts", []), "volumes": spec.get("volumes", [])}


@pytest.mark.parametrize("variant", local.variants(), ids=local.variant_id)
def test_the_api_keys_patch_of_the_docs_mounts_the_keys_and_keeps_the_rest(variant: tuple) -> None:
    """docs/api.md's `patches:` block, added to an overlay as the page says: the keys file is where
    ESP_API_KEYS_FILE points, from the Secret the page's command creates, and every env entry,
    mount and volume the overlay and its component had (the tls component's CA) is still there."""
    text = (local.ROOT / "docs" / "api.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "ESP_API_KEYS_FILE" in b]
    secret, key = re.search(r"create secret generic (\S+) --from-file=([^=\s]+)=", text).groups()
    before = _api_lists(local.build_variant(variant))
    after = _api_lists(local.build_variant(variant, patches=yaml.safe_load(block)["patches"]))
    for field, items in before.items():
        lost = [item for item in items if item not in after[field]]
        assert not lost, f"the patch drops {field} {lost}"
    keys_file = Path(next(e["value"] for e in after["env"] if e["name"] == "ESP_API_KEYS_FILE"))
    (mount,) = [m for m in after["volumeMounts"] if Path(m["mountPath"]) == keys_file.parent]
    (volume,) = [v for v in after["volumes"] if v["name"] == mount["name"]]
    assert (volume["secret"]["secretName"], keys_file.name) == (secret, key)
