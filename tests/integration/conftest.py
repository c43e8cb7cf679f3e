"""Fixtures for tests that run consumers and reapers as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from eventflow.settings import EventflowSettings, settings_env

FAST = {  # short leases and idle thresholds so faults resolve in seconds, not minutes
    "consumer": {"lease_ttl_ms": 1500, "heartbeat_interval_ms": 250, "heartbeat_ttl_ms": 1500, "block_ms": 200,
                 "pending_rescan_s": 0.3, "retry_base_ms": 200, "concurrency": 2, "drain_timeout_s": 10},
    "reaper": {"interval_s": 0.3, "min_idle_ms": 2000},
}


class Fleet:
    """Consumer and reaper child processes sharing one settings environment."""

    def __init__(self, settings: EventflowSettings, log_dir: Path) -> None:
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("EVENTFLOW_")},
                    **settings_env(settings), "EVENTFLOW_LOG__LEVEL": "INFO"}
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def start(self, component: str, **env: str) -> subprocess.Popen[bytes]:
        self.count += 1
        log = (self.log_dir / f"{component}-{self.count}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "eventflow", component], env={**self.env, **env},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.log_dir.glob("*.log")))

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with_group(p, signal.SIGCONT)
                p.kill()
        for p in self.procs:
            p.wait(10)


def with_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process and its job children (its session), as a pod's container would be."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
async def fleet(redis: Redis, make_settings: Callable[..., EventflowSettings], tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Fleet] = []

    def create(**groups: dict[str, Any]) -> Fleet:
        merged = {g: {**FAST.get(g, {}), **groups.get(g, {})} for g in {*FAST, *groups}}
        f = Fleet(make_settings(**merged), tmp_path)
        made.append(f)
        return f

    yield create
    for f in made:
        f.stop_all()
        print(f.logs())  # pytest shows this only when the test failed


