"""The local supervisor behind ``eventflow up``: child processes restarted like Kubernetes would.

Each child runs ``python -m eventflow <component>`` in its own session (so a terminal Ctrl-C reaches
only the supervisor, which then stops children in order: consumers drain first, Redis stops last) and
with PR_SET_PDEATHSIG, so a supervisor killed with SIGKILL still leaves no child behind.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM us when the parent dies.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def child_preexec() -> None:
    """preexec_fn for every supervised process (also the embedded Redis)."""
    _die_with_parent()


@dataclass
class Child:
    """One supervised process and its restart bookkeeping."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    backoff_s: float = 0.5
    started_at: float = field(default=0.0)

    def start(self) -> None:
        """Start (or restart) the process, appending its output to its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=child_preexec,
            )
        self.started_at = time.monotonic()


class Supervisor:
    """Starts children, restarts those that die, and stops them all in order."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.stopping = False

    def start_all(self) -> None:
        """Start every child."""
        for child in self.children:
            child.start()
            log.info("started %s (pid %s)", child.name, child.process.pid if child.process else "?")

    def poll(self) -> None:
        """Restart children that exited, with exponential backoff (like a CrashLoopBackOff)."""
        now = time.monotonic()
        for child in self.children:
            proc = child.process
            if proc is None or proc.poll() is None or self.stopping:
                continue
            if child.next_start == 0.0:
                # A child that ran for a while gets a fresh backoff; a crash loop backs off further.
                if now - child.started_at > 30:
                    child.backoff_s = 0.5
                child.next_start = now + child.backoff_s
                print(f"eventflow up: {child.name} (pid {proc.pid}) exited with code {proc.returncode}; "
                      f"restarting in {child.backoff_s:.1f}s (log: {child.log_path})", file=sys.stderr, flush=True)
                child.backoff_s = min(child.backoff_s * 2, 30.0)
            elif now >= child.next_start:
                child.next_start = 0.0
                child.restarts += 1
                child.start()
                print(f"eventflow up: restarted {child.name} as pid {child.process.pid if child.process else '?'} "
                      f"(restart #{child.restarts})", file=sys.stderr, flush=True)

    def stop_all(self, order: list[list[str]], timeout_s: float) -> None:
        """SIGTERM children group by group (prefix match on names), waiting for each group to exit."""
        self.stopping = True
        for prefixes in order:
            group = [c for c in self.children if any(c.name.startswith(p) for p in prefixes)]
            for child in group:
                if child.process is not None and child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"eventflow up: {child.name} did not stop in {timeout_s:.0f}s; killing it", file=sys.stderr)
                    child.process.kill()
                    child.process.wait(5)

    def pids(self) -> list[int]:
        """PIDs of children still running."""
        return [c.process.pid for c in self.children if c.process is not None and c.process.poll() is None]


def child_env(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The environment for a child: ours minus EVENTFLOW_* (settings are passed explicitly) plus extra."""
    env = {k: v for k, v in base.items() if not k.startswith("EVENTFLOW_")}
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


__all__ = ["Child", "Supervisor", "child_env", "child_preexec"]
