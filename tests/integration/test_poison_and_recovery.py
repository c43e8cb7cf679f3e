"""Issue 6 scenarios with real processes: a poison mix among good jobs, recovery by two reapers that
start late together, and many consumer start/stop cycles."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from typing import Any

import pytest
from eventflow_reaper.reclaim import Reaper
from redis.asyncio import Redis

from eventflow.contract import JobType
from eventflow.keys import Keys
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings
from tests.conftest import wait_for
from tests.integration.conftest import with_group
from tests.integration.test_consumer import Recorder, worker
from tests.jobs import enqueue_bodies, farm_body

pytestmark = pytest.mark.slow

CHAOS = {"EVENTFLOW_CONSUMER__HANDLERS": '{"ndvi": "tests.chaos:handler"}'}
CEILING = 3


async def enqueue_farms(functions: Functions, farms: list[str]) -> dict[str, tuple[str, str, str]]:
    return dict(zip(farms, await enqueue_bodies(functions, [farm_body(f, "file:///unused.tif") for f in farms]),
                    strict=True))


async def states(redis: Redis, keys: Keys, jobs: dict[str, tuple[str, str, str]]) -> Counter[str]:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, _, _ in jobs.values():
            pipe.hget(keys.job_state(job_id), "state")
        return Counter(await pipe.execute())


async def test_poison_mix_dead_letters_exactly_the_poison_at_the_ceiling(fleet: Any, redis: Redis,
                                                                         functions: Functions, keys: Keys) -> None:
    f = fleet(streams={"max_deliveries": CEILING},
              consumer={"concurrency": 4, "job_timeout_s": 2.0, "job_memory_mb": 1024})
    for _ in range(2):
        f.start("consumer", **CHAOS)
    f.start("reaper")
    poison = [f"poison-{kind}-{i}" for kind in ("raise", "crash", "hang", "mem") for i in range(2)]
    good = [f"farm-{i}" for i in range(1000)]
    jobs = await enqueue_farms(functions, good[:500] + poison + good[500:])

    async def settled() -> bool:
        c = await states(redis, keys, jobs)
        return c["succeeded"] == len(good) and c["dead_lettered"] == len(poison)

    try:
        await wait_for(settled, 240, interval_s=1.0)
    except AssertionError:
        raise AssertionError(f"{await states(redis, keys, jobs)}\n{f.logs()[-4000:]}") from None
    dlq = [fields for _, fields in await redis.xrange(keys.dead_letter_stream)]
    assert sorted(r["job_id"] for r in dlq) == sorted(jobs[p][0] for p in poison)  # each exactly once
    assert {r["delivery_count"] for r in dlq} == {str(CEILING)}
    by_kind = {r["job_id"]: r["failure_class"] for r in dlq}
    expected = {"raise": "RuntimeError", "crash": "crashed", "hang": "timeout", "mem": "memory_limit"}
    for p in poison:
        assert by_kind[jobs[p][0]] == expected[p.split("-")[1]], (p, by_kind[jobs[p][0]])
    for farm in good:
        job_id, _, _ = jobs[farm]
        assert await redis.hget(keys.job_state(job_id), "attempts") == "1", farm  # unaffected by the poison
    assert int((await redis.xpending(keys.job_stream, keys.group))["pending"]) == 0


async def test_two_late_reapers_recover_everything_once(fleet: Any, redis: Redis, functions: Functions,
                                                        keys: Keys) -> None:
    f = fleet(streams={"max_deliveries": CEILING}, consumer={"concurrency": 4, "job_timeout_s": 2.0})
    consumers = [f.start("consumer", **CHAOS, EVENTFLOW_CONSUMER__FAILPOINTS='{"before_execute": "sleep:0.2"}')
                 for _ in range(2)]
    poison = [f"poison-raise-{i}" for i in range(3)]
    good = [f"farm-{i}" for i in range(200)]
    jobs = await enqueue_farms(functions, good + poison)
    # No reaper while consumers are killed mid-work: their pending entries are stranded.
    await asyncio.sleep(1.0)
    for c in consumers:
        with_group(c, signal.SIGKILL)
    stranded = int((await redis.xpending(keys.job_stream, keys.group))["pending"])
    assert stranded > 0, "nothing was in flight when the consumers died: the test proved nothing"
    await asyncio.sleep(60)  # a minute without a reaper: far past min_idle, every heartbeat expired
    for _ in range(2):
        f.start("consumer", **CHAOS)
    f.start("reaper")
    f.start("reaper")  # two replicas, started together

    async def settled() -> bool:
        c = await states(redis, keys, jobs)
        return c["succeeded"] == len(good) and c["dead_lettered"] == len(poison)

    try:
        await wait_for(settled, 120, interval_s=1.0)
    except AssertionError:
        raise AssertionError(f"{await states(redis, keys, jobs)}\n{f.logs()[-4000:]}") from None
    dlq = [fields["job_id"] for _, fields in await redis.xrange(keys.dead_letter_stream)]
    assert sorted(dlq) == sorted(jobs[p][0] for p in poison)


async def test_consumer_churn_keeps_the_group_bounded(redis: Redis, settings: EventflowSettings,
                                                      functions: Functions, keys: Keys) -> None:
    """200 consumer start/stop cycles (half of them crash-like: no clean exit) with jobs flowing."""
    # Every crash (and every reclaim onto a consumer that then dies) burns one delivery of what it held,
    # so the ceiling is raised here: this test is about consumer names and pending lists, not poison.
    s = settings.model_copy(update={
        "streams": settings.streams.model_copy(update={"max_deliveries": 1000}),
        "consumer": settings.consumer.model_copy(update={"heartbeat_ttl_ms": 1000, "heartbeat_interval_ms": 200}),
        "reaper": settings.reaper.model_copy(update={"min_idle_ms": 300})})
    reaper = Reaper(s, redis)
    handler = Recorder()
    jobs = []
    for cycle in range(200):
        jobs += await (enqueue_many(functions, 2, cycle))
        w = worker(s, redis, handler, concurrency=2, block_ms=20, lease_ttl_ms=250)
        w.inline_handlers = {JobType.ndvi: handler}
        task = asyncio.create_task(w.run())
        await asyncio.sleep(0.02)
        if cycle % 2:
            task.cancel()  # a crash: no drain, heartbeat left to expire
            await asyncio.gather(task, return_exceptions=True)
        else:
            w.stop()
            await task
        if cycle % 10 == 9:
            await reaper.cycle()
    finisher = worker(s, redis, handler, concurrency=4, block_ms=20, lease_ttl_ms=250)
    finisher.inline_handlers = {JobType.ndvi: handler}
    task = asyncio.create_task(finisher.run())

    async def done() -> bool:
        await reaper.cycle()
        return all([await redis.exists(keys.result(h)) for _, h, _ in jobs])

    try:
        await wait_for(done, 60, interval_s=0.3)
    except AssertionError:
        missing = [j for j, h, _ in jobs if not await redis.exists(keys.result(h))]
        raise AssertionError(f"{len(missing)} of {len(jobs)} without a result; states "
                             f"{await states(redis, keys, {j: (j, '', '') for j in missing})}; pending "
                             f"{await redis.xpending(keys.job_stream, keys.group)}; "
                             f"retries {await redis.zcard(keys.retry_schedule)}") from None
    finisher.stop()
    await task
    await asyncio.sleep(1.1)  # every churned heartbeat has expired
    await reaper.cycle()
    names = [c["name"] for c in await redis.xinfo_consumers(keys.job_stream, keys.group)]
    assert len(names) <= 1, f"{len(names)} consumer names left in the group"
    assert await redis.zcard(keys.consumer_registry) <= 1
    assert int((await redis.xpending(keys.job_stream, keys.group))["pending"]) == 0
    assert await redis.xlen(keys.dead_letter_stream) == 0


async def enqueue_many(functions: Functions, n: int, cycle: int) -> list[tuple[str, str, str]]:
    jobs = await enqueue_farms(functions, [f"farm-{cycle}-{i}" for i in range(n)])
    return list(jobs.values())


async def test_real_consumer_processes_come_and_go_200_times(fleet: Any, redis: Redis, functions: Functions,
                                                             keys: Keys) -> None:
    """200 `eventflow consumer` processes started in rounds of four while jobs flow; half die by SIGKILL
    (no cleanup at all), half by SIGTERM. Afterwards the group lists only live consumers and nothing is
    left pending or dead-lettered."""
    f = fleet(streams={"max_deliveries": 100}, consumer={"isolation": "thread", "heartbeat_ttl_ms": 1500})
    reaper = f.start("reaper")
    jobs: dict[str, tuple[str, str, str]] = {}
    for round_ in range(50):
        jobs.update(await enqueue_farms(functions, [f"churn-{round_}-{i}" for i in range(4)]))
        procs = [f.start("consumer", **CHAOS) for _ in range(4)]
        await asyncio.sleep(0.7)  # long enough to register and take work, not to finish everything
        for i, p in enumerate(procs):
            with_group(p, signal.SIGKILL if i % 2 else signal.SIGTERM)
        await asyncio.gather(*(asyncio.to_thread(p.wait, 30) for p in procs))
    assert f.count == 201
    finisher = f.start("consumer", **CHAOS)

    async def settled() -> bool:
        return (await states(redis, keys, jobs))["succeeded"] == len(jobs)

    await wait_for(settled, 120, interval_s=0.5)

    async def bounded() -> bool:
        names = [c["name"] for c in await redis.xinfo_consumers(keys.job_stream, keys.group)]
        return len(names) == 1 and await redis.zcard(keys.consumer_registry) == 1

    await wait_for(bounded, 30, interval_s=0.5)  # dead consumers' heartbeats expire, the reaper removes them
    assert int((await redis.xpending(keys.job_stream, keys.group))["pending"]) == 0
    assert await redis.xlen(keys.dead_letter_stream) == 0
    assert finisher.poll() is None and reaper.poll() is None
