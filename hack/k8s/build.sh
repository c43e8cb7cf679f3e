#!/usr/bin/env bash
# Build (or reuse) a version-stamped Kubernetes test toolset from the Go module proxy:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok, helm
# plus the third-party CRDs the chart targets (KEDA, Prometheus Operator) and kwok's Stage configs, taken
# from their Go modules.
#
# Output: ${EVENTFLOW_CACHE:-$HOME/.cache/eventflow}/k8s/<K8S_VERSION>/{bin,crds,kwok}; reused when the stamp
# matches. Progress goes to stderr. Usage:
#   hack/k8s/build.sh               build or reuse, print nothing on stdout
#   hack/k8s/build.sh --print-env   same, then print `export ...` lines on stdout (eval them)
#   hack/k8s/build.sh --force       rebuild even if the cache is complete
set -euo pipefail
exec 3>&1 1>&2   # stdout is reserved for --print-env; everything else goes to stderr

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
HELM_VERSION=$(sed -n 's/^HELM_VERSION = "\(.*\)"/\1/p' "$repo/tests/tools.py")
[[ -n "$HELM_VERSION" ]] || { echo "build.sh: cannot read HELM_VERSION from tests/tools.py" >&2; exit 1; }

print_env=0 force=0
for a in "$@"; do
  case "$a" in
    --print-env) print_env=1 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

cache=${EVENTFLOW_CACHE:-$HOME/.cache/eventflow}
root="$cache/k8s/$K8S_VERSION"
bin="$root/bin" crds="$root/crds"
stamp_want="k8s=$K8S_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION keda=$KEDA_VERSION prom-operator=$PROM_OPERATOR_VERSION build=4"
tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm)

log() { printf '[k8s-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'hack/k8s/build.sh: ERROR: %s\n' "$*" >&2; exit 1; }

complete() {
  [[ -f "$root/STAMP" && "$(cat "$root/STAMP")" == "$stamp_want" ]] || return 1
  local t; for t in "${tools[@]}"; do [[ -x "$bin/$t" ]] || return 1; done
  [[ -s "$root/kwok/stages.yaml" ]] || return 1
  compgen -G "$crds/keda/*.yaml" >/dev/null && compgen -G "$crds/prometheus-operator/*.yaml" >/dev/null
}

print_exports() {
  ((print_env)) || return 0
  printf 'export EVENTFLOW_K8S_VERSION=%q\n' "$K8S_VERSION" >&3
  printf 'export EVENTFLOW_K8S_BIN=%q\n' "$bin" >&3
  printf 'export EVENTFLOW_K8S_CRDS=%q\n' "$crds" >&3
  printf 'export EVENTFLOW_K8S_KWOK_CONFIG=%q\n' "$root/kwok/stages.yaml" >&3
}

# One build per version at a time (two CI runs or a developer and CI on the same machine).
mkdir -p "$cache/k8s"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache/k8s/.$K8S_VERSION.lock"
  flock -w 3600 9 || die "timed out waiting for another build.sh on $root"
fi

if ((!force)) && complete; then
  log "reusing $root ($stamp_want)"
  print_exports
  exit 0
fi

# --- toolchain ---------------------------------------------------------------------------------------
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x "$GO" ]] || die "go not found (install Go >= 1.26 or set GO=/path/to/go)"
export GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS="-mod=mod -buildvcs=false"
# GOCACHE / GOMODCACHE: Go's defaults (~/.cache/go-build, ~/go/pkg/mod), outside the repo.
gov=$("$GO" env GOVERSION)
log "go: $gov ($GO); cache: $root"
nice_=(nice -n 10)

work="$root/work"          # wrapper module + staging output, kept for incremental rebuilds
stage="$root/bin.new"
rm -rf "$stage"; mkdir -p "$work" "$stage"

# modfield MODULE@VERSION FIELD: download a module (zip + go.mod) and print a field of `go mod download -json`.
modfield() {
  local out
  if ! out=$("$GO" mod download -json "$1" 2>&1); then
    die "go mod download $1 failed: $(sed -n 's/.*"Error": *"\(.*\)".*/\1/p' <<<"$out" | head -1)"
  fi
  python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$2" <<<"$out" \
    || die "go mod download -json $1 has no $2"
}

# --- kubernetes components + etcd via a wrapper module ----------------------------------------------
log "resolving k8s.io/kubernetes@$K8S_VERSION"
kgomod=$(modfield "k8s.io/kubernetes@$K8S_VERSION" GoMod)
[[ -f "$kgomod" ]] || die "no go.mod for k8s.io/kubernetes@$K8S_VERSION"
kgo=$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$kgomod")
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
patch=${K8S_VERSION##*.}
staging_ver="v0.$minor.$patch"
mapfile -t staging < <(sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/.*#\1#p' "$kgomod" | sort -u)
((${#staging[@]} > 0)) || die "found no staging replace lines in $kgomod"
etcd_ver=$(sed -n 's#^[[:space:]]*go\.etcd\.io/etcd/server/v3 \(v[^ ]*\).*#\1#p' "$kgomod" | head -1)
[[ -n "$etcd_ver" ]] || die "cannot find go.etcd.io/etcd/server/v3 in $kgomod"
if [[ "$(printf '%s\n%s\n' "$kgo" "${gov#go}" | sort -V | head -1)" != "$kgo" ]]; then
  die "k8s.io/kubernetes@$K8S_VERSION needs Go >= $kgo but $GO is $gov (GOTOOLCHAIN=local: no toolchain download)"
fi
log "k8s go directive $kgo; ${#staging[@]} staging modules -> $staging_ver; etcd $etcd_ver"

{
  echo "// Generated by hack/k8s/build.sh: builds k8s.io/kubernetes commands outside its repo."
  echo "module eventflow.local/k8s-test-bins"
  echo
  echo "go $kgo"
  echo
  echo "require ("
  echo "	k8s.io/kubernetes $K8S_VERSION"
  echo "	go.etcd.io/etcd/server/v3 $etcd_ver"
  echo ")"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	$m => $m $staging_ver"; done
  echo ")"
} > "$work/go.mod.want"
if ! cmp -s "$work/go.mod.want" "$work/go.mod.in" 2>/dev/null; then
  cp "$work/go.mod.want" "$work/go.mod"; cp "$work/go.mod.want" "$work/go.mod.in"; rm -f "$work/go.sum"
fi
cat > "$work/tools.go" <<'GO'
//go:build tools

// Package tools pins the commands this module builds.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
log "go mod tidy (downloads modules on a cold cache)"
(cd "$work" && "${nice_[@]}" "$GO" mod tidy) || die "go mod tidy failed in $work"

ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  ld+=" -X $p.buildDate=1970-01-01T00:00:00Z"
done
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  log "go build $c (nice; the apiserver link is the slow part)"
  (cd "$work" && "${nice_[@]}" "$GO" build -trimpath -ldflags "$ld" -o "$stage/$c" "k8s.io/kubernetes/cmd/$c") \
    || die "building $c failed"
done
log "go build etcd $etcd_ver"
(cd "$work" && "${nice_[@]}" "$GO" build -trimpath -ldflags "-s -w" -o "$stage/etcd" go.etcd.io/etcd/server/v3) \
  || die "building etcd failed"

# --- kwok and helm: plain `go install module@version` (no replace directives) -----------------------
log "go install kwok $KWOK_VERSION"
GOBIN="$stage" GOFLAGS=-buildvcs=false "${nice_[@]}" "$GO" install -trimpath \
  -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" \
  || die "building kwok failed"
# kwok's Stage configs (what kwokctl uses by default: node/fast, node/heartbeat-with-lease, pod/fast),
# taken from the same module; the cluster starts kwok with --config=<root>/kwok/stages.yaml.
kwok_new="$root/kwok.new"; rm -rf "$kwok_new"; mkdir -p "$kwok_new"
kwdir=$(modfield "sigs.k8s.io/kwok@$KWOK_VERSION" Dir)
for f in "$kwdir"/kustomize/stage/node/fast/*.yaml "$kwdir"/kustomize/stage/node/heartbeat-with-lease/*.yaml \
         "$kwdir"/kustomize/stage/pod/fast/*.yaml; do
  [[ "$(basename "$f")" == kustomization.yaml ]] && continue
  printf -- '---\n# %s\n' "${f#"$kwdir"/}"; cat "$f"
done > "$kwok_new/stages.yaml"
grep -q 'kind: Stage' "$kwok_new/stages.yaml" || die "no kwok Stage configs under $kwdir/kustomize/stage"
shared_helm="$cache/tools/helm-$HELM_VERSION/helm"
shared_helm_ver=$([[ -x "$shared_helm" ]] && "$shared_helm" version --short 2>/dev/null || true)
if [[ "$shared_helm_ver" == "$HELM_VERSION"* ]]; then
  log "helm $HELM_VERSION: reusing $shared_helm"
  cp "$shared_helm" "$stage/helm"
else
  log "go install helm $HELM_VERSION"
  GOBIN="$stage" GOFLAGS=-buildvcs=false "${nice_[@]}" "$GO" install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    || die "building helm failed"
fi

# --- third-party CRDs from their Go modules ----------------------------------------------------------
crds_new="$root/crds.new"; rm -rf "$crds_new"; mkdir -p "$crds_new/keda" "$crds_new/prometheus-operator"
log "CRDs: github.com/kedacore/keda/v2@$KEDA_VERSION"
kdir=$(modfield "github.com/kedacore/keda/v2@$KEDA_VERSION" Dir)
cp "$kdir"/config/crd/bases/*.yaml "$crds_new/keda/" || die "no CRDs under $kdir/config/crd/bases"
log "CRDs: github.com/prometheus-operator/prometheus-operator@$PROM_OPERATOR_VERSION"
pdir=$(modfield "github.com/prometheus-operator/prometheus-operator@$PROM_OPERATOR_VERSION" Dir)
cp "$pdir"/example/prometheus-operator-crd/*.yaml "$crds_new/prometheus-operator/" \
  || die "no CRDs under $pdir/example/prometheus-operator-crd"
chmod -R u+w "$crds_new"

# --- verify, then swap in atomically -----------------------------------------------------------------
for t in "${tools[@]}"; do [[ -x "$stage/$t" ]] || die "missing $t after build"; done
got=$("$stage/kube-apiserver" --version) || die "kube-apiserver --version failed"
[[ "$got" == "Kubernetes $K8S_VERSION" ]] || die "kube-apiserver reports '$got', want 'Kubernetes $K8S_VERSION'"
"$stage/etcd" --version | head -1 >&2
"$stage/kwok" --version >&2 || true
"$stage/helm" version --short >&2
rm -rf "$bin" "$crds" "$root/kwok"
mv "$stage" "$bin"; mv "$crds_new" "$crds"; mv "$kwok_new" "$root/kwok"
echo "$stamp_want" > "$root/STAMP"
log "done: $bin"
print_exports
