"""The HTTP API's manifests: built by kustomize with the rest, hardened like the worker, wired to real settings.

The schema check of every core resource (tests/test_k8s.py) covers these too; this checks what is
particular to the API.
"""

from __future__ import annotations

import pytest

from esp.settings import ALL_GROUPS, describe
from esp.settings.api import ApiSettings
from tests.test_k8s import _by_kind, manifests  # noqa: F401 - the shared kustomize build fixture


def _api_container(manifests: list[dict]) -> tuple[dict, dict]:  # noqa: F811
    spec = _by_kind(manifests, "Deployment", "esp-api")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def test_api_runs_from_the_worker_image_with_the_workers_hardening(manifests: list[dict]) -> None:  # noqa: F811
    spec, container = _api_container(manifests)
    worker_spec = _by_kind(manifests, "Deployment", "esp-worker")["spec"]["template"]["spec"]
    (worker,) = worker_spec["containers"]
    assert container["image"] == worker["image"] and container["args"] == ["api"]
    assert spec["securityContext"] == worker_spec["securityContext"]
    assert container["securityContext"] == worker["securityContext"]
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    assert spec["automountServiceAccountToken"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    grace = next(s.default for s in describe(ApiSettings) if s.name == "api_shutdown_grace_s")
    assert spec["terminationGracePeriodSeconds"] > grace
    assert container["ports"][0]["containerPort"] == int(_api_env(manifests)["ESP_API_PORT"])
    (mount,) = container["volumeMounts"]
    assert mount["readOnly"] and next(v for v in spec["volumes"] if v["name"] == mount["name"])["secret"]["optional"]


def _api_env(manifests: list[dict]) -> dict[str, str]:  # noqa: F811
    _, container = _api_container(manifests)
    (ref,) = container["envFrom"]
    return _by_kind(manifests, "ConfigMap", ref["configMapRef"]["name"])["data"]


def test_api_env_uses_only_real_settings(manifests: list[dict]) -> None:  # noqa: F811
    known = {s.env for group in ALL_GROUPS for s in describe(group)}
    env = _api_env(manifests)
    assert not sorted(set(env) - known)
    assert env["ESP_API_HOST"] == "0.0.0.0" and env["ESP_LOG_FORMAT"] == "json"
    tf_port = _by_kind(manifests, "Service", "tf-serving")["spec"]["ports"][0]["port"]
    assert env["ESP_MODEL_SERVER"] == f"tf-serving:{tf_port}"


@pytest.mark.parametrize("kind", ["Service", "PodDisruptionBudget", "NetworkPolicy"])
def test_api_companions_select_the_api_pods(manifests: list[dict], kind: str) -> None:  # noqa: F811
    labels = _by_kind(manifests, "Deployment", "esp-api")["spec"]["template"]["metadata"]["labels"]
    resource = _by_kind(manifests, kind, "esp-api")["spec"]
    selector = resource.get("selector") or resource["podSelector"]
    selector = selector.get("matchLabels", selector)
    assert selector.items() <= labels.items()


def test_api_autoscales_and_may_reach_only_what_it_needs(manifests: list[dict]) -> None:  # noqa: F811
    hpa = _by_kind(manifests, "HorizontalPodAutoscaler", "esp-api")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "esp-api" and hpa["minReplicas"] >= 2
    policy = _by_kind(manifests, "NetworkPolicy", "esp-api")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [8080]
    to_tf = [rule for rule in policy["egress"] if any(t.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "tf-serving" for t in rule["to"])]
    assert [p["port"] for rule in to_tf for p in rule["ports"]] == [8500]
