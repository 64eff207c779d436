"""Alerts as code (k8s/monitoring/): every policy is a valid Cloud Monitoring AlertPolicy, its
PromQL passes `promtool test rules` with the cases in promtool-tests.yaml, it links a runbook that
exists in docs/deploy.md, and it watches the subscriptions the manifests use.

That the series the alerts read from ESP's pods are really exposed under those names is checked on
the running pods by tests/test_deploy_run.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures import cluster as local
from tests.fixtures import monitoring

DEPLOY_DOC = local.ROOT / "docs" / "deploy.md"
# The five conditions the on-call engineer needs (issue 10).
EXPECTED_ALERTS = {"CommentsWaiting", "DeadLettersExpiring", "WorkersNotReady", "ModelErrors", "NoScoresWithBacklog"}


@pytest.mark.parametrize("path", monitoring.policy_paths(), ids=lambda p: p.stem)
def test_policy_is_a_cloud_monitoring_alert_policy(path: Path) -> None:
    from google.cloud.monitoring_v3.types import AlertPolicy

    policy = monitoring.load(path)
    # Unknown fields are errors, as the API would refuse them.
    parsed = AlertPolicy.from_json(json.dumps(policy), ignore_unknown_fields=False)
    assert parsed.display_name and parsed.documentation.content
    assert parsed.conditions, "a policy without conditions never fires"
    for condition in parsed.conditions:
        promql = condition.condition_prometheus_query_language
        assert promql.query and promql.alert_rule, f"{path.name}: every condition is PromQL with an alert rule name"


def test_the_alerts_cover_what_on_call_needs() -> None:
    names = {c["conditionPrometheusQueryLanguage"]["alertRule"] for p in monitoring.policy_paths() for c in monitoring.load(p)["conditions"]}
    assert names == EXPECTED_ALERTS


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("path", monitoring.policy_paths(), ids=lambda p: p.stem)
def test_policy_links_a_runbook_that_exists(path: Path) -> None:
    content = monitoring.load(path)["documentation"]["content"]
    links = re.findall(r"docs/deploy\.md#([\w-]+)", content)
    assert links, f"{path.name}: no runbook link (docs/deploy.md#...)"
    anchors = _anchors(DEPLOY_DOC.read_text())
    for anchor in links:
        assert anchor in anchors, f"{path.name}: docs/deploy.md has no heading for #{anchor}"


def test_policies_watch_the_subscriptions_the_manifests_use() -> None:
    manifests = local.build_overlay(local.OVERLAYS / "production")
    env: dict[str, str] = {}
    for cm in local.of_kind(manifests, "ConfigMap"):
        env.update({k: v for k, v in cm.get("data", {}).items() if k.startswith("ESP_")})
    from esp.settings import PubSubSettings

    defaults = PubSubSettings()
    subscriptions = {env.get("ESP_SUBSCRIPTION", defaults.subscription), env.get("ESP_DEAD_LETTER_SUBSCRIPTION", defaults.dead_letter_subscription)}
    named = set()
    for path in monitoring.policy_paths():
        for condition in monitoring.load(path)["conditions"]:
            for name, labels in monitoring.selectors(condition["conditionPrometheusQueryLanguage"]["query"]):
                if "subscription_id" in labels:
                    named.add(labels["subscription_id"])
    assert named == subscriptions, f"alerts watch {sorted(named)}, the manifests use {sorted(subscriptions)}"


def test_promql_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make install` installs Debian's prometheus package (system-packages.txt)"
    rules = tmp_path / "esp-rules.yaml"
    rules.write_text(yaml.safe_dump(monitoring.as_prometheus_rules(), sort_keys=False))
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    cases = yaml.safe_load(monitoring.PROMTOOL_TESTS.read_text())
    cases["rule_files"] = [rules.name]
    tested = {t["alertname"] for case in cases["tests"] for t in case.get("alert_rule_test", [])}
    assert tested == EXPECTED_ALERTS, "every alert has promtool cases"
    suite = tmp_path / "esp-rules-test.yaml"
    suite.write_text(yaml.safe_dump(cases, sort_keys=False))
    run = subprocess.run([promtool, "test", "rules", str(suite)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_catches_a_broken_expectation(tmp_path: Path) -> None:
    """The promtool cases can fail: expecting an alert where none fires is reported."""
    promtool = shutil.which("promtool")
    assert promtool
    rules = tmp_path / "esp-rules.yaml"
    rules.write_text(yaml.safe_dump(monitoring.as_prometheus_rules(), sort_keys=False))
    cases = yaml.safe_load(monitoring.PROMTOOL_TESTS.read_text())
    cases["rule_files"] = [rules.name]
    first = cases["tests"][0]
    first["alert_rule_test"][0]["exp_alerts"] = [{"exp_labels": {"severity": "page"}}]
    suite = tmp_path / "broken.yaml"
    suite.write_text(yaml.safe_dump({**cases, "tests": [first]}, sort_keys=False))
    run = subprocess.run([promtool, "test", "rules", str(suite)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode != 0
