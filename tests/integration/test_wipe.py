"""A Redis wiped (or re-bootstrapped) under running services: they stop and exit 3, recreating nothing
(issue 6: an epoch key written at bootstrap; components report not-ready instead of carrying on)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from eventflow_consumer.handlers import JobContext
from eventflow_consumer.worker import Worker
from eventflow_reaper.reclaim import Reaper
from redis.asyncio import Redis

from eventflow.contract import JobType, StreamEntry
from eventflow.keys import Keys
from eventflow.redis.client import EXIT_WIPED, bootstrap
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings
from tests.conftest import wait_for
from tests.integration.test_consumer import enqueue


class Blocking:
    def __init__(self) -> None:
        self.started = threading.Event()

    def __call__(self, entry: StreamEntry, ctx: JobContext) -> dict[str, Any]:
        self.started.set()
        while not ctx.stop.is_set():
            ctx.stop.wait(0.05)
        ctx.check_stop()
        return {"outputs": {}, "stats": {}}


async def test_consumer_exits_without_writing_when_redis_is_wiped(redis: Redis, settings: EventflowSettings,
                                                                   functions: Functions, keys: Keys) -> None:
    handler = Blocking()
    s = settings.model_copy(update={"consumer": settings.consumer.model_copy(update={
        "heartbeat_interval_ms": 200, "block_ms": 50})})
    w = Worker(s, redis, handlers={JobType.ndvi: handler})
    task = asyncio.create_task(w.run())
    [(_, h, _)] = await enqueue(functions, 1)
    await wait_for(handler.started.is_set, 10)
    await redis.flushall()  # the data set goes away; the Function library survives FLUSHALL
    assert await asyncio.wait_for(task, 10) == EXIT_WIPED
    assert not await redis.exists(keys.job_stream), "the stream (and a fresh group) was recreated"
    assert not await redis.exists(keys.result(h))
    assert await redis.dbsize() == 0, await redis.keys("*")


def start_fast_reaper(settings: EventflowSettings, redis: Redis) -> tuple[Reaper, asyncio.Task[int]]:
    """A reaper cycling every 0.1 s, running as a task."""
    s = settings.model_copy(update={"reaper": settings.reaper.model_copy(update={"interval_s": 0.1})})
    reaper = Reaper(s, redis)
    return reaper, asyncio.create_task(reaper.run())


async def test_reaper_exits_when_redis_is_rebootstrapped(redis: Redis, settings: EventflowSettings,
                                                         keys: Keys) -> None:
    _, task = start_fast_reaper(settings, redis)
    await asyncio.sleep(0.3)
    assert not task.done()
    await redis.flushall()
    await bootstrap(redis, keys)  # a new, empty data set with another epoch
    assert await asyncio.wait_for(task, 10) == EXIT_WIPED


async def test_negative_control_the_epoch_is_what_detects_it(redis: Redis, settings: EventflowSettings,
                                                             keys: Keys) -> None:
    """Same data set, epoch untouched: the reaper keeps running (the check is not trigger-happy)."""
    reaper, task = start_fast_reaper(settings, redis)
    await asyncio.sleep(1.0)
    assert not task.done()
    reaper.stopping.set()
    assert await asyncio.wait_for(task, 5) == 0
