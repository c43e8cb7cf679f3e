"""Kubernetes cluster fixtures for the e2e tests (issue 7).

``k8s_cluster`` (etcd + kube-apiserver) and ``k8s_full_cluster`` (+ kube-controller-manager, kube-scheduler,
kwok with one fake node) are session-scoped and parametrized over two backends:

* ``local``: binaries from ``$EVENTFLOW_K8S_BIN`` (``eval "$(hack/k8s/build.sh --print-env)"``). Missing
  binaries fail the run under ``CI=true`` and skip elsewhere, with the reason.
* ``kind``: a kind cluster, when ``kind`` and a Docker daemon are available; otherwise skipped with the reason.

``EVENTFLOW_K8S_BACKENDS=local`` (or ``kind``) restricts the backends that run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from tests.e2e.cluster.controlplane import Cluster, KindCluster, LocalCluster, Unavailable, k8s_bin_dir, pids_alive

BACKENDS = ["local", "kind"]


def _selected(backend: str) -> bool:
    raw = os.environ.get("EVENTFLOW_K8S_BACKENDS", "")
    return not raw or backend in {b.strip() for b in raw.split(",")}


@pytest.fixture(scope="session", params=BACKENDS)
def k8s_backend(request: pytest.FixtureRequest) -> str:
    """The backend of this parametrization, or skip/fail saying why it cannot run here."""
    backend: str = request.param
    if not _selected(backend):
        pytest.skip(f"{backend} backend not in EVENTFLOW_K8S_BACKENDS={os.environ['EVENTFLOW_K8S_BACKENDS']}")
    if backend == "kind":
        reason = KindCluster.unavailable_reason()
        if reason:
            pytest.skip(f"kind backend: {reason}")
        return backend
    try:
        k8s_bin_dir()
    except Unavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"local Kubernetes backend: {exc}")
        pytest.skip(f"local Kubernetes backend: {exc}")
    return backend


def _stop_local(cluster: LocalCluster) -> None:
    pids = [p.pid for p in cluster.procs.values()]
    cluster.stop()
    assert not pids_alive(pids), f"cluster processes left running: {pids_alive(pids)}"
    assert not cluster.dir.exists(), f"cluster temp dir left behind: {cluster.dir}"


@pytest.fixture(scope="session")
def _kind_cluster(k8s_backend: str) -> Iterator[Cluster]:
    """One kind cluster per session, shared by both tiers (kind is always 'full')."""
    assert k8s_backend == "kind"
    cluster = KindCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def k8s_cluster(k8s_backend: str, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A throwaway API server (etcd + kube-apiserver): CRDs, validation, watches; no controllers."""
    if k8s_backend == "kind":
        yield request.getfixturevalue("_kind_cluster")
        return
    cluster = LocalCluster(full=False).start()
    try:
        yield cluster
    finally:
        _stop_local(cluster)


@pytest.fixture(scope="session")
def k8s_full_cluster(k8s_backend: str, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """API server + controller-manager + scheduler + kwok (one fake node): Deployments get Running pods."""
    if k8s_backend == "kind":
        yield request.getfixturevalue("_kind_cluster")
        return
    cluster = LocalCluster(full=True).start()
    try:
        yield cluster
    finally:
        _stop_local(cluster)


@pytest.fixture
def k8s_namespace(k8s_cluster: Cluster) -> Iterator[str]:
    """A fresh namespace on ``k8s_cluster`` (deleted afterwards; without a controller-manager it stays
    Terminating until the throwaway cluster goes away)."""
    name = f"t-{secrets.token_hex(4)}"
    k8s_cluster.kubectl("create", "namespace", name)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
