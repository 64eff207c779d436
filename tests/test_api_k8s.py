"""The HTTP API's manifests: what is particular to the API. Schemas, hardening, real settings,
probes, checkov and the local run of every Deployment cover it with the rest (tests/test_k8s.py,
tests/test_deploy_run.py)."""

from __future__ import annotations

import pytest

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
