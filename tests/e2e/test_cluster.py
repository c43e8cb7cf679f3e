"""Smoke tests against a real Kubernetes API server (issue 7): what `kubectl apply -f ndvijob.yaml` and
`helm install eventflow` do for users, exercised on a throwaway cluster (see tests/e2e/cluster/README.md).

Runs on the ``local`` backend (etcd + kube-apiserver [+ controllers + kwok] built by hack/k8s/build.sh) and,
where Docker and kind exist, on the ``kind`` backend; the fixtures live in tests/e2e/conftest.py.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.cluster.controlplane import CHART, FAKE_NODE, Cluster

REPO = Path(__file__).resolve().parents[2]
NDVIJOB_SAMPLE = REPO / "k8s/ndvijob-sample.yaml"
DLQREPLAY_SAMPLE = REPO / "k8s/dlqreplay-sample.yaml"
GROUP, VERSION = "eventflow.io", "v1alpha1"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def sample(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def eventflow_crds(k8s_cluster: Cluster) -> list[str]:
    return k8s_cluster.install_crds("eventflow")


def kubernetes_client() -> Any:
    """The official Python client, or fail (CI, where the test extra installs it) / skip (elsewhere)."""
    try:
        import kubernetes
    except ImportError:
        reason = "the 'kubernetes' Python package is not installed (pip install kubernetes)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return kubernetes


def test_server_reports_the_pinned_version(k8s_cluster: Cluster) -> None:
    info = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    server = info["serverVersion"]
    assert server["major"] == "1"
    pinned = os.environ.get("EVENTFLOW_K8S_VERSION")
    if k8s_cluster.backend == "local" and pinned:
        assert server["gitVersion"] == pinned
        assert info["clientVersion"]["gitVersion"] == pinned


def test_kubectl_apply_crds_and_samples(k8s_cluster: Cluster, eventflow_crds: list[str], k8s_namespace: str) -> None:
    assert sorted(eventflow_crds) == ["customresourcedefinition.apiextensions.k8s.io/dlqreplays.eventflow.io",
                                      "customresourcedefinition.apiextensions.k8s.io/ndvijobs.eventflow.io"]
    ns = k8s_namespace
    out = k8s_cluster.kubectl("apply", "-n", ns, "-f", str(NDVIJOB_SAMPLE), "-f", str(DLQREPLAY_SAMPLE)).stdout
    assert "ndvijob.eventflow.io/farm-42-2024-06-01 created" in out
    assert "dlqreplay.eventflow.io/replay-transient-2024-06-01 created" in out

    job = k8s_cluster.kubectl_json("get", "-n", ns, "ndvi", "farm-42-2024-06-01")  # shortName from the CRD
    assert job["spec"] == sample(NDVIJOB_SAMPLE)["spec"]
    replay = k8s_cluster.kubectl_json("get", "-n", ns, "dlqreplays", "replay-transient-2024-06-01")
    assert replay["spec"]["maxCount"] == 50
    # Re-applying the same file is a no-op; the printer columns come from the CRD.
    assert "unchanged" in k8s_cluster.kubectl("apply", "-n", ns, "-f", str(NDVIJOB_SAMPLE)).stdout
    header = k8s_cluster.kubectl("get", "-n", ns, "ndvijobs").stdout.splitlines()[0].split()
    assert header[:3] == ["NAME", "PHASE", "JOBID"]
    # The status subresource is separate from the spec: the operator's path.
    k8s_cluster.kubectl("patch", "-n", ns, "ndvijob", "farm-42-2024-06-01", "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": {"phase": "Queued"}}))
    assert "Queued" in k8s_cluster.kubectl("get", "-n", ns, "ndvijobs").stdout


def _invalid(mutate: Any) -> dict[str, Any]:
    doc = copy.deepcopy(sample(NDVIJOB_SAMPLE))
    mutate(doc["spec"])
    return doc


INVALID = {
    "farm_id pattern": (_invalid(lambda s: s.update(farm_id="Farm_42!")), "spec.farm_id"),
    "sensor enum": (_invalid(lambda s: s.update(sensor="hubble")), "Unsupported value: \"hubble\""),
    "inputs required": (_invalid(lambda s: s.pop("inputs")), "spec.inputs: Required value"),
    "href and red/nir at once": (
        _invalid(lambda s: s["inputs"].update(red={"href": "file:///r.tif"}, nir={"href": "file:///n.tif"})),
        "spec.inputs",
    ),
    "band out of range": (_invalid(lambda s: s["inputs"].update(red_band=0)), "spec.inputs.red_band"),
}


@pytest.mark.parametrize("case", list(INVALID), ids=lambda c: c.replace(" ", "-"))
def test_server_side_validation_rejects_invalid_ndvijob(
    k8s_cluster: Cluster, eventflow_crds: list[str], k8s_namespace: str, case: str
) -> None:
    doc, message = INVALID[case]
    doc = copy.deepcopy(doc)
    doc["metadata"]["name"] = "bad"
    result = k8s_cluster.kubectl("apply", "-n", k8s_namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert result.returncode != 0, result.stdout
    assert "is invalid" in result.stderr and message in result.stderr, result.stderr
    assert k8s_cluster.kubectl("get", "-n", k8s_namespace, "ndvijob", "bad", check=False).returncode != 0


def test_python_client_sees_watch_events(k8s_cluster: Cluster, eventflow_crds: list[str], k8s_namespace: str) -> None:
    kubernetes = kubernetes_client()
    ns, name = k8s_namespace, "watched"
    api_client = kubernetes.config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    api = kubernetes.client.CustomObjectsApi(api_client)
    start_rv = api.list_namespaced_custom_object(GROUP, VERSION, ns, "ndvijobs")["metadata"]["resourceVersion"]
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    watch = kubernetes.watch.Watch()

    stopping = threading.Event()
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for event in watch.stream(api.list_namespaced_custom_object, GROUP, VERSION, ns, "ndvijobs",
                                      resource_version=start_rv, timeout_seconds=60):
                events.put((event["type"], event["object"]))
        except Exception as exc:
            if not stopping.is_set():  # closing the client below interrupts the blocked read
                errors.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        doc = sample(NDVIJOB_SAMPLE)
        doc["metadata"]["name"] = name
        k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))
        # The spec is immutable (a CEL rule on the CRD), so the update is a label.
        k8s_cluster.kubectl("patch", "-n", ns, "ndvijob", name, "--type=merge", "-p",
                            '{"metadata":{"labels":{"tier":"gold"}}}')
        k8s_cluster.kubectl("delete", "-n", ns, "ndvijob", name)
        seen: list[tuple[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not seen or seen[-1][0] != "DELETED"):
            try:
                kind, obj = events.get(timeout=1)
            except queue.Empty:
                continue
            if obj["metadata"]["name"] == name:
                seen.append((kind, (obj["metadata"].get("labels") or {}).get("tier")))
        assert not errors, errors
        assert seen == [("ADDED", None), ("MODIFIED", "gold"), ("DELETED", "gold")]
    finally:
        stopping.set()
        watch.stop()
        api_client.close()
        thread.join(timeout=65)


CHART_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}


def test_third_party_crds_validate_the_charts_objects(k8s_cluster: Cluster, k8s_namespace: str) -> None:
    """KEDA's and the Prometheus Operator's CRDs (from their Go modules) make the real API server validate
    what the chart renders for them; a broken object is rejected."""
    names = k8s_cluster.install_crds("keda", "prometheus-operator")
    assert "customresourcedefinition.apiextensions.k8s.io/servicemonitors.monitoring.coreos.com" in names
    assert "customresourcedefinition.apiextensions.k8s.io/scaledobjects.keda.sh" in names
    apis = json.loads(k8s_cluster.kubectl("get", "--raw", "/apis").stdout)
    served = {v["groupVersion"] for g in apis["groups"] for v in g["versions"]}
    assert {"keda.sh/v1alpha1", "monitoring.coreos.com/v1", "monitoring.coreos.com/v1alpha1"} <= served

    rendered = k8s_cluster.helm(
        "template", "ef", str(CHART), "--namespace", k8s_namespace, "-f", str(CHART / "ci/all-on-values.yaml"),
        "--api-versions", "keda.sh/v1alpha1", "--api-versions", "monitoring.coreos.com/v1",
        "--api-versions", "monitoring.coreos.com/v1alpha1",
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d and d.get("kind") in CHART_KINDS]
    assert {d["kind"] for d in docs} == CHART_KINDS
    manifest = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    out = k8s_cluster.kubectl("apply", "--dry-run=server", "-n", k8s_namespace, "-f", "-", input=manifest).stdout
    assert out.count("(server dry run)") == len(docs), out

    monitor = copy.deepcopy(next(d for d in docs if d["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"] = "metrics"  # must be a list
    bad = k8s_cluster.kubectl("apply", "--dry-run=server", "-n", k8s_namespace, "-f", "-",
                              input=json.dumps(monitor), check=False)
    assert bad.returncode != 0 and "spec.endpoints" in bad.stderr, bad.stderr


def test_deployment_reaches_running_pods(k8s_full_cluster: Cluster) -> None:
    cluster, ns = k8s_full_cluster, "deploy-smoke"
    cluster.kubectl("create", "namespace", ns)
    image = os.environ.get("EVENTFLOW_E2E_IMAGE", "registry.k8s.io/pause:3.10")
    cluster.kubectl("create", "deployment", "web", "-n", ns, f"--image={image}", "--replicas=2")
    cluster.kubectl("rollout", "status", "-n", ns, "deployment/web", "--timeout=90s", timeout=100)
    pods = cluster.kubectl_json("get", "pods", "-n", ns, "-l", "app=web")["items"]
    assert len(pods) == 2
    assert all(p["status"]["phase"] == "Running" for p in pods), [p["status"] for p in pods]
    if cluster.backend == "local":
        assert {p["spec"]["nodeName"] for p in pods} == {FAKE_NODE}
    cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_helm_install_eventflow(k8s_full_cluster: Cluster) -> None:
    """`helm install eventflow` with the chart's defaults: CRDs, Redis StatefulSet (its PVC bound to a
    pre-made PV), the Deployments, and the post-install bootstrap Job (kwok completes Job pods), with --wait."""
    cluster, ns = k8s_full_cluster, "eventflow"
    if cluster.backend == "kind" and not os.environ.get("EVENTFLOW_KIND_IMAGES_LOADED"):
        pytest.skip("kind runs real containers: load the eventflow images (kind load docker-image ...) and set "
                    "EVENTFLOW_KIND_IMAGES_LOADED=1")
    extra: list[str] = []
    if cluster.kubectl("get", "crd", "ndvijobs.eventflow.io", check=False).returncode == 0:
        extra += ["--set", "crds.install=false"]  # already installed by another test on a shared cluster
    if cluster.backend == "local":  # no storage provisioner: a static PV for the Redis data PVC
        cluster.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "eventflow-redis-data"},
            "spec": {"capacity": {"storage": "8Gi"}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": "/var/lib/eventflow-kwok"}},
        }))
    out = cluster.helm("install", "eventflow", str(CHART), "-n", ns, "--create-namespace", "--wait",
                       "--wait-for-jobs", "--timeout", "150s", *extra, timeout=170).stdout
    assert "STATUS: deployed" in out, out
    crds = {c["metadata"]["name"] for c in cluster.kubectl_json("get", "crd")["items"]}
    assert {"ndvijobs.eventflow.io", "dlqreplays.eventflow.io"} <= crds
    deployments = cluster.kubectl_json("get", "deployments", "-n", ns)["items"]
    assert deployments and all(d["status"].get("availableReplicas") == d["spec"]["replicas"] for d in deployments)
    sts = cluster.kubectl_json("get", "statefulset", "-n", ns)["items"]
    assert sts and all(s["status"].get("readyReplicas") == s["spec"]["replicas"] for s in sts)
    cluster.kubectl("apply", "-n", ns, "-f", str(NDVIJOB_SAMPLE))
    cluster.helm("uninstall", "eventflow", "-n", ns, "--wait", timeout=120)
    # helm.sh/resource-policy: keep — uninstalling the chart never deletes users' NdviJobs.
    assert cluster.kubectl("get", "-n", ns, "ndvijob", "farm-42-2024-06-01", check=False).returncode == 0
