"""The reaper on a real Redis: ceiling -> DLQ exactly once, reclaim to live consumers, consumer cleanup,
lost-work detection, health gauges."""

from __future__ import annotations

import asyncio

from eventflow_reaper.reclaim import Reaper
from redis.asyncio import Redis

from eventflow.contract import now_ms
from eventflow.keys import Keys
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings
from tests.integration.test_consumer import enqueue


def reaper(settings: EventflowSettings, redis: Redis, **cfg: object) -> Reaper:
    s = settings.model_copy(update={"reaper": settings.reaper.model_copy(update={"min_idle_ms": 100, **cfg}),
                                    "streams": settings.streams.model_copy(update={"max_deliveries": 3})})
    return Reaper(s, redis)


async def deliveries(redis: Redis, keys: Keys, entry_id: str) -> tuple[str, int]:
    rows = await redis.xpending_range(keys.job_stream, keys.group, min=entry_id, max=entry_id, count=1)
    return rows[0]["consumer"], int(rows[0]["times_delivered"])


async def test_idle_entries_go_to_live_consumers_and_count_deliveries(redis: Redis, settings: EventflowSettings,
                                                                      functions: Functions, keys: Keys) -> None:
    [(_, _, entry_id)] = await enqueue(functions)
    await redis.xreadgroup(keys.group, "dead", {keys.job_stream: ">"}, count=1)
    await functions.consumer_heartbeat("alive", 60_000, "1")
    r = reaper(settings, redis)
    report = await r.cycle()
    assert report.reclaimed == 0  # not idle long enough yet
    assert await deliveries(redis, keys, entry_id) == ("dead", 1)
    await asyncio.sleep(0.15)
    report = await r.cycle()
    assert report.reclaimed == 1
    assert await deliveries(redis, keys, entry_id) == ("alive", 2)
    # "dead" owned nothing any more and has no heartbeat: removed.
    names = {c["name"] for c in await redis.xinfo_consumers(keys.job_stream, keys.group)}
    assert names == {"alive"}


async def test_ceiling_moves_to_dlq_exactly_once_with_two_reapers(redis: Redis, settings: EventflowSettings,
                                                                  functions: Functions, keys: Keys) -> None:
    jobs = await enqueue(functions, 20)
    await redis.xreadgroup(keys.group, "c", {keys.job_stream: ">"}, count=20)
    ids = [e for _, _, e in jobs]
    for _ in range(2):  # two more deliveries each -> 3 = the ceiling
        await redis.xclaim(keys.job_stream, keys.group, "c", 0, ids)
    for _, _, e in jobs[:5]:
        await functions.schedule_retry(e, "", "TimeoutError", "too slow", 0, {})
    await asyncio.sleep(0.15)
    a, b = reaper(settings, redis), reaper(settings, redis)
    reports = await asyncio.gather(a.cycle(), b.cycle())
    assert sum(r.dead_lettered for r in reports) == 20
    dlq = await redis.xrange(keys.dead_letter_stream)
    assert sorted(f["original_entry_id"] for _, f in dlq) == sorted(ids)
    classes = {f["original_entry_id"]: f["failure_class"] for _, f in dlq}
    assert all(classes[e] == "TimeoutError" for _, _, e in jobs[:5])
    assert all(classes[e] == "delivery_ceiling" for _, _, e in jobs[5:])
    assert all(f["delivery_count"] == "3" for _, f in dlq)
    assert (await redis.xpending(keys.job_stream, keys.group))["pending"] == 0


async def test_deleted_pending_entries_are_reported_as_lost(redis: Redis, settings: EventflowSettings,
                                                            functions: Functions, keys: Keys) -> None:
    """Negative control for retention: an injected XTRIM MAXLEN 0 is detected and reported."""
    jobs = await enqueue(functions, 3)
    await redis.xreadgroup(keys.group, "c", {keys.job_stream: ">"}, count=3)
    await functions.consumer_heartbeat("alive", 60_000, "1")
    await redis.xtrim(keys.job_stream, maxlen=0)
    await asyncio.sleep(0.15)
    r = reaper(settings, redis)
    report = await r.cycle()
    assert report.lost == 3
    assert sorted(r.lost_ids) == sorted(e for _, _, e in jobs)
    assert r.metrics.lost._value.get() == 3
    lost = [f for _, f in await redis.xrange(keys.dead_letter_stream)]
    assert sorted(f["original_entry_id"] for f in lost) == sorted(e for _, _, e in jobs)
    assert {f["failure_class"] for f in lost} == {"lost"}
    assert (await redis.xpending(keys.job_stream, keys.group))["pending"] == 0


async def test_health_gauges(redis: Redis, settings: EventflowSettings, functions: Functions, keys: Keys) -> None:
    await enqueue(functions, 5)
    await redis.xreadgroup(keys.group, "c", {keys.job_stream: ">"}, count=2)
    await asyncio.sleep(0.05)
    r = reaper(settings, redis, min_idle_ms=60_000)
    await r.cycle()
    m = r.metrics
    assert m.stream_length._value.get() == 5
    assert m.pending._value.get() == 2
    assert m.lag._value.get() == 3
    assert m.pending_age._value.get() >= 0.05
    assert m.undelivered_age._value.get() > 0
    assert m.dlq_depth._value.get() == 0
    assert await redis.exists(keys.reaper_heartbeat)


async def test_due_retries_are_reinjected_and_early_ones_wait(redis: Redis, settings: EventflowSettings,
                                                              functions: Functions, keys: Keys) -> None:
    [(job_a, _, a), (job_b, _, b)] = await enqueue(functions, 2)
    await redis.xreadgroup(keys.group, "w", {keys.job_stream: ">"}, count=2)
    await functions.consumer_heartbeat("w", 60_000, "1")
    await functions.schedule_retry(a, job_a, "IOError", "flaky", now_ms() - 1, {})
    await functions.schedule_retry(b, job_b, "IOError", "flaky", now_ms() + 60_000, {})
    await asyncio.sleep(0.15)  # both are idle past min_idle_ms now
    report = await reaper(settings, redis).cycle()
    assert report.reclaimed == 1
    assert await deliveries(redis, keys, a) == ("w", 2)
    assert await deliveries(redis, keys, b) == ("w", 1)  # not due: left alone despite being idle


async def test_no_live_consumer_still_enforces_the_ceiling(redis: Redis, settings: EventflowSettings,
                                                           functions: Functions, keys: Keys) -> None:
    [(_, _, e)] = await enqueue(functions)
    await redis.xreadgroup(keys.group, "gone", {keys.job_stream: ">"}, count=1)
    for _ in range(2):
        await redis.xclaim(keys.job_stream, keys.group, "gone", 0, [e])
    await asyncio.sleep(0.15)
    report = await reaper(settings, redis).cycle()
    assert report.dead_lettered == 1 and report.reclaimed == 0
