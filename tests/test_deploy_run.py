"""The production manifests, run: every Deployment of every overlay started on this machine as
the manifests describe it (tests/fixtures/cluster.py), against the Pub/Sub emulator.

It fails the moment a manifest and the code disagree on a port, a path, an env var or a flag:
every declared probe, container port and scrape endpoint must answer as declared, a comment
published to the manifests' topic must come back scored, every pod must reach what it needs
through the NetworkPolicies, the worker's Pub/Sub calls must be allowed by the IAM roles that
docs/deploy.md grants it, and SIGTERM must end every container cleanly inside its grace period.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from esp.contracts import Comment
from esp.localstack import wait_until
from esp.settings import PubSubSettings, from_env
from serving.client import health_check
from tests.fixtures import cluster as local
from tests.fixtures import iam, monitoring, netpol
from tests.fixtures.pubsub import create_subscription, pull_until

START_TIMEOUT_S = 240.0
GMP_COLLECTOR = netpol.Peer.pod("gmp-system", {"app.kubernetes.io/name": "collector"})


def _stage_gcs(manifests: list[dict], model_base: Path) -> Path:
    """A local stand-in for the buckets that ConfigMaps name (gs://BUCKET/PATH), holding the test
    model under every version a models.config asks for."""
    gcs = local.scratch_dir("gcs")
    versions = sorted(int(p.name) for p in model_base.iterdir() if p.name.isdigit())
    for cm in local.of_kind(manifests, "ConfigMap"):
        for text in cm.get("data", {}).values():
            for block in re.findall(r"config\s*\{.*?\n  \}", text, re.S):
                m = re.search(r'base_path:\s*"gs://([^"]+)"', block)
                if not m:
                    continue
                wanted = [int(v) for v in re.findall(r"versions:\s*(\d+)", block)] or versions
                for version in wanted:
                    target = gcs / m.group(1) / str(version)
                    if not target.exists():
                        shutil.copytree(model_base / str(versions[-1]), target)
    for dirpath, dirnames, filenames in os.walk(gcs):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return gcs


def _configmap_env(manifests: list[dict], deployment: str) -> dict[str, str]:
    env: dict[str, str] = {}
    spec = local.find(manifests, "Deployment", deployment)["spec"]["template"]["spec"]
    for container in spec["containers"]:
        for ref in container.get("envFrom", []):
            env.update(local.find(manifests, "ConfigMap", ref["configMapRef"]["name"]).get("data", {}))
    return env


def _backends_first(manifests: list[dict]) -> list[str]:
    """Deployments that some Service selects start first: their clients then find them up."""
    selectors = [s["spec"].get("selector", {}) for s in local.of_kind(manifests, "Service")]
    first = []
    for d in local.of_kind(manifests, "Deployment"):
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        if any(sel and all(labels.get(k) == v for k, v in sel.items()) for sel in selectors):
            first.append(d["metadata"]["name"])
    return first


@pytest.fixture(scope="module", params=local.variants(), ids=local.variant_id)
def cluster(request: pytest.FixtureRequest, emulator, test_model_base: Path) -> Iterator[local.LocalCluster]:
    manifests = local.build_variant(request.param)
    gcs = _stage_gcs(manifests, test_model_base)
    # The topics and subscriptions, as docs/deploy.md creates them: `esp pubsub init` with the
    # worker's own settings.
    for deployment in local.of_kind(manifests, "Deployment"):
        env = _configmap_env(manifests, deployment["metadata"]["name"])
        if "ESP_SUBSCRIPTION" in env:
            init = subprocess.run(
                [str(local.VENV_BIN / "esp"), "pubsub", "init", "--skip-iam"],
                env={**os.environ, **env, "PUBSUB_EMULATOR_HOST": emulator.host},
                capture_output=True, text=True, timeout=120, check=False,
            )
            assert init.returncode == 0, init.stdout + init.stderr
    running = local.LocalCluster(manifests, emulator_host=emulator.host, gcs_dir=gcs)
    try:
        running.start(order=_backends_first(manifests))
        yield running
    finally:
        running.stop()
        shutil.rmtree(gcs, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Probes, as the kubelet runs them


def _forward(cluster: local.LocalCluster, pod: local.Pod, port: int) -> int:
    for f in pod.forwards:
        if f.target_ns == pod.netns and f.target_port == port:
            return f.port
    return cluster.forward_to(pod, port).port


def run_probe(cluster: local.LocalCluster, pod: local.Pod, container: local.Container, probe: dict) -> str | None:
    """None when the probe succeeds, else why not."""
    timeout = float(probe.get("timeoutSeconds", 1))
    if "httpGet" in probe:
        get = probe["httpGet"]
        port = _forward(cluster, pod, container.port_number(get["port"]))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", get.get("path", "/"))
            status = conn.getresponse().status
        except OSError as exc:
            return f"GET :{get['port']}{get.get('path', '/')}: {exc}"
        finally:
            conn.close()
        return None if 200 <= status < 400 else f"GET :{get['port']}{get.get('path', '/')} answered {status}"
    if "tcpSocket" in probe:
        # Straight into the pod's network namespace, as the kubelet connects to the pod's address.
        port = container.port_number(probe["tcpSocket"]["port"])
        sock = local.socket_in(pod.netns)
        sock.settimeout(timeout)
        try:
            sock.connect(("127.0.0.1", port))
            return None
        except OSError as exc:
            return f"tcp :{probe['tcpSocket']['port']}: {exc}"
        finally:
            sock.close()
    if "grpc" in probe:
        port = _forward(cluster, pod, container.port_number(probe["grpc"]["port"]))
        ok = health_check(f"127.0.0.1:{port}", service=probe["grpc"].get("service", ""), timeout_s=timeout)
        return None if ok else f"grpc health :{probe['grpc']['port']} not SERVING"
    return f"probe kind {sorted(probe)} cannot run locally"


def _containers(cluster: local.LocalCluster) -> Iterator[tuple[local.Pod, local.Container]]:
    for pod in cluster.pods.values():
        for container in pod.containers:
            yield pod, container


def _wait_ready(cluster: local.LocalCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for pod, container in _containers(cluster):
        probe = container.spec.get("readinessProbe") or container.spec.get("startupProbe")
        if probe is None:
            continue
        while True:
            assert container.proc is not None
            if container.proc.poll() is not None:
                pytest.fail(f"{pod.name}/{container.name} exited with {container.proc.returncode}:\n{container.log_tail()}")
            why = run_probe(cluster, pod, container, probe)
            if why is None:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{pod.name}/{container.name} not ready after {START_TIMEOUT_S:.0f} s: {why}\n{container.log_tail()}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ready(cluster: local.LocalCluster) -> local.LocalCluster:
    _wait_ready(cluster)
    return cluster


def test_every_image_and_command_is_found(cluster: local.LocalCluster) -> None:
    images = {local.image_name(c["image"]) for d in local.of_kind(cluster.manifests, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]}
    assert images <= set(cluster.images), f"images without a Dockerfile: {sorted(images - set(cluster.images))}"
    unused = {name for name, dockerfile in cluster.images.items() if dockerfile.runs_on == "kubernetes"} - images
    assert not unused, f"Dockerfiles whose image no Deployment runs: {sorted(unused)}"
    for _, container in _containers(cluster):
        assert container.argv, container.name


def test_every_declared_probe_answers(ready: local.LocalCluster) -> None:
    failures = []
    for pod, container in _containers(ready):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.spec.get(kind)
            if probe is not None and (why := run_probe(ready, pod, container, probe)) is not None:
                failures.append(f"{pod.name}/{container.name} {kind}: {why}")
    assert not failures, "\n".join(failures)
    # Liveness and readiness are declared on every ESP container.
    for pod, container in _containers(ready):
        assert "livenessProbe" in container.spec and "readinessProbe" in container.spec, f"{pod.name}/{container.name}"


def test_every_container_port_listens(ready: local.LocalCluster) -> None:
    failures = []
    for pod, container in _containers(ready):
        for port in container.spec.get("ports", []):
            number = int(port["containerPort"])
            why = run_probe(ready, pod, container, {"tcpSocket": {"port": number}, "timeoutSeconds": 2})
            if why is not None:
                failures.append(f"{pod.name}/{container.name} port {port.get('name', number)}: {why}")
    assert not failures, "\n".join(failures)


def _scrape(cluster: local.LocalCluster, pod: local.Pod, container: local.Container, port: int | str, path: str) -> str:
    local_port = _forward(cluster, pod, container.port_number(port))
    conn = http.client.HTTPConnection("127.0.0.1", local_port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
    finally:
        conn.close()
    assert response.status == 200, f"{pod.name}: GET :{port}{path} answered {response.status}"
    return body


def scraped_pages(cluster: local.LocalCluster) -> dict[str, str]:
    """Every PodMonitoring endpoint's page, by PodMonitoring name (GMP's `job` label)."""
    pages = {}
    for monitor in local.of_kind(cluster.manifests, "PodMonitoring"):
        selector = monitor["spec"]["selector"]
        targets = [p for p in cluster.pods.values() if netpol.selects(selector, p.labels)]
        assert targets, f"PodMonitoring {monitor['metadata']['name']} selects no pod"
        for pod in targets:
            for endpoint in monitor["spec"]["endpoints"]:
                container = next(c for c in pod.containers if any(
                    p.get("name") == endpoint["port"] or p.get("containerPort") == endpoint["port"] for p in c.spec.get("ports", [])
                ))
                page = _scrape(cluster, pod, container, endpoint["port"], endpoint.get("path", "/metrics"))
                pages[monitor["metadata"]["name"]] = pages.get(monitor["metadata"]["name"], "") + page
                number = container.port_number(endpoint["port"])
                dst = netpol.Peer.pod(pod.namespace, pod.labels, pod.container_ports())
                assert cluster.policies.allows(GMP_COLLECTOR, dst, number), (
                    f"the NetworkPolicies keep managed Prometheus out of {pod.name}:{endpoint['port']}"
                )
    return pages


def test_every_scrape_target_answers_with_metrics(ready: local.LocalCluster) -> None:
    pages = scraped_pages(ready)
    for job, page in pages.items():
        assert re.search(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? ", page, re.M), f"{job}: no Prometheus samples"


def test_alert_policies_read_series_that_are_scraped(ready: local.LocalCluster) -> None:
    """Every series an alert reads from our own pods exists under that name on their pages."""
    pages = scraped_pages(ready)
    missing = []
    for policy_path, metric, job in monitoring.scraped_metrics_in_policies():
        page = pages.get(job)
        assert page is not None, f"{policy_path.name} reads job {job!r}, which no PodMonitoring scrapes"
        if not re.search(rf"^{re.escape(metric)}(\{{|\s)", page, re.M):
            missing.append(f"{policy_path.name}: {metric} (job {job})")
    assert not missing, "alerts read series no pod exposes:\n" + "\n".join(missing)


@pytest.fixture(scope="module")
def scored(ready: local.LocalCluster, emulator) -> tuple[set[str], set[str]]:
    """Publishes comments to the manifests' comments topic; returns (ids sent, ids scored)."""
    env = {}
    for pod in ready.pods.values():
        for container in pod.containers:
            if "ESP_SCORES_TOPIC" in container.env:
                env = container.env
    assert env, "no container publishes scores (ESP_SCORES_TOPIC)"
    settings = from_env(PubSubSettings, {k: v for k, v in env.items() if k.startswith("ESP_")}, emulator_host=emulator.host)
    sub = f"deploy-check-{uuid.uuid4().hex[:8]}"
    create_subscription(settings, settings.scores_topic, sub)
    from esp.pubsub import publisher_client

    publisher = publisher_client(settings)
    ids = [f"deploy-{uuid.uuid4().hex[:8]}-{i}" for i in range(5)]
    try:
        for cid in ids:
            publisher.publish(settings.topic_path(settings.comments_topic), Comment(cid, f"comment {cid} you idiot").to_json_bytes()).result(30)
    finally:
        publisher.stop()
    got = pull_until(settings, sub, len(ids), timeout_s=90)
    return set(ids), {json.loads(m.message.data)["id"] for m in got}


def test_comments_published_to_the_manifests_topic_come_back_scored(scored: tuple[set[str], set[str]]) -> None:
    sent, back = scored
    assert back >= sent, f"scores for {sorted(sent - back)} never arrived"


def test_pods_reach_what_the_data_flow_needs_and_nothing_else(ready: local.LocalCluster) -> None:
    assert not ready.denied, f"the NetworkPolicies block connections the pods make: {ready.denied}"
    policies = ready.policies
    pods = {p.deployment["metadata"]["name"]: p for p in ready.pods.values()}
    worker, tfs = pods["esp-worker"], pods["tf-serving"]
    w = netpol.Peer.pod(worker.namespace, worker.labels, worker.container_ports())
    t = netpol.Peer.pod(tfs.namespace, tfs.labels, tfs.container_ports())
    stranger = netpol.Peer.pod(worker.namespace, {"app.kubernetes.io/name": "something-else"})
    other_ns = netpol.Peer.pod("default", dict(worker.labels))
    assert policies.allows(w, t, 8500)
    assert not policies.allows(w, t, 8501), "workers need only TF Serving's gRPC port"
    assert not policies.allows(stranger, t, 8500), "a pod without the client label reached TF Serving"
    assert not policies.allows(other_ns, t, 8500), "a pod of another namespace reached TF Serving"
    assert not policies.allows(t, w, 8080), "TF Serving has no business with the worker"
    assert not policies.allows(stranger, w, 8080)
    dns = netpol.Peer.pod("kube-system", {"k8s-app": "kube-dns"})
    for pod in (w, t):
        assert policies.allows(pod, dns, 53, "UDP") and policies.allows(pod, dns, 53, "TCP")
        assert policies.allows(pod, netpol.Peer.external("169.254.169.254"), 80)
        assert policies.allows(pod, netpol.Peer.external("169.254.169.252"), 988)
        assert policies.allows(pod, netpol.Peer.external(local.GOOGLE_APIS_IP), 443)
        assert not policies.allows(pod, netpol.Peer.external("203.0.113.7"), 80), "egress is open beyond 443"


def test_the_worker_rpcs_are_allowed_by_its_documented_iam_roles(ready: local.LocalCluster, scored: tuple[set[str], set[str]]) -> None:
    # Scoring made the worker do its whole job; its proxy saw every Pub/Sub RPC it made.
    worker = next(p for p in ready.pods.values() if p.deployment["metadata"]["name"] == "esp-worker")
    assert worker.proxy is not None
    # A message is acked after its score is published, so the last Acknowledge can trail the scores.
    needed = {"/google.pubsub.v1.Subscriber/Acknowledge", "/google.pubsub.v1.Publisher/Publish"}
    try:
        wait_until(lambda: needed <= worker.proxy.methods, timeout_s=30, what="the worker's acks and publishes")
    except TimeoutError:
        pass
    methods = sorted(worker.proxy.methods)
    assert needed <= set(methods), methods
    account = worker.spec["serviceAccountName"]
    missing = iam.missing_permissions(account, methods)
    assert not missing, f"docs/deploy.md's roles for {account} lack {missing} (the worker called {methods})"


def test_sigterm_ends_every_container_cleanly_within_its_grace(ready: local.LocalCluster) -> None:
    failures = []
    for pod in ready.pods.values():
        grace = float(pod.spec.get("terminationGracePeriodSeconds", 30))
        for container in pod.containers:
            assert container.proc is not None and container.proc.poll() is None, f"{pod.name}/{container.name} died early"
            started = time.monotonic()
            os.kill(container.proc.pid, 15)
            try:
                code = container.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                failures.append(f"{pod.name}/{container.name} still running {grace:.0f} s after SIGTERM")
                continue
            took = time.monotonic() - started
            if code != 0:
                failures.append(f"{pod.name}/{container.name} exited {code} after SIGTERM:\n{container.log_tail()}")
            print(f"{pod.name}/{container.name}: exit {code} {took:.1f} s after SIGTERM", file=sys.stderr)
    assert not failures, "\n".join(failures)
