"""`eventflow up` as a user runs it: a real subprocess tree, the sample job over HTTP, a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio

from eventflow.cli import sample_request

pytestmark = pytest.mark.e2e


def children_of(pid: int) -> set[int]:
    """All descendants of pid, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Up:
    """A running `eventflow up` with its stdout/stderr collected."""

    def __init__(self, data_dir: Path, consumers: int = 2) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTFLOW_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eventflow", "up", "--consumers", str(consumers), "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream: object, sink: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line)

    def wait_for_line(self, sink: list[str], needle: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(sink):
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not seen; stdout={self.stdout!r} stderr={''.join(self.stderr)[-3000:]}")


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    running = Up(tmp_path / "state")
    yield running
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait(10)


def reference_ndvi() -> np.ndarray:
    """Independent float64 NDVI of the bundled scene (red B04, NIR B08)."""
    req = sample_request()
    with rasterio.open(req["inputs"]["red"]["href"].removeprefix("file://")) as r:
        red = r.read(1).astype(np.float64)
    with rasterio.open(req["inputs"]["nir"]["href"].removeprefix("file://")) as n:
        nir = n.read(1).astype(np.float64)
    red, nir = red * 1e-4, nir * 1e-4
    with np.errstate(divide="ignore", invalid="ignore"):
        ndvi = (nir - red) / (nir + red)
    ndvi[(nir + red) == 0] = np.nan
    return np.clip(ndvi, -1, 1)


def test_up_runs_the_sample_and_stops_cleanly(up: Up) -> None:
    line = up.wait_for_line(up.stdout, "EventFlow API listening on", 90)
    api = line.rsplit(" ", 1)[1].strip()
    pids = children_of(up.proc.pid)
    assert len(pids) >= 5, pids  # redis + ingest + 2 consumers + reaper

    with httpx.Client(base_url=api, timeout=10) as client:
        reply = client.post("/v1/ndvi/jobs", json=sample_request())
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["job_id"]
        deadline = time.monotonic() + 90
        while True:
            view = client.get(f"/v1/ndvi/jobs/{job_id}").json()
            if view["state"] in ("succeeded", "failed", "dead_lettered"):
                break
            assert time.monotonic() < deadline, view
            time.sleep(0.2)
        assert view["state"] == "succeeded", view
        assert view["attempts"] == 1
        # The same request again is the same job, not a second run.
        again = client.post("/v1/ndvi/jobs", json=sample_request())
        assert again.status_code == 200 and again.json()["job_id"] == job_id

    out = Path(view["result"]["outputs"]["ndvi"])
    with rasterio.open(out) as ds:
        got = ds.read(1)
        assert ds.dtypes[0] == "float32" and np.isnan(ds.nodata)
    expected = reference_ndvi()
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    valid = ~np.isnan(expected)
    assert np.max(np.abs(got[valid] - expected[valid])) < 1e-6
    stats = view["result"]["stats"]
    assert stats["valid_count"] == int(valid.sum())
    assert stats["mean"] == pytest.approx(float(expected[valid].mean()), abs=1e-5)

    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(60) == 0, "".join(up.stderr)[-3000:]
    time.sleep(0.2)
    survivors = [p for p in pids if alive(p)]
    assert survivors == [], f"processes left behind: {survivors}"


def test_up_restarts_a_killed_consumer(up: Up) -> None:
    up.wait_for_line(up.stdout, "EventFlow API listening on", 90)
    log = Path(up.wait_for_line(up.stderr, "logs in", 5).split("logs in ", 1)[1].split(";", 1)[0])
    pid = None
    for child in children_of(up.proc.pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"consumer" in cmd:
            pid = child
            break
    assert pid is not None and log.exists()
    os.kill(pid, signal.SIGKILL)
    up.wait_for_line(up.stderr, "restarted consumer-", 30)
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(60) == 0
