"""Retention: the reaper's MINID trimming never deletes a pending or undelivered entry."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

from redis.asyncio import Redis

from eventflow.contract import JobType, now_ms
from eventflow.keys import Keys
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings
from tests.conftest import wait_for
from tests.integration.test_consumer import Recorder, enqueue, worker

REPO = Path(__file__).resolve().parents[2]


async def test_trims_only_below_the_oldest_pending_and_undelivered(functions: Functions, redis: Redis,
                                                                   keys: Keys) -> None:
    jobs = await enqueue(functions, 10)
    ids = [e for _, _, e in jobs]
    await redis.xreadgroup(keys.group, "c", {keys.job_stream: ">"}, count=6)  # 1-6 delivered, 7-10 not
    for e in (ids[0], ids[1], ids[4]):  # acked: 1, 2 and 5; pending: 3, 4, 6
        await functions.ack_entry(e, "c", None, None)
    deleted, minid = await functions.trim_stream(now_ms() + 1000)
    assert (deleted, minid) == (2, ids[2])
    remaining = [e for e, _ in await redis.xrange(keys.job_stream)]
    assert remaining == ids[2:]
    assert int((await redis.xpending(keys.job_stream, keys.group))["pending"]) == 3


async def test_undelivered_entries_bound_the_trim(functions: Functions, redis: Redis, keys: Keys) -> None:
    jobs = await enqueue(functions, 4)
    ids = [e for _, _, e in jobs]
    await redis.xreadgroup(keys.group, "c", {keys.job_stream: ">"}, count=2)
    for e in ids[:2]:
        await functions.ack_entry(e, "c", None, None)
    # A second group that has read nothing needs every entry: nothing may go.
    await redis.xgroup_create(keys.job_stream, "audit", id="0")
    assert (await functions.trim_stream(now_ms() + 1000))[0] == 0
    await redis.xgroup_destroy(keys.job_stream, "audit")
    deleted, minid = await functions.trim_stream(now_ms() + 1000)
    assert deleted == 2 and minid == ids[1].split("-")[0] + "-" + str(int(ids[1].split("-")[1]) + 1)
    assert [e for e, _ in await redis.xrange(keys.job_stream)] == ids[2:]


async def test_age_cutoff_keeps_recent_acked_entries(functions: Functions, redis: Redis, keys: Keys) -> None:
    jobs = await enqueue(functions, 3)
    await redis.xreadgroup(keys.group, "c", {keys.job_stream: ">"}, count=3)
    for _, _, e in jobs:
        await functions.ack_entry(e, "c", None, None)
    assert (await functions.trim_stream(now_ms() - 60_000))[0] == 0
    assert await redis.xlen(keys.job_stream) == 3


async def test_retention_every_50ms_under_load_loses_nothing(redis: Redis, settings: EventflowSettings,
                                                             functions: Functions, keys: Keys) -> None:
    def jittery(*_: object) -> None:
        import time

        time.sleep(random.uniform(0, 0.01))

    handlers = [Recorder(jittery), Recorder(jittery)]
    workers = [worker(settings, redis, h, concurrency=4, block_ms=20) for h in handlers]
    for w, h in zip(workers, handlers, strict=True):
        w.inline_handlers = {JobType.ndvi: h}
    tasks = [asyncio.create_task(w.run()) for w in workers]
    stop = asyncio.Event()
    trims: list[int] = []

    async def retention() -> None:
        while not stop.is_set():
            trims.append((await functions.trim_stream(now_ms() + 1000))[0])
            await asyncio.sleep(0.05)

    trimmer = asyncio.create_task(retention())
    jobs = []
    for _ in range(10):
        jobs += await enqueue(functions, 30, tenant=f"t{len(jobs)}")
        await asyncio.sleep(0.1)
    await wait_for(lambda: sum(sum(h.calls.values()) for h in handlers) >= 300, 60)
    await wait_for(lambda: _pending_zero(redis, keys), 20)
    stop.set()
    await trimmer
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    executed = sum((h.calls for h in handlers), start=__import__("collections").Counter())
    assert sorted(executed) == sorted(h for _, h, _ in jobs) and set(executed.values()) == {1}
    for _, h, _ in jobs:
        assert await redis.exists(keys.result(h))
    assert sum(trims) > 0, "retention never trimmed: the test proved nothing"
    assert await redis.xlen(keys.dead_letter_stream) == 0


async def _pending_zero(redis: Redis, keys: Keys) -> bool:
    return int((await redis.xpending(keys.job_stream, keys.group))["pending"]) == 0


def test_only_the_retention_function_trims_the_job_stream() -> None:
    """Code scan: XTRIM appears once (eventflow_trim_stream); MAXLEN only caps the event stream."""
    lua = (REPO / "src/eventflow/redis/eventflow.lua").read_text()
    assert len(re.findall(r"'XTRIM'", lua)) == 1
    trim_fn = lua[lua.index("local function trim_stream"):lua.index("redis.register_function{")]
    assert "'XTRIM'" in trim_fn
    assert len(re.findall(r"'MAXLEN'", lua)) == 1
    add_event = lua[lua.index("local function add_event"):lua.index("local function pending_of")]
    assert "'MAXLEN'" in add_event
    for path in [*REPO.joinpath("src").rglob("*.py"), *REPO.joinpath("services").rglob("*.py")]:
        text = path.read_text().lower()
        assert "xtrim" not in text.replace("eventflow_trim_stream", ""), path
