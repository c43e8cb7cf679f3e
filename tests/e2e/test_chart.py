"""The Helm chart: lint, render every CI values file, secure defaults, and the alert/route files checked
with promtool and amtool (the same bytes the chart ships, via .Files.Get)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from eventflow.settings import load_settings
from tests.tools import tool

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/eventflow"
API_VERSIONS = ["keda.sh/v1alpha1", "monitoring.coreos.com/v1", "monitoring.coreos.com/v1alpha1"]
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def render(values: Path | None = None, *extra: str, api_versions: bool = True) -> list[dict[str, Any]]:
    args = [tool("helm"), "template", "ef", str(CHART), "--namespace", "ef"]
    if values:
        args += ["-f", str(values)]
    if api_versions:
        for v in API_VERSIONS:
            args += ["--api-versions", v]
    result = run(*args, *extra)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.name)
def test_lint_strict(values: Path) -> None:
    result = run(tool("helm"), "lint", "--strict", str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.name)
def test_pods_are_locked_down(values: Path) -> None:
    docs = render(values)
    pods = [d for d in docs if d["kind"] in {"Deployment", "StatefulSet", "Job"}]
    assert pods
    for d in pods:
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (d["metadata"]["name"], c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (d["metadata"]["name"], c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (d["metadata"]["name"], c["name"])
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"


def test_all_on_renders_scaling_and_monitoring() -> None:
    docs = render(CHART / "ci/all-on-values.yaml")
    kinds = {d["kind"] for d in docs}
    assert {"ScaledObject", "ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"} <= kinds
    so = next(d for d in docs if d["kind"] == "ScaledObject")
    triggers = so["spec"]["triggers"]
    # Lag alone goes blind after an undelivered entry is deleted (facts #7): pending must be a trigger too.
    assert {t["type"] for t in triggers} == {"redis-streams"}
    assert any("lagCount" in t["metadata"] for t in triggers)
    assert any("pendingEntriesCount" in t["metadata"] for t in triggers)
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    shipped = yaml.safe_load((CHART / "files/alerts.yaml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]


def test_capability_gated_objects_are_skipped_without_crds() -> None:
    docs = render(CHART / "ci/all-on-values.yaml", api_versions=False)
    assert not {"ScaledObject", "ServiceMonitor", "PrometheusRule"} & {d["kind"] for d in docs}


def test_redis_is_durable_by_default() -> None:
    docs = render()
    conf = "\n".join(str(v) for d in docs if d["kind"] == "ConfigMap" for v in (d.get("data") or {}).values())
    assert "appendonly yes" in conf and "appendfsync always" in conf


def test_operator_settings_reach_the_config_map_under_real_setting_names() -> None:
    docs = render(None, "--set-json", "operator.statusIntervalS=2.5", "--set", "operator.redisRetryS=3",
                  "--set", "operator.redisAttempts=4")
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and "EVENTFLOW_STREAMS__GROUP" in (d.get("data") or {})]
    env = {k: v for k, v in config["data"].items() if k.startswith("EVENTFLOW_OPERATOR__")}
    assert env == {"EVENTFLOW_OPERATOR__STATUS_INTERVAL_S": "2.5", "EVENTFLOW_OPERATOR__REDIS_RETRY_S": "3",
                   "EVENTFLOW_OPERATOR__REDIS_ATTEMPTS": "4"}
    # The names are settings the operator reads (a typo would be silently ignored by the pod).
    with mock.patch.dict(os.environ, env):
        settings = load_settings()
    assert (settings.operator.status_interval_s, settings.operator.redis_retry_s,
            settings.operator.redis_attempts) == (2.5, 3.0, 4)


@pytest.mark.parametrize(("setting", "message"), [
    (["--set", "operator.redisAttempts=0"], "redisAttempts"),
    (["--set", "redis.enabled=false"], "redis"),
    (["--set", "redis.appendfsync=no"], "appendfsync"),
    (["--set", "ingest.bogus=1"], "bogus"),
])
def test_bad_values_fail_with_the_value_path(setting: list[str], message: str) -> None:
    result = run(tool("helm"), "template", "ef", str(CHART), *setting)
    assert result.returncode != 0
    assert message in result.stderr


def test_alert_rules_pass_promtool() -> None:
    result = run(tool("promtool"), "check", "rules", str(CHART / "files/alerts.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_as_documented() -> None:
    test_file = Path(__file__).parent / "chart/alerts_test.yaml"
    result = subprocess.run([tool("promtool"), "test", "rules", test_file.name], cwd=test_file.parent,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config_passes_amtool() -> None:
    result = run(tool("amtool"), "check-config", str(CHART / "files/alertmanager.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_runbook_entry() -> None:
    rules = yaml.safe_load((CHART / "files/alerts.yaml").read_text())["groups"][0]["rules"]
    runbook = (REPO / "docs/operations.md").read_text().lower()
    for rule in rules:
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert f"## {anchor}" in runbook.replace("## `", "## ").replace("`", ""), anchor
