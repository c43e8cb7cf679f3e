"""Benchmark the ingest HTTP service: accepted jobs/s at saturation, latency at a fixed offered rate.

Usage::

    python bench/ingest_bench.py [--workers 2] [--client-procs 1] [--connections 64] [--seconds 10]
                                 [--rate 1000] [--appendfsync always] [--phases saturation,rate]
                                 [--no-lean-submit]

What it runs, all on 127.0.0.1: a redis-server it starts itself (``eventflow.embedded.EmbeddedServer``,
AOF on, ``appendfsync always`` by default, as ``eventflow up`` and the chart run it), bootstrapped; the
ingest under uvicorn with ``--workers`` processes (``create_app`` from the environment, as ``eventflow
ingest`` builds it); and ``--client-procs`` load-generator processes with aiohttp keep-alive connections.
Every request is a distinct NDVI job (the bundled Sentinel-2 sample, its own farm id), so each success is a
new stream entry: ``202``.

* ``saturation``: ``--connections`` connections post back to back for ``--seconds``; accepted jobs/s is
  the number of 202s over that time (after a one-second warm-up that is not counted).
* ``fixed rate``: ``--rate`` jobs/s offered open-loop for ``--seconds``; each request's latency is measured
  from its *scheduled* send time, so a stall shows up in the tail instead of slowing the offer
  (no coordinated omission).

Redis is flushed and bootstrapped again between phases, so the backlog bound never answers 429. CPU
seconds per component (from /proc) show where the cores went. Nothing here asserts; it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src/eventflow/samples/s2l1c"
TOKEN = "bench-token-0123456789abcdef"


def app() -> Any:
    """uvicorn factory (``--factory ingest_bench:app``): the ingest app from EVENTFLOW_* settings."""
    from eventflow_ingest.app import create_app

    from eventflow.logs import configure_logging
    from eventflow.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log.level, settings.log.json_format, component="ingest")
    return create_app(settings)


def job_body(farm_id: str) -> bytes:
    """A distinct, valid request: the bundled sample under its own farm id."""
    return json.dumps({"farm_id": farm_id, "sensor": "sentinel2", "inputs": {
        "red": {"href": (SAMPLE / "T33UUU_20170216T102101_B04.jp2").as_uri(), "band": 1},
        "nir": {"href": (SAMPLE / "T33UUU_20170216T102101_B08.jp2").as_uri(), "band": 1}}}).encode()


# ---------------------------------------------------------------- load generator (child processes)

async def _saturate(url: str, name: str, connections: int, warmup_s: float, seconds: float) -> dict[str, Any]:
    import aiohttp

    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    seq = requests = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + seconds
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(url, connector=connector) as session:

        async def loop() -> None:
            nonlocal seq, requests
            while (now := time.perf_counter()) < stop_at:
                seq += 1
                async with session.post("/v1/ndvi/jobs", data=job_body(f"{name}-{seq}"), headers=headers) as reply:
                    await reply.read()
                done = time.perf_counter()
                requests += 1
                if now >= measure_from:
                    statuses[reply.status] += 1
                    latencies.append(done - now)

        await asyncio.gather(*(loop() for _ in range(connections)))
    return {"statuses": dict(statuses), "latencies": latencies, "requests": requests}


async def _offer(url: str, name: str, rate: float, seconds: float, start_at: float) -> dict[str, Any]:
    import aiohttp

    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    total = int(rate * seconds)
    bodies = [job_body(f"{name}-{i}") for i in range(total)]
    # Enough connections that the pool is never what delays a request at the offered rate.
    connector = aiohttp.TCPConnector(limit=256, force_close=False)
    async with aiohttp.ClientSession(url, connector=connector) as session:

        async def one(i: int, scheduled: float) -> None:
            async with session.post("/v1/ndvi/jobs", data=bodies[i], headers=headers) as reply:
                await reply.read()
            statuses[reply.status] += 1
            latencies.append(time.time() - scheduled)

        tasks = []
        for i in range(total):
            scheduled = start_at + i / rate
            delay = scheduled - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
    return {"statuses": dict(statuses), "latencies": latencies, "requests": total}


def _client(kind: str, args: tuple[Any, ...], out: Any) -> None:
    try:
        import uvloop  # optional: a faster loop makes the client cheaper, leaving more CPU to the server

        uvloop.install()
    except ImportError:
        pass
    coro = _saturate(*args) if kind == "saturate" else _offer(*args)
    result = asyncio.run(coro)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.send({**result, "cpu_s": usage.ru_utime + usage.ru_stime})
    out.close()


def run_clients(kind: str, per_proc_args: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Run one load generator per argument tuple, in parallel processes; merge their results."""
    ctx = multiprocessing.get_context("spawn")
    procs, pipes = [], []
    for args in per_proc_args:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_client, args=(kind, args, child))
        proc.start()
        procs.append(proc)
        pipes.append(parent)
    merged: dict[str, Any] = {"statuses": Counter(), "latencies": [], "cpu_s": 0.0, "requests": 0}
    for pipe, proc in zip(pipes, procs, strict=True):
        result = pipe.recv()
        proc.join()
        merged["statuses"].update(result["statuses"])
        merged["latencies"] += result["latencies"]
        merged["cpu_s"] += result["cpu_s"]
        merged["requests"] += result["requests"]
    return merged


# ---------------------------------------------------------------- orchestration

def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (uvicorn's worker processes)."""
    total = cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        try:
            total += tree_cpu(int(child))
        except FileNotFoundError:
            pass
    return total


def per_request(cpu: tuple[float, float], result: dict[str, Any]) -> str:
    """CPU microseconds per request of the ingest, Redis and the load generator (robust to a busy machine)."""
    n = max(1, result["requests"])
    return (f"ingest {cpu[0] / n * 1e6:.0f} us, redis {cpu[1] / n * 1e6:.0f} us, "
            f"clients {result['cpu_s'] / n * 1e6:.0f} us")


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, in milliseconds."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> int:
    """Start Redis and the ingest, run both phases, print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    parser.add_argument("--client-procs", type=int, default=1, help="load-generator processes (default 1)")
    parser.add_argument("--connections", type=int, default=64, help="saturation: connections in total (default 64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed-rate phase: jobs/s offered (default 1000)")
    parser.add_argument("--appendfsync", default="always", choices=["always", "everysec", "no"],
                        help="Redis AOF fsync policy (default always, as deployed)")
    parser.add_argument("--phases", default="saturation,rate", help="comma-separated: saturation, rate")
    parser.add_argument("--no-lean-submit", action="store_true",
                        help="serve POST /v1/ndvi/jobs through FastAPI (EVENTFLOW_INGEST__LEAN_SUBMIT=false), for A/B")
    args = parser.parse_args()

    from redis.asyncio import Redis

    from eventflow.embedded import EmbeddedServer, free_port
    from eventflow.redis.client import bootstrap, connect, keys_for
    from eventflow.settings import load_settings, settings_env

    with tempfile.TemporaryDirectory(prefix="eventflow-ingest-bench-") as tmp:
        redis_server = EmbeddedServer(data_dir=Path(tmp) / "redis", appendfsync=args.appendfsync).start()
        port = free_port()
        settings = load_settings(
            redis={"url": redis_server.url}, ingest={"port": port, "tokens": {TOKEN: "bench"},
                                                    "max_backlog": 10_000_000, "lean_submit": not args.no_lean_submit},
            ndvi={"data_roots": [str(SAMPLE.parent)]}, metrics={"enabled": False}, log={"level": "WARNING"})

        async def reset() -> None:
            client: Redis = connect(settings)
            try:
                await client.flushall()
                await client.function_flush()
                await bootstrap(client, keys_for(settings))
            finally:
                await client.aclose()

        asyncio.run(reset())
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("EVENTFLOW_")}, **settings_env(settings)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
        ingest = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "ingest_bench:app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--workers", str(args.workers), "--no-access-log", "--log-level", "warning",
             "--timeout-graceful-shutdown", "5"], env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url)
            import httpx

            loop_impl = httpx.get(f"{url}/healthz").headers.get("server", "")
            print(f"ingest: {args.workers} uvicorn worker(s) {loop_impl}, submit via "
                  f"{'FastAPI' if args.no_lean_submit else 'LeanSubmit'}; clients: {args.client_procs} process(es); "
                  f"redis {redis_server.kind}-server appendfsync {args.appendfsync}; {os.cpu_count()} CPUs",
                  flush=True)
            procs = args.client_procs
            if "saturation" in args.phases:
                before = (tree_cpu(ingest.pid), cpu_seconds(redis_server.process.pid))  # type: ignore[union-attr]
                t0 = time.perf_counter()
                result = run_clients("saturate", [(url, f"s{p}", max(1, args.connections // procs), 1.0,
                                                   args.seconds) for p in range(procs)])
                wall = time.perf_counter() - t0
                accepted = result["statuses"].get(202, 0)
                lat = result["latencies"]
                cpu = (tree_cpu(ingest.pid) - before[0],
                       cpu_seconds(redis_server.process.pid) - before[1])  # type: ignore[union-attr]
                print(f"saturation: {args.connections} connections, {args.seconds:.0f} s measured: "
                      f"{accepted / args.seconds:,.0f} accepted jobs/s ({accepted} x 202, other "
                      f"{ {k: v for k, v in result['statuses'].items() if k != 202} }); latency "
                      f"p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms; CPU s over {wall:.1f} s: "
                      f"ingest {cpu[0]:.1f}, redis {cpu[1]:.1f}, clients {result['cpu_s']:.1f}; per request: "
                      f"{per_request(cpu, result)}", flush=True)
                asyncio.run(reset())
            if "rate" in args.phases:
                before = (tree_cpu(ingest.pid), cpu_seconds(redis_server.process.pid))  # type: ignore[union-attr]
                start_at = time.time() + 2.0  # after every client process has started and built its bodies
                result = run_clients("offer", [(url, f"r{p}", args.rate / procs, args.seconds, start_at)
                                               for p in range(procs)])
                cpu = (tree_cpu(ingest.pid) - before[0],
                       cpu_seconds(redis_server.process.pid) - before[1])  # type: ignore[union-attr]
                lat = result["latencies"]
                print(f"fixed rate: {args.rate:,.0f} jobs/s offered for {args.seconds:.0f} s: "
                      f"{result['statuses'].get(202, 0)} x 202, other "
                      f"{ {k: v for k, v in result['statuses'].items() if k != 202} }; latency from scheduled "
                      f"send: p50 {pct(lat, 0.5):.1f} ms, p90 {pct(lat, 0.9):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, "
                      f"max {max(lat) * 1000:.1f} ms, mean {statistics.fmean(lat) * 1000:.1f} ms; CPU per request: "
                      f"{per_request(cpu, result)}", flush=True)
        finally:
            ingest.terminate()
            try:
                ingest.wait(15)
            except subprocess.TimeoutExpired:
                ingest.kill()
                ingest.wait()
            redis_server.stop()
    return 0


def _wait_ready(url: str, timeout_s: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"ingest at {url} not ready within {timeout_s}s")


if __name__ == "__main__":
    sys.exit(main())
