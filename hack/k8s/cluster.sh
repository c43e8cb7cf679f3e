#!/usr/bin/env bash
# Start/stop a throwaway local Kubernetes cluster (etcd + kube-apiserver [+ controllers, scheduler, kwok]).
#   hack/k8s/cluster.sh up [--full] [--name N] [--crds eventflow,keda,prometheus-operator]
#   eval "$(hack/k8s/cluster.sh up --full)"     # exports KUBECONFIG
#   hack/k8s/cluster.sh status|down [--name N]
#   hack/k8s/cluster.sh run [--full]            # foreground, Ctrl-C tears down
# Builds or reuses the binaries first (hack/k8s/build.sh). PYTHON overrides the interpreter.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
eval "$(bash "$here/build.sh" --print-env)"
py=${PYTHON:-}
if [[ -z "$py" ]]; then
  for c in "$repo/.venv/bin/python" python3; do command -v "$c" >/dev/null 2>&1 && { py=$c; break; }; done
fi
cd "$repo"
exec "$py" -m tests.e2e.cluster "$@"
