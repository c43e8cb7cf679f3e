"""Start or stop a throwaway local cluster by hand.

    eval "$(hack/k8s/build.sh --print-env)"
    python -m tests.e2e.cluster up [--full] [--name dev] [--crds eventflow,keda,prometheus-operator]
    export KUBECONFIG=...                      # printed by `up`
    python -m tests.e2e.cluster status [--name dev]
    python -m tests.e2e.cluster down [--name dev]
    python -m tests.e2e.cluster run [--full]   # foreground; Ctrl-C tears it down

`up` leaves the components running detached and records them in
${EVENTFLOW_CACHE:-~/.cache/eventflow}/k8s/clusters/<name>.json; `down` stops exactly those processes
(checked against the recorded binary directory) and removes the cluster's temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.e2e.cluster.controlplane import ClusterError, LocalCluster, Unavailable, pids_alive


def state_file(name: str) -> Path:
    cache = Path(os.environ.get("EVENTFLOW_CACHE", Path.home() / ".cache/eventflow"))
    return cache / "k8s/clusters" / f"{name}.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def start(args: argparse.Namespace) -> LocalCluster:
    cluster = LocalCluster(full=args.full, log=log, die_with_parent=args.command == "run")
    cluster.start(timeout=args.timeout)
    if args.crds:
        cluster.install_crds(*[c for c in args.crds.split(",") if c])
    return cluster


def cmd_up(args: argparse.Namespace) -> int:
    path = state_file(args.name)
    if path.exists():
        log(f"cluster {args.name!r} is already up ({path}); run `down --name {args.name}` first")
        return 1
    cluster = start(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cluster.state(), indent=2))
    for proc in cluster.procs.values():  # detach: the components outlive this command
        proc.returncode = 0
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    log(f"cluster {args.name!r} up: {cluster.server}; logs in {cluster.dir / 'logs'}; "
        f"stop with: python -m tests.e2e.cluster down --name {args.name}")
    return 0


def _ours(pid: int, bin_dir: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe").startswith(bin_dir.rstrip("/") + "/")
    except OSError:
        return False


def cmd_down(args: argparse.Namespace) -> int:
    path = state_file(args.name)
    if not path.exists():
        log(f"no cluster {args.name!r} ({path})")
        return 0
    state = json.loads(path.read_text())
    pids = [pid for pid in reversed(list(state["pids"].values())) if _ours(pid, state["bin"])]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids_alive(pids):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(state["dir"], ignore_errors=True)
    path.unlink()
    left = pids_alive(pids)
    log(f"cluster {args.name!r} down" + (f"; still alive: {left}" if left else ""))
    return 1 if left else 0


def cmd_status(args: argparse.Namespace) -> int:
    path = state_file(args.name)
    if not path.exists():
        log(f"no cluster {args.name!r}")
        return 1
    state = json.loads(path.read_text())
    for name, pid in state["pids"].items():
        log(f"{name:<24} pid {pid:<8} {'running' if _ours(pid, state['bin']) else 'GONE'}")
    print(f"export KUBECONFIG={state['kubeconfig']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cluster = start(args)
    print(f"export KUBECONFIG={cluster.kubeconfig}", flush=True)
    log("running; Ctrl-C to stop")
    try:
        while not (dead := [n for n, p in cluster.procs.items() if p.poll() is not None]):
            time.sleep(1)
        log(f"component(s) exited: {dead}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()
        log("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "run"])
    parser.add_argument("--name", default="dev", help="cluster name for up/down/status (default: dev)")
    parser.add_argument("--full", action="store_true",
                        help="add kube-controller-manager, kube-scheduler and kwok with one fake node")
    parser.add_argument("--crds", default="", help="comma-separated CRD sets: eventflow,keda,prometheus-operator")
    parser.add_argument("--timeout", type=float, default=90)
    args = parser.parse_args(argv)
    try:
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status, "run": cmd_run}[args.command](args)
    except (ClusterError, Unavailable) as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
