"""Fault tests with real processes: consumers and the reaper as `python -m eventflow ...` children running
real NDVI jobs against a real redis-server, killed, stopped and terminated mid-work."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from eventflow.keys import Keys
from eventflow.redis.functions import Functions
from tests.conftest import wait_for
from tests.integration.conftest import with_group
from tests.jobs import enqueue_bodies, farm_body

REPO = Path(__file__).resolve().parents[2]
L7 = REPO / "tests/data/r-cran-stars/L7_ETMs.tif"

pytestmark = pytest.mark.slow

async def enqueue_ndvi(functions: Functions, n: int, tenant: str = "t") -> list[tuple[str, str, str]]:
    return await enqueue_bodies(functions, [farm_body(f"farm-{i}", L7.as_uri(), 3, 4) for i in range(n)], tenant)


async def events_by_job(redis: Redis, keys: Keys) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for _, f in await redis.xrange(keys.event_stream):
        out.setdefault(f.get("job_id", ""), Counter())[f["type"]] += 1
    return out


async def all_succeeded(redis: Redis, keys: Keys, jobs: list[tuple[str, str, str]]) -> bool:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, _, _ in jobs:
            pipe.hget(keys.job_state(job_id), "state")
        states = await pipe.execute()
    return all(s == "succeeded" for s in states)


async def assert_exactly_once(redis: Redis, keys: Keys, jobs: list[tuple[str, str, str]]) -> None:
    events = await events_by_job(redis, keys)
    for job_id, h, _ in jobs:
        assert await redis.exists(keys.result(h)), job_id
        # One `succeeded` event per job: the commit happened once (the function emits it only on commit).
        assert events[job_id]["succeeded"] == 1, (job_id, events[job_id])
    assert await redis.xlen(keys.dead_letter_stream) == 0
    await wait_for(lambda: _pending(redis, keys, 0), 15)


async def diagnose(redis: Redis, keys: Keys, jobs: list[tuple[str, str, str]]) -> str:
    """What a stuck run looks like: unfinished jobs with their state and pending record."""
    lines = []
    for job_id, h, entry_id in jobs:
        state = await redis.hgetall(keys.job_state(job_id))
        if state.get("state") == "succeeded":
            continue
        pending = await redis.xpending_range(keys.job_stream, keys.group, min=entry_id, max=entry_id, count=1)
        lines.append(f"{job_id} {entry_id} state={state} pending={pending} lease={await redis.pttl(keys.lease(h))} "
                     f"retry={await redis.zscore(keys.retry_schedule, entry_id)}")
        if len(lines) > 10:
            break
    registry = await redis.zrange(keys.consumer_registry, 0, -1, withscores=True)
    alive = [n for n, _ in registry if await redis.exists(keys.heartbeat(n))]
    group = await redis.xinfo_consumers(keys.job_stream, keys.group)
    return "\n".join([*lines, f"registry={registry}", f"alive={alive}", f"group={group}"])


async def _pending(redis: Redis, keys: Keys, n: int) -> bool:
    return int((await redis.xpending(keys.job_stream, keys.group))["pending"]) == n


async def test_sigkill_random_consumers_while_500_jobs_run(fleet: Any, redis: Redis, functions: Functions,
                                                           keys: Keys) -> None:
    f = fleet()
    f.start("reaper")
    consumers = [f.start("consumer") for _ in range(3)]
    jobs = await enqueue_ndvi(functions, 500)
    rng = random.Random(7)
    kills = 0
    deadline = time.monotonic() + 150
    while not await all_succeeded(redis, keys, jobs):
        if time.monotonic() > deadline:
            raise AssertionError(f"not all jobs finished; kills={kills}\n{await diagnose(redis, keys, jobs)}")
        await asyncio.sleep(2.0)
        if kills < 8:
            victim = consumers.pop(rng.randrange(len(consumers)))
            with_group(victim, signal.SIGKILL)
            kills += 1
            consumers.append(f.start("consumer"))  # a replacement pod under a new consumer name
    assert kills >= 3, "the run ended before enough consumers were killed to mean anything"
    await assert_exactly_once(redis, keys, jobs)


async def test_sigkill_between_commit_and_ack_is_acked_without_rerun(fleet: Any, redis: Redis, functions: Functions,
                                                                     keys: Keys) -> None:
    f = fleet()
    crashing = f.start("consumer", EVENTFLOW_CONSUMER__FAILPOINTS='{"after_commit": "kill"}')
    [(job_id, h, _)] = jobs = await enqueue_ndvi(functions, 1)
    assert await asyncio.to_thread(crashing.wait, 60) == -signal.SIGKILL
    assert await redis.exists(keys.result(h))
    assert await _pending(redis, keys, 1)  # committed but never acked
    f.start("consumer")
    f.start("reaper")
    try:
        await wait_for(lambda: _pending(redis, keys, 0), 30)
    except AssertionError:
        raise AssertionError(f.logs()[-5000:]) from None
    state = await redis.hgetall(keys.job_state(job_id))
    assert state["attempts"] == "1", state  # the redelivery did not run the job again
    await assert_exactly_once(redis, keys, jobs)


async def test_zombie_late_write_and_ack_are_refused(fleet: Any, redis: Redis, functions: Functions,
                                                     keys: Keys) -> None:
    f = fleet()
    # The first consumer stops itself (SIGSTOP) right before its commit: a paused process past its lease.
    zombie = f.start("consumer", EVENTFLOW_CONSUMER__FAILPOINTS='{"before_commit": "stop"}')
    [(_, h, _)] = jobs = await enqueue_ndvi(functions, 1)
    await wait_for(lambda: _stopped(zombie.pid), 60)
    f.start("consumer")
    f.start("reaper")
    await wait_for(lambda: redis.exists(keys.result(h)), 30)
    with_group(zombie, signal.SIGCONT)
    await asyncio.sleep(2.0)  # let the zombie try its late commit and ack
    result = await redis.hgetall(keys.result(h))
    assert result["fence"] == "2", result  # the newer attempt's result stands
    assert await redis.get(keys.fence(h)) == "2"
    await assert_exactly_once(redis, keys, jobs)
    zombie_log = (f.log_dir / "consumer-1.log").read_text()
    assert "stopping job: lease lost" in zombie_log, zombie_log[-3000:]
    assert ("nothing written" in zombie_log or "without writing" in zombie_log), zombie_log[-3000:]
    assert zombie.poll() is None  # the zombie carried on serving; it just wrote nothing


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


async def test_job_longer_than_three_leases_is_never_reclaimed(fleet: Any, redis: Redis, functions: Functions,
                                                               keys: Keys) -> None:
    f = fleet()
    f.start("consumer", EVENTFLOW_CONSUMER__FAILPOINTS='{"before_commit": "sleep:5"}')  # 5 s > 3 x 1.5 s lease
    f.start("consumer")
    f.start("reaper")
    [(job_id, h, _)] = jobs = await enqueue_ndvi(functions, 1)
    # The first consumer to read it may be either; wait for the job to finish.
    await wait_for(lambda: all_succeeded(redis, keys, jobs), 60)
    state = await redis.hgetall(keys.job_state(job_id))
    assert state["attempts"] == "1", state
    assert await redis.get(keys.fence(h)) == "1"
    await assert_exactly_once(redis, keys, jobs)


async def test_sigterm_drains_in_flight_work(fleet: Any, redis: Redis, functions: Functions, keys: Keys) -> None:
    f = fleet()
    worker = f.start("consumer", EVENTFLOW_CONSUMER__FAILPOINTS='{"before_commit": "sleep:2"}')
    jobs = await enqueue_ndvi(functions, 2)
    await wait_for(lambda: _running(redis, keys, jobs), 60)
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 30) == 0
    assert await all_succeeded(redis, keys, jobs)  # finished within the grace period, then exited 0
    await assert_exactly_once(redis, keys, jobs)


async def test_sigterm_past_the_grace_period_hands_work_back(fleet: Any, redis: Redis, functions: Functions,
                                                             keys: Keys) -> None:
    f = fleet(consumer={"drain_timeout_s": 0.5})
    worker = f.start("consumer", EVENTFLOW_CONSUMER__FAILPOINTS='{"before_commit": "sleep:30"}')
    [(_, h, _)] = jobs = await enqueue_ndvi(functions, 1)
    await wait_for(lambda: _running(redis, keys, jobs), 60)
    t0 = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 30) == 0
    assert time.monotonic() - t0 < 10
    assert not await redis.exists(keys.lease(h))  # released, not left to expire
    assert await _pending(redis, keys, 1)  # handed back, not lost
    f.start("consumer")
    f.start("reaper")
    await wait_for(lambda: all_succeeded(redis, keys, jobs), 60)
    await assert_exactly_once(redis, keys, jobs)


async def _running(redis: Redis, keys: Keys, jobs: list[tuple[str, str, str]]) -> bool:
    return all([await redis.hget(keys.job_state(j), "state") == "running" for j, _, _ in jobs])
