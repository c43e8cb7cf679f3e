"""Throwaway Kubernetes control planes for the e2e tests (see README.md beside this file)."""

from tests.e2e.cluster.controlplane import (
    Cluster,
    ClusterError,
    KindCluster,
    LocalCluster,
    Unavailable,
    start_cluster,
)

__all__ = ["Cluster", "ClusterError", "KindCluster", "LocalCluster", "Unavailable", "start_cluster"]
