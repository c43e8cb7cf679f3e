"""Circuit breakers per downstream dependency, shared in Redis: while one is open no consumer pulls work,
so an outage does not burn deliveries toward the dead-letter ceiling (issue 4)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from eventflow_consumer.handlers import JobContext, run_ndvi_job
from eventflow_consumer.worker import Worker
from eventflow_reaper.reclaim import Reaper
from redis.asyncio import Redis

from eventflow.contract import JobType, NdviJobRequest, StreamEntry
from eventflow.errors import DependencyUnavailable, InputError
from eventflow.keys import Keys
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings
from tests.conftest import wait_for
from tests.integration.test_consumer import enqueue
from tests.jobs import enqueue_bodies, entry_for, farm_body

REPO = Path(__file__).resolve().parents[2]
L7 = REPO / "tests/data/r-cran-stars/L7_ETMs.tif"
BREAKER = {"breaker_threshold": 3, "breaker_open_ms": 2500, "breaker_window_ms": 60_000,
           "retry_base_ms": 100, "retry_max_ms": 300, "block_ms": 50, "concurrency": 2}


class Store:
    """An inline handler whose input store can be taken down; records each call's start and end."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.calls: list[tuple[str, float, float]] = []
        self.lock = threading.Lock()

    def __call__(self, entry: StreamEntry, ctx: JobContext) -> dict[str, Any]:
        start = time.monotonic()
        try:
            if self.down.is_set():
                raise DependencyUnavailable("input_store", "data root /data is not reachable")
            time.sleep(0.05)
            return {"outputs": {}, "stats": {}}
        finally:
            with self.lock:
                self.calls.append((entry.request_hash, start, time.monotonic()))


def consumers(settings: EventflowSettings, redis: Redis, store: Store, n: int, **cfg: Any) -> list[Worker]:
    s = settings.model_copy(update={"consumer": settings.consumer.model_copy(update={**BREAKER, **cfg})})
    return [Worker(s, redis, handlers={JobType.ndvi: store}) for _ in range(n)]


async def breaker_state(redis: Redis, keys: Keys, dependency: str = "input_store") -> str:
    return await redis.hget(keys.breaker(dependency), "state") or "closed"


def gauge(w: Worker, dependency: str = "input_store") -> float:
    value = w.metrics.breaker_state.labels(dependency)._value.get()  # prometheus_client's stored sample
    return float(value)


async def test_open_breaker_stops_every_consumer_and_one_probe_closes_it(
        redis: Redis, settings: EventflowSettings, functions: Functions, keys: Keys) -> None:
    store = Store()
    store.down.set()
    workers = consumers(settings, redis, store, 2)
    tasks = [asyncio.create_task(w.run()) for w in workers]
    reaper = Reaper(settings, redis)
    first = await enqueue(functions, 3)
    await wait_for(lambda: _is(breaker_state(redis, keys), "open"), 10)
    calls_at_open = len(store.calls)

    later = await _enqueue_named(functions, "later", 20)
    await asyncio.sleep(1.5)  # well inside the 2.5 s cool-down
    await reaper.cycle()  # holds retries while open instead of re-injecting them
    group = (await redis.xinfo_groups(keys.job_stream))[0]
    # A read already blocked when the breaker tripped may deliver one batch per consumer; those entries are
    # held pending (not run), everything else stays undelivered.
    assert group["lag"] >= 20 - 2 * BREAKER["concurrency"], "consumers kept pulling work while the breaker was open"
    assert len(store.calls) == calls_at_open
    assert all(gauge(w) == 2 for w in workers)

    store.down.clear()  # the store is back; after the cool-down exactly one probe job tests it
    reopened_at = time.monotonic()

    async def all_done() -> bool:
        await reaper.cycle()
        return all([await redis.exists(keys.result(h)) for _, h, _ in first + later])

    await wait_for(all_done, 30, interval_s=0.2)
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    assert await breaker_state(redis, keys) == "closed"
    assert all(gauge(w) == 0 for w in workers)
    after = sorted((start, end) for _, start, end in store.calls if start >= reopened_at)
    probe_end = after[0][1]
    assert all(start >= probe_end for start, _ in after[1:]), "jobs ran beside the probe while half-open"
    # The 20 jobs queued during the outage lost no delivery to it.
    for _, _, entry_id in later:
        assert await redis.hget(keys.job_state(_job(later, entry_id)), "attempts") == "1"
    assert await redis.xlen(keys.dead_letter_stream) == 0


async def test_failed_probe_reopens_the_breaker(redis: Redis, settings: EventflowSettings, functions: Functions,
                                                keys: Keys) -> None:
    store = Store()
    store.down.set()
    [w] = consumers(settings, redis, store, 1, breaker_open_ms=800)
    task = asyncio.create_task(w.run())
    await enqueue(functions, 3)
    await wait_for(lambda: _is(breaker_state(redis, keys), "open"), 10)
    opened = float(await redis.hget(keys.breaker("input_store"), "open_until"))
    await _enqueue_named(functions, "later", 5)
    # The probe after the cool-down fails (store still down): open again with a later deadline.
    await wait_for(lambda: _reopened(redis, keys, opened), 10)
    w.stop()
    await task
    assert w.metrics.breaker_opened.labels("input_store")._value.get() >= 1


async def test_negative_control_without_breaker_the_outage_burns_deliveries(
        redis: Redis, make_settings: Any, functions: Functions, keys: Keys) -> None:
    settings = make_settings(streams={"max_deliveries": 3})
    store = Store()
    store.down.set()
    [w] = consumers(settings, redis, store, 1, breaker_threshold=0)
    task = asyncio.create_task(w.run())
    reaper = Reaper(settings, redis)
    jobs = await enqueue(functions, 5)

    async def dead() -> bool:
        await reaper.cycle()
        return await redis.xlen(keys.dead_letter_stream) == len(jobs)

    await wait_for(dead, 30, interval_s=0.2)
    w.stop()
    await task
    classes = {f["failure_class"] for _, f in await redis.xrange(keys.dead_letter_stream)}
    assert classes == {"input_store_unavailable"}


async def test_breaker_functions(functions: Functions, redis: Redis, keys: Keys) -> None:
    deps = ("input_store", "output_store")
    cfg = {"threshold": 2, "window_ms": 60_000, "open_ms": 200}
    assert (await functions.breaker_allow(deps, "a", 1000)).decision == "go"
    await functions.breaker_record("input_store", "fail", consumer="a", **cfg)
    d = await functions.breaker_allow(deps, "a", 1000)
    assert (d.decision, d.states["input_store"]) == ("go", "counting")
    await functions.breaker_record("input_store", "ok", consumer="b", **cfg)  # a success resets the count
    await functions.breaker_record("input_store", "fail", consumer="a", **cfg)
    assert (await functions.breaker_allow(deps, "a", 1000)).decision == "go"
    state, changed = await functions.breaker_record("input_store", "fail", consumer="a", **cfg)
    assert (state, changed) == ("open", True)
    d = await functions.breaker_allow(deps, "a", 1000)
    assert d.decision == "wait" and 0 < d.wait_ms <= 200 and d.states == {"input_store": "open",
                                                                          "output_store": "closed"}
    await asyncio.sleep(0.25)
    assert (await functions.breaker_allow(deps, "a", 300)).decision == "probe"
    assert (await functions.breaker_allow(deps, "b", 300)).decision == "wait"  # one probe at a time
    await functions.breaker_record("input_store", "none", consumer="a", **cfg)  # probe handed back unused
    assert (await functions.breaker_allow(deps, "b", 300)).decision == "probe"
    await asyncio.sleep(0.35)  # b's probe expired without a report (b died): someone else may probe
    assert (await functions.breaker_allow(deps, "c", 300)).decision == "probe"
    state, changed = await functions.breaker_record("input_store", "ok", consumer="c", **cfg)
    assert (state, changed) == ("closed", True)
    assert not await redis.exists(keys.breaker("input_store"))


def test_ndvi_handler_tells_store_outages_from_bad_jobs(settings: EventflowSettings, tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    root.mkdir()
    shutil.copy(L7, root / "scene.tif")
    ndvi = settings.ndvi.model_copy(update={"data_roots": [root.resolve()]})

    def run(href: str, output_dir: Path) -> None:
        request = NdviJobRequest.model_validate({"farm_id": "f", "inputs": {"href": href, "red_band": 3,
                                                                            "nir_band": 4}})
        run_ndvi_job(entry_for(request), JobContext(ndvi=ndvi, output_dir=output_dir, fence=1, progress=lambda _: None,
                                       stop=threading.Event()))

    run((root / "scene.tif").as_uri(), tmp_path / "out")  # healthy: succeeds
    try:
        run((root / "missing.tif").as_uri(), tmp_path / "out")
    except InputError:
        pass  # a missing file under a healthy root is the job's fault: permanent
    else:
        raise AssertionError("missing input did not fail")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output directory should be")
    try:
        run((root / "scene.tif").as_uri(), blocker / "out")
    except DependencyUnavailable as exc:
        assert exc.dependency == "output_store"
    else:
        raise AssertionError("unwritable output did not fail")
    shutil.rmtree(root)  # the volume goes away
    try:
        run((root / "scene.tif").as_uri(), tmp_path / "out")
    except DependencyUnavailable as exc:
        assert exc.dependency == "input_store" and exc.failure_class == "input_store_unavailable"
    else:
        raise AssertionError("unreachable data root did not fail")


async def _is(value: Any, expected: str) -> bool:
    return await value == expected


async def _reopened(redis: Redis, keys: Keys, opened_until: float) -> bool:
    row = await redis.hmget(keys.breaker("input_store"), "state", "open_until")
    return row[0] == "open" and float(row[1]) > opened_until


async def _enqueue_named(functions: Functions, prefix: str, n: int) -> list[tuple[str, str, str]]:
    return await enqueue_bodies(functions, [farm_body(f"{prefix}-{i}") for i in range(n)])


def _job(jobs: list[tuple[str, str, str]], entry_id: str) -> str:
    return next(j for j, _, e in jobs if e == entry_id)
