"""Throwaway Kubernetes clusters for the e2e tests.

Two backends, one interface (``kubeconfig``, ``kubectl()``, ``helm()``, ``install_crds()``, ``stop()``):

* :class:`LocalCluster` — real etcd + kube-apiserver built by ``hack/k8s/build.sh`` (no Docker), all on
  127.0.0.1 with free ports in a temp dir. ``full=True`` adds kube-controller-manager, kube-scheduler and
  kwok with one fake node, so Deployments get (fake) Running pods.
* :class:`KindCluster` — ``kind create cluster`` for machines that have Docker.

Binaries come from ``$EVENTFLOW_K8S_BIN`` (``eval "$(hack/k8s/build.sh --print-env)"``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts/eventflow"
#: The CRDs of KEDA and the Prometheus Operator that the chart renders objects for.
THIRD_PARTY_CRDS = {
    "keda": ["keda.sh_scaledobjects.yaml", "keda.sh_scaledjobs.yaml", "keda.sh_triggerauthentications.yaml",
             "keda.sh_clustertriggerauthentications.yaml"],
    "prometheus-operator": ["monitoring.coreos.com_servicemonitors.yaml", "monitoring.coreos.com_podmonitors.yaml",
                            "monitoring.coreos.com_prometheusrules.yaml",
                            "monitoring.coreos.com_alertmanagerconfigs.yaml"],
}
FAKE_NODE = "kwok-node-0"
TMP_PREFIX = "eventflow-k8s-"


class ClusterError(RuntimeError):
    """A cluster could not be started (the message carries the failing component's log tail)."""


class Unavailable(RuntimeError):
    """The backend cannot run on this machine (missing binaries, no Docker); the message says why."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def k8s_bin_dir() -> Path:
    """``$EVENTFLOW_K8S_BIN`` with every binary present, or :class:`Unavailable` saying how to build it."""
    raw = os.environ.get("EVENTFLOW_K8S_BIN")
    hint = 'run: eval "$(hack/k8s/build.sh --print-env)"'
    if not raw:
        raise Unavailable(f"EVENTFLOW_K8S_BIN is not set ({hint})")
    path = Path(raw)
    missing = [b for b in LocalCluster.BINARIES if not os.access(path / b, os.X_OK)]
    if missing:
        raise Unavailable(f"EVENTFLOW_K8S_BIN={path} lacks {', '.join(missing)} ({hint})")
    return path


def crd_dir() -> Path | None:
    raw = os.environ.get("EVENTFLOW_K8S_CRDS")
    if raw:
        return Path(raw)
    bin_dir = os.environ.get("EVENTFLOW_K8S_BIN")
    return Path(bin_dir).parent / "crds" if bin_dir else None


class Cluster:
    """What the tests use, whatever the backend."""

    backend = "?"
    kubeconfig: Path
    kubectl_bin: str
    helm_bin: str

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        env["KUBECONFIG"] = str(self.kubeconfig)
        env.setdefault("HOME", tempfile.gettempdir())
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self._run([self.kubectl_bin, *args], input=input, check=check, timeout=timeout)

    def helm(self, *args: str, input: str | None = None, check: bool = True,
             timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self._run([self.helm_bin, *args], input=input, check=check, timeout=timeout)

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def _run(self, argv: list[str], *, input: str | None, check: bool,
             timeout: float) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                                env=self.env(), check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    # -- CRDs ------------------------------------------------------------------------------------------

    def eventflow_crds(self) -> str:
        """The project's CRDs, rendered from the chart exactly as ``helm install`` would."""
        docs = []
        for name in sorted(p.name for p in (CHART / "templates/crds").glob("*.yaml")):
            out = self.helm("template", "eventflow", str(CHART), "--show-only", f"templates/crds/{name}").stdout
            docs.append(out)
        return "\n---\n".join(docs)

    def install_crds(self, *sets: str, timeout: float = 60) -> list[str]:
        """Install CRD sets on demand ("eventflow", "keda", "prometheus-operator"); wait until Established."""
        names: list[str] = []
        for which in sets or ("eventflow",):
            if which == "eventflow":
                manifest = self.eventflow_crds()
            elif which in THIRD_PARTY_CRDS:
                base = crd_dir()
                if base is None or not (base / which).is_dir():
                    raise Unavailable(f"no {which} CRDs at {base}/{which} (run hack/k8s/build.sh)")
                manifest = "\n---\n".join((base / which / f).read_text() for f in THIRD_PARTY_CRDS[which])
            else:
                raise ValueError(f"unknown CRD set {which!r}")
            # Server-side apply: the Prometheus Operator CRDs are too big for the last-applied annotation.
            out = self.kubectl("apply", "--server-side", "--force-conflicts", "-o", "name", "-f", "-",
                               input=manifest).stdout
            names += [line.strip() for line in out.splitlines() if line.strip()]
        self.kubectl("wait", "--for=condition=Established", f"--timeout={int(timeout)}s", *names, timeout=timeout + 10)
        return names

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalCluster(Cluster):
    """etcd + kube-apiserver (+ controller-manager, scheduler, kwok) as child processes on 127.0.0.1."""

    backend = "local"
    BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl", "helm")

    def __init__(self, full: bool = False, bin_dir: Path | None = None, work_dir: Path | None = None,
                 log: Any = None, die_with_parent: bool = True) -> None:
        self.full = full
        self.die_with_parent = die_with_parent
        self.bin = bin_dir or k8s_bin_dir()
        self.kubectl_bin = str(self.bin / "kubectl")
        self.helm_bin = str(self.bin / "helm")
        if not work_dir:
            _sweep_stale_dirs()
        self.dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        self.dir.mkdir(parents=True, exist_ok=True)
        # Who owns the dir: a crashed test run's leftovers are swept by the next run; `up` clusters are not.
        (self.dir / "owner").write_text(str(os.getpid()) if die_with_parent else "detached")
        self.kubeconfig = self.dir / "kubeconfig"
        self.token = secrets.token_hex(16)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self._log = log or (lambda msg: None)
        self.server = ""

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> LocalCluster:
        t0 = time.monotonic()
        try:
            self._start_etcd(timeout)
            self._start_apiserver(timeout)
            if self.full:
                self._start_controllers(timeout)
        except BaseException:
            self.stop()
            raise
        self._log(f"cluster up in {time.monotonic() - t0:.1f}s: KUBECONFIG={self.kubeconfig}")
        return self

    def stop(self) -> None:
        """Stop the components one by one in reverse start order (SIGTERM, SIGKILL after 10s; the apiserver
        must go before etcd or its shutdown hangs on storage), then remove the temp dir."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._log(f"{name} ignored SIGTERM for 10s; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def alive(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is None]

    def state(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "kubeconfig": str(self.kubeconfig), "server": self.server,
                "full": self.full, "pids": {n: p.pid for n, p in self.procs.items()}, "bin": str(self.bin)}

    # -- components ------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{name}.log", "ab") as out:
            env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
            env["HOME"] = str(self.dir / "home")  # kwok and friends may write ~/.kube, ~/.kwok
            proc = subprocess.Popen([str(self.bin / argv[0]), *argv[1:]], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.dir, env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent if self.die_with_parent else None)
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.dir / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait(self, name: str, ready: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                   f"{self.log_tail(name)}")
            try:
                if ready():
                    return
            except Exception as exc:
                last = exc
            time.sleep(0.25)
        raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}):\n"
                           f"{self.log_tail(name)}")

    def _start_etcd(self, timeout: float) -> None:
        client, peer = free_port(), free_port()
        self.ports.update(etcd=client, etcd_peer=peer)
        self._spawn("etcd", [
            "etcd", "--name=eventflow", f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}", f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=eventflow=http://127.0.0.1:{peer}", "--unsafe-no-fsync", "--log-level=warn",
        ])

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{client}/health", timeout=2) as r:
                return json.load(r).get("health") == "true"

        self._wait("etcd", healthy, timeout, "etcd /health")

    def _start_apiserver(self, timeout: float) -> None:
        port = free_port()
        self.ports["apiserver"] = port
        self.server = f"https://127.0.0.1:{port}"
        certs = self.dir / "certs"
        certs.mkdir()
        sa_key = self.dir / "sa.key"
        _make_rsa_key(sa_key)
        (self.dir / "tokens.csv").write_text(f'{self.token},eventflow-admin,eventflow-admin,"system:masters"\n')
        self._spawn("kube-apiserver", [
            "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
            f"--cert-dir={certs}", f"--token-auth-file={self.dir / 'tokens.csv'}",
            "--authorization-mode=RBAC", f"--service-account-key-file={sa_key}",
            f"--service-account-signing-key-file={sa_key}", f"--service-account-issuer={self.server}",
            "--service-cluster-ip-range=10.0.0.0/24", "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none", "--allow-privileged=true", "--profiling=false",
        ])
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        def ready() -> bool:
            req = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})
            with urllib.request.urlopen(req, timeout=3, context=insecure) as r:
                return r.status == 200

        self._wait("kube-apiserver", ready, timeout, "kube-apiserver /readyz")
        ca = certs / "apiserver.crt"  # self-signed CA + serving cert written by the apiserver itself
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "eventflow",
            "clusters": [{"name": "eventflow", "cluster": {"server": self.server, "certificate-authority": str(ca)}}],
            "users": [{"name": "eventflow-admin", "user": {"token": self.token}}],
            "contexts": [{"name": "eventflow", "context": {"cluster": "eventflow", "user": "eventflow-admin"}}],
        }, indent=2))
        self.kubeconfig.chmod(0o600)
        # One verified request: the kubeconfig's CA really validates the server.
        verified = ssl.create_default_context(cafile=str(ca))
        req = urllib.request.Request(f"{self.server}/version", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5, context=verified) as r:
            self.version = json.load(r)

    def _start_controllers(self, timeout: float) -> None:
        kc, sa_key, ca = self.kubeconfig, self.dir / "sa.key", self.dir / "certs/apiserver.crt"
        kcm, sched, kwok = free_port(), free_port(), free_port()
        self.ports.update(controller_manager=kcm, scheduler=sched, kwok=kwok)
        delegated = [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                     "--bind-address=127.0.0.1", "--leader-elect=false"]
        self._spawn("kube-controller-manager", [
            "kube-controller-manager", *delegated, f"--secure-port={kcm}", f"--cert-dir={self.dir / 'kcm'}",
            f"--service-account-private-key-file={sa_key}", f"--root-ca-file={ca}",
            "--use-service-account-credentials=false", "--controllers=*,-nodeipam",
            "--concurrent-deployment-syncs=2", "--concurrent-replicaset-syncs=2",
        ])
        self._spawn("kube-scheduler", [
            "kube-scheduler", *delegated, f"--secure-port={sched}", f"--cert-dir={self.dir / 'scheduler'}",
        ])
        stages = Path(os.environ.get("EVENTFLOW_K8S_KWOK_CONFIG") or self.bin.parent / "kwok/stages.yaml")
        if not stages.is_file():
            raise Unavailable(f"no kwok stage config at {stages} (run hack/k8s/build.sh)")
        self._spawn("kwok", [
            "kwok", f"--kubeconfig={kc}", f"--config={stages}", "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--manage-nodes-with-label-selector=",
            "--cidr=10.0.1.0/24", "--node-ip=10.0.1.1", f"--server-address=127.0.0.1:{kwok}",
            "--node-lease-duration-seconds=40",
        ])
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        for name, port in (("kube-controller-manager", kcm), ("kube-scheduler", sched)):

            def healthy(port: int = port) -> bool:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=3, context=insecure) as r:
                    return r.status == 200

            self._wait(name, healthy, timeout, f"{name} /healthz")
        self.kubectl("apply", "-f", "-", input=json.dumps(_fake_node(FAKE_NODE)))

        def node_ready() -> bool:
            node = self.kubectl_json("get", "node", FAKE_NODE)
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            return conds.get("Ready") == "True"

        self._wait("kwok", node_ready, timeout, f"fake node {FAKE_NODE} Ready")

        def default_sa() -> bool:  # the serviceaccount controller is running
            return self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

        self._wait("kube-controller-manager", default_sa, timeout, "default ServiceAccount")


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux/glibc: no parent-death signal
    _PRCTL = None


def _sweep_stale_dirs() -> None:
    """Remove temp dirs of local clusters whose owning process died without tearing down (e.g. SIGKILL)."""
    for path in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        try:
            owner = (path / "owner").read_text().strip()
        except OSError:
            continue
        if owner.isdigit() and not pids_alive([int(owner)]):
            shutil.rmtree(path, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies (no orphans after a crashed run)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _make_rsa_key(path: Path) -> None:
    """A throwaway RSA key for service-account tokens (openssl, else the cryptography package)."""
    if shutil.which("openssl"):
        subprocess.run(["openssl", "genrsa", "-out", str(path), "2048"], check=True, capture_output=True, timeout=60)
        return
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError as exc:
        raise Unavailable("need openssl (apt-get install openssl) to make a service-account key") from exc
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))


def _fake_node(name: str) -> dict[str, Any]:
    """A Node object kwok manages (annotation kwok.x-k8s.io/node=fake) and marks Ready."""
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "100Gi"}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                       "kubernetes.io/role": "agent", "type": "kwok"},
        },
        "spec": {},
        "status": {"allocatable": resources, "capacity": resources},
    }


class KindCluster(Cluster):
    """``kind create cluster`` (needs Docker); same interface as :class:`LocalCluster`."""

    backend = "kind"

    def __init__(self, name: str | None = None, image: str | None = None) -> None:
        self.name = name or f"eventflow-e2e-{secrets.token_hex(3)}"
        self.image = image or os.environ.get("EVENTFLOW_KIND_IMAGE")
        self.dir = Path(tempfile.mkdtemp(prefix="eventflow-kind-"))
        self.kubeconfig = self.dir / "kubeconfig"
        bin_dir = os.environ.get("EVENTFLOW_K8S_BIN")
        self.kubectl_bin = shutil.which("kubectl") or (f"{bin_dir}/kubectl" if bin_dir else "kubectl")
        self.helm_bin = shutil.which("helm") or (f"{bin_dir}/helm" if bin_dir else "helm")
        self.full = True

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why kind cannot run here, or None."""
        if not shutil.which("kind"):
            return "kind is not installed (the local backend covers these tests without Docker)"
        if not shutil.which("docker"):
            return "docker is not installed"
        probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["docker info failed"])[-1]
            return f"Docker daemon unavailable: {last}"
        return None

    def start(self, timeout: float = 300) -> KindCluster:
        argv = ["kind", "create", "cluster", "--name", self.name, "--kubeconfig", str(self.kubeconfig),
                "--wait", f"{int(timeout)}s"]
        if self.image:
            argv += ["--image", self.image]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 60, check=False)
        if result.returncode != 0:
            self.stop()
            raise ClusterError(f"kind create cluster failed:\n{result.stderr}")
        return self

    def stop(self) -> None:
        subprocess.run(["kind", "delete", "cluster", "--name", self.name], capture_output=True, timeout=180,
                       check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_cluster(backend: str = "local", full: bool = False, **kw: Any) -> Cluster:
    if backend == "kind":
        reason = KindCluster.unavailable_reason()
        if reason:
            raise Unavailable(reason)
        return KindCluster(**kw).start()
    return LocalCluster(full=full, **kw).start()


def pids_alive(pids: Iterable[int]) -> list[int]:
    """The pids that still run (a zombie waiting for its parent to reap it counts as gone)."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "?"
        if state not in {"Z", "X"}:
            alive.append(pid)
    return alive
