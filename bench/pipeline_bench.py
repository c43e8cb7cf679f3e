"""Benchmark the consumer protocol end to end with a no-op handler, beside the raw Redis Streams limit.

Usage::

    python bench/pipeline_bench.py [--jobs 20000] [--consumers 1,2] [--rate 1000] [--rate-seconds 10]
                                   [--concurrency 64] [--appendfsync everysec]

What it measures, each on a fresh redis-server it starts itself (127.0.0.1, AOF on):

* ``raw``: the Redis Streams floor on this machine: one producer XADDs entries (pipelined), one reader
  per consumer process does XREADGROUP COUNT 100 + XACK, nothing else.
* ``saturation``: ``--jobs`` jobs submitted through eventflow_submit_job before N consumer processes
  (``python -m eventflow consumer``, thread isolation, the no-op handler below) start; jobs/s is the
  number of committed results over the time from consumer start to the last commit.
* ``latency``: jobs submitted at a fixed ``--rate`` while N consumers run; latency is result commit time
  minus submit time, per job (p50/p90/p99/max). "Added latency" is that minus the raw stream round trip.

Every job goes through the whole protocol: result-exists check, lease + fencing token, started event,
execute, fenced commit, owner-checked ack, lease release. Nothing here asserts timings; it prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from eventflow_consumer.handlers import on_event_loop

REPO = Path(__file__).resolve().parents[1]


@on_event_loop
def handler(entry: Any, ctx: Any) -> dict[str, Any]:
    """The no-op job: no I/O, returns at once (loaded by consumers as bench.pipeline_bench:handler).

    Declared trivially short, so the consumer runs it on its event loop (``--handler loop``, the default).
    """
    return {"outputs": {}, "stats": {}}


def thread_handler(entry: Any, ctx: Any) -> dict[str, Any]:
    """The same no-op, undeclared: handed to a worker thread like any other handler (``--handler thread``)."""
    return {"outputs": {}, "stats": {}}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def raw_streams(url: str, n: int, readers: int) -> dict[str, float]:
    """XADD n entries, then `readers` concurrent readers XREADGROUP + XACK them all; entries/s of each."""
    from redis.asyncio import Redis

    r = Redis.from_url(url, decode_responses=True)
    await r.delete("raw")
    await r.xgroup_create("raw", "g", id="0", mkstream=True)
    t0 = time.perf_counter()
    for start in range(0, n, 500):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + 500)):
                pipe.xadd("raw", {"i": str(i), "payload": "x" * 300})
            await pipe.execute()
    xadd_s = time.perf_counter() - t0

    async def reader(name: str) -> int:
        client = Redis.from_url(url, decode_responses=True)
        done = 0
        while True:
            reply = await client.xreadgroup("g", name, {"raw": ">"}, count=100, block=200)
            if not reply:
                break
            ids = [entry_id for _, entries in reply for entry_id, _ in entries]
            await client.xack("raw", "g", *ids)
            done += len(ids)
        await client.aclose()
        return done

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(reader(f"c{i}") for i in range(readers)))
    read_s = time.perf_counter() - t0 - 0.2  # the last, empty 200 ms block is not work
    await r.aclose()
    return {"xadd_per_s": n / xadd_s, "read_ack_per_s": sum(counts) / read_s}


async def raw_round_trip(url: str, samples: int = 2000) -> tuple[float, float]:
    """Median and p99 seconds for XADD -> XREADGROUP -> XACK of one entry, one at a time (the stream's own
    latency; its p99 shows how much of the protocol's tail this box's scheduling adds by itself)."""
    from redis.asyncio import Redis

    r = Redis.from_url(url, decode_responses=True)
    await r.delete("rt")
    await r.xgroup_create("rt", "g", id="$", mkstream=True)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        await r.xadd("rt", {"p": "x"})
        reply = await r.xreadgroup("g", "c", {"rt": ">"}, count=1)
        await r.xack("rt", "g", reply[0][1][0][0])
        times.append(time.perf_counter() - t0)
    await r.aclose()
    return statistics.median(times), pct(times, 0.99)


def consumer_env(url: str, concurrency: int, output_root: Path, handler_mode: str = "loop") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTFLOW_")}
    env.update({
        "EVENTFLOW_REDIS__URL": url,
        "EVENTFLOW_CONSUMER__ISOLATION": "thread",
        "EVENTFLOW_CONSUMER__CONCURRENCY": str(concurrency),
        "EVENTFLOW_CONSUMER__BATCH_SIZE": "100",
        "EVENTFLOW_CONSUMER__BLOCK_MS": "100",
        "EVENTFLOW_CONSUMER__HANDLERS": json.dumps(
            {"ndvi": "bench.pipeline_bench:" + ("handler" if handler_mode == "loop" else "thread_handler")}),
        "EVENTFLOW_NDVI__OUTPUT_ROOT": str(output_root),
        "EVENTFLOW_METRICS__ENABLED": "false",
        "EVENTFLOW_LOG__LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    })
    return env


def start_consumers(n: int, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-m", "eventflow", "consumer"], env=env,
                             stdout=subprocess.DEVNULL, stderr=sys.stderr) for _ in range(n)]


def stop_consumers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


async def submit(functions: Any, i: int, tag: str) -> tuple[str, float]:
    from eventflow.contract import NdviJobRequest, StreamEntry, new_job_id, now_ms

    req = NdviJobRequest.model_validate({"farm_id": f"{tag}-{i}", "inputs": {
        "href": "file:///data/scene.tif", "red_band": 3, "nir_band": 4}})
    h = req.hash_for("bench")
    entry = StreamEntry(job_id=new_job_id(), request_hash=h, tenant="bench", enqueued_at_ms=now_ms(),
                        trace_id="bench", payload=req.normalized())
    t = time.time()
    await functions.submit_job(job_id=entry.job_id, request_hash=h, tenant="bench",
                               entry_fields=entry.to_fields(), max_backlog=10_000_000)
    return h, t


async def committed_at(redis: Any, keys: Any, hashes: list[str]) -> list[float | None]:
    out: list[float | None] = []
    for start in range(0, len(hashes), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for h in hashes[start:start + 1000]:
                pipe.hget(keys.result(h), "committed_at_ms")
            out += [int(v) / 1000 if v else None for v in await pipe.execute()]
    return out


async def aof_rewrite_done(redis: Any) -> None:
    """Return once no AOF rewrite is running or scheduled (polling INFO: Redis has no completion event)."""
    for _ in range(1200):  # 60 s
        info = await redis.info("persistence")
        if not int(info["aof_rewrite_in_progress"]) and not int(info["aof_rewrite_scheduled"]):
            return
        await asyncio.sleep(0.05)
    raise SystemExit("the AOF rewrite did not finish within 60 s")


async def protocol(url: str, consumers: int, jobs: int, rate: int, rate_seconds: float, concurrency: int,
                   work: Path, handler_mode: str = "loop", settle: bool = True) -> dict[str, float]:
    from eventflow.keys import Keys
    from eventflow.redis.client import bootstrap, connect
    from eventflow.redis.functions import Functions
    from eventflow.settings import load_settings

    settings = load_settings(redis={"url": url})
    redis = connect(settings)
    keys = Keys()
    await redis.flushall()
    await bootstrap(redis, keys)
    functions = Functions(redis, keys)
    env = consumer_env(url, concurrency, work / "out", handler_mode)
    out: dict[str, float] = {}

    # Saturation: a backlog first, then the consumers drain it.
    t0 = time.perf_counter()
    hashes: list[str] = []
    for start in range(0, jobs, 32):
        hashes += [h for h, _ in await asyncio.gather(*(submit(functions, i, "sat") for i in
                                                         range(start, min(jobs, start + 32))))]
    out["submit_per_s"] = jobs / (time.perf_counter() - t0)
    procs = start_consumers(consumers, env)
    started = time.time()
    try:
        while True:
            await asyncio.sleep(0.25)
            done = await committed_at(redis, keys, hashes)
            if all(done):
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a consumer exited early; run one by hand to see why")
        # Startup (imports, connect) is not throughput: count from the first commit to the last.
        times = [t for t in done if t is not None]
        out["jobs_per_s"] = (len(times) - 1) / max(1e-9, max(times) - min(times))
        out["startup_s"] = min(times) - started

        # Latency at a fixed offered rate with the consumers already running.
        if settle:
            # The backlog above grew the AOF enough that Redis may fork for an automatic rewrite during the
            # next seconds; on two shared cores that fork shows as a few ms of tail. Rewrite now and wait,
            # so the run measures the protocol's steady state (--no-settle measures whatever happens).
            await aof_rewrite_done(redis)  # an automatic one may be running already: BGREWRITEAOF refuses then
            await redis.bgrewriteaof()
            await aof_rewrite_done(redis)
        forks_before = int((await redis.info("stats"))["total_forks"])
        pending: list[tuple[str, float]] = []
        n = int(rate * rate_seconds)
        t_start = time.perf_counter()
        tasks = []
        gate = asyncio.Semaphore(32)  # stay inside the client's connection pool

        async def paced(i: int) -> tuple[str, float]:
            async with gate:
                return await submit(functions, i, f"rate{consumers}")

        for i in range(n):
            due = t_start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(paced(i)))
        pending = await asyncio.gather(*tasks)
        out["offered_per_s"] = n / (time.perf_counter() - t_start)
        while True:
            done = await committed_at(redis, keys, [h for h, _ in pending])
            if all(done):
                break
            await asyncio.sleep(0.1)
        # A fork (an AOF rewrite or RDB save the backlog above triggered) during the run shows in the tail.
        out["forks_during_rate_run"] = int((await redis.info("stats"))["total_forks"]) - forks_before
        lat = [c - s for (_, s), c in zip(pending, done, strict=True) if c is not None]
        # committed_at_ms has millisecond resolution: latencies are +-1 ms.
        out.update(lat_p50_ms=pct(lat, 0.50) * 1000, lat_p90_ms=pct(lat, 0.90) * 1000,
                   lat_p99_ms=pct(lat, 0.99) * 1000, lat_max_ms=max(lat) * 1000)
    finally:
        stop_consumers(procs)
        await redis.aclose()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="backlog size for the saturation run")
    parser.add_argument("--consumers", default="1,2", help="consumer process counts to run, comma-separated")
    parser.add_argument("--rate", type=int, default=1000, help="offered jobs/s for the latency run")
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="duration of the latency run")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs in flight per consumer process")
    parser.add_argument("--handler", default="loop", choices=["loop", "thread"],
                        help="the no-op declared on_event_loop (runs on the consumer's loop) or a plain one "
                        "(handed to a worker thread, as before on_event_loop existed)")
    parser.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"],
                        help="the server's AOF fsync policy (the chart deploys always)")
    parser.add_argument("--no-settle", action="store_true",
                        help="do not rewrite the AOF before the latency run (an automatic rewrite may then fork "
                             "during it)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.consumers.split(",")]
    from eventflow.embedded import EmbeddedServer

    with tempfile.TemporaryDirectory(prefix="ef-bench-") as tmp:
        work = Path(tmp)
        server = EmbeddedServer(work / "redis", appendfsync=args.appendfsync).start()
        try:
            print(f"server: {server.kind} {server.binary}, appendfsync={args.appendfsync}, cpus={os.cpu_count()}, "
                  f"handler={args.handler}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
            rt, rt_p99 = asyncio.run(raw_round_trip(server.url))
            print(f"raw stream round trip (XADD+XREADGROUP+XACK, one at a time): median {rt * 1000:.3f} ms, "
                  f"p99 {rt_p99 * 1000:.3f} ms")
            for n in counts:
                raw = asyncio.run(raw_streams(server.url, args.jobs, n))
                print(f"raw streams, {n} reader(s): XADD {raw['xadd_per_s']:,.0f}/s pipelined; "
                      f"XREADGROUP+XACK {raw['read_ack_per_s']:,.0f} entries/s")
            for n in counts:
                r = asyncio.run(protocol(server.url, n, args.jobs, args.rate, args.rate_seconds,
                                         args.concurrency, work, args.handler, not args.no_settle))
                print(f"protocol, {n} consumer process(es): {r['jobs_per_s']:,.0f} jobs/s at saturation "
                      f"(submit {r['submit_per_s']:,.0f}/s, startup {r['startup_s']:.1f}s); at "
                      f"{r['offered_per_s']:,.0f} jobs/s offered: p50 {r['lat_p50_ms']:.1f} ms, p90 "
                      f"{r['lat_p90_ms']:.1f} ms, p99 {r['lat_p99_ms']:.1f} ms, max {r['lat_max_ms']:.1f} ms "
                      f"(added over the raw round trip: p99 {r['lat_p99_ms'] - rt * 1000:.1f} ms; "
                      f"{r['forks_during_rate_run']} fork(s) of the server during it)")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
