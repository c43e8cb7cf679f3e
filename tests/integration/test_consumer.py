"""The consumer runtime in-process on a real Redis, with test handlers in the registry."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from eventflow_consumer.handlers import JobContext, on_event_loop
from eventflow_consumer.worker import Worker
from redis.asyncio import Redis

from eventflow.contract import JobType, StreamEntry, now_ms
from eventflow.errors import InputError
from eventflow.keys import Keys
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings
from tests.conftest import wait_for
from tests.jobs import enqueue_bodies, farm_body


async def enqueue(functions: Functions, n: int = 1, tenant: str = "t") -> list[tuple[str, str, str]]:
    return await enqueue_bodies(functions, [farm_body(f"farm-{i}") for i in range(n)], tenant)


class Recorder:
    """A handler that counts executions per request hash and can be told to fail or block."""

    def __init__(self, behaviour: Callable[[StreamEntry, JobContext], None] | None = None) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.behaviour = behaviour

    def __call__(self, entry: StreamEntry, ctx: JobContext) -> dict[str, Any]:
        with self.lock:
            self.calls[entry.request_hash] += 1
        if self.behaviour:
            self.behaviour(entry, ctx)
        ctx.progress(1.0)
        return {"outputs": {}, "stats": {"fence": ctx.fence}}


def worker(settings: EventflowSettings, redis: Redis, handler: Recorder, **cfg: Any) -> Worker:
    s = settings.model_copy(update={"consumer": settings.consumer.model_copy(update=cfg)})
    return Worker(s, redis, handlers={JobType.ndvi: handler})


async def pending(redis: Redis, keys: Keys) -> int:
    return int((await redis.xpending(keys.job_stream, keys.group))["pending"])


async def test_jobs_run_once_commit_and_ack(redis: Redis, settings: EventflowSettings, functions: Functions,
                                            keys: Keys) -> None:
    jobs = await enqueue(functions, 40)
    handler = Recorder()
    w = worker(settings, redis, handler, concurrency=4, block_ms=50)
    task = asyncio.create_task(w.run())
    await wait_for(lambda: sum(handler.calls.values()) == 40 and w.processed == 40, 20)
    w.stop()
    assert await task == 0
    assert all(n == 1 for n in handler.calls.values())
    assert await pending(redis, keys) == 0
    for job_id, h, _ in jobs:
        assert await redis.hget(keys.job_state(job_id), "state") == "succeeded"
        assert await redis.exists(keys.result(h))
        assert not await redis.exists(keys.lease(h))
    types = Counter(e[1]["type"] for e in await redis.xrange(keys.event_stream))
    assert types["queued"] == types["started"] == types["succeeded"] == 40
    assert not await redis.exists(keys.heartbeat(w.name))  # removed on clean exit


async def test_existing_result_is_acked_without_running(redis: Redis, settings: EventflowSettings,
                                                        functions: Functions, keys: Keys) -> None:
    [(_, h, _)] = await enqueue(functions)
    await redis.hset(keys.result(h), mapping={"fence": "1", "json": "{}"})
    handler = Recorder()
    w = worker(settings, redis, handler, block_ms=50)
    task = asyncio.create_task(w.run())
    await wait_for(lambda: w.processed == 1)
    w.stop()
    await task
    assert handler.calls[h] == 0
    assert await pending(redis, keys) == 0


async def test_poison_and_permanent_failures_go_to_dlq(redis: Redis, settings: EventflowSettings,
                                                       functions: Functions, keys: Keys) -> None:
    await redis.xadd(keys.job_stream, {"v": "99", "job_id": "jx", "payload": "{}"})

    def fail(_: StreamEntry, __: JobContext) -> None:
        raise InputError("band 9 out of range")

    [(job_id, _, entry_id)] = await enqueue(functions)
    w = worker(settings, redis, Recorder(fail), block_ms=50)
    task = asyncio.create_task(w.run())
    await wait_for(lambda: w.processed == 2)
    w.stop()
    await task
    dlq = {r[1]["failure_class"]: r[1] for r in await redis.xrange(keys.dead_letter_stream)}
    assert set(dlq) == {"poison", "input"}
    assert "schema version" in dlq["poison"]["failure_message"]
    assert dlq["input"]["original_entry_id"] == entry_id and "band 9" in dlq["input"]["failure_message"]
    assert await redis.hget(keys.job_state(job_id), "state") == "dead_lettered"
    assert await pending(redis, keys) == 0


async def test_transient_failure_stays_pending_for_the_reaper(redis: Redis, settings: EventflowSettings,
                                                              functions: Functions, keys: Keys) -> None:
    def flaky(_: StreamEntry, __: JobContext) -> None:
        raise ConnectionError("input store timed out")

    [(job_id, h, entry_id)] = await enqueue(functions)
    handler = Recorder(flaky)
    w = worker(settings, redis, handler, block_ms=50, pending_rescan_s=0.05)
    task = asyncio.create_task(w.run())
    await wait_for(lambda: w.processed == 1)
    await asyncio.sleep(0.3)  # several own-pending rescans: a parked entry must not be retried hot
    w.stop()
    await task
    assert handler.calls[h] == 1
    assert await pending(redis, keys) == 1
    assert await redis.hget(keys.job_state(job_id), "state") == "retrying"
    due = await redis.zscore(keys.retry_schedule, entry_id)
    assert due is not None and now_ms() < due <= now_ms() + settings.consumer.retry_base_ms
    failure = await redis.hgetall(keys.failure(entry_id))
    assert failure["failure_class"] == "ConnectionError" and failure["failures"] == "1"
    assert not await redis.exists(keys.lease(h))


async def test_sigterm_drains_in_flight_jobs(redis: Redis, settings: EventflowSettings, functions: Functions,
                                             keys: Keys) -> None:
    started = threading.Event()

    def slow(_: StreamEntry, __: JobContext) -> None:
        started.set()
        time.sleep(0.5)

    await enqueue(functions, 1)
    handler = Recorder(slow)
    w = worker(settings, redis, handler, block_ms=5000, drain_timeout_s=10)
    task = asyncio.create_task(w.run())
    await wait_for(started.is_set)
    t0 = time.monotonic()
    w.stop()
    assert await task == 0
    assert time.monotonic() - t0 >= 0.3  # it waited for the job...
    assert await pending(redis, keys) == 0  # ...which committed and acked
    assert await redis.xlen(keys.job_stream) == 1


async def test_drain_timeout_hands_work_back(redis: Redis, settings: EventflowSettings, functions: Functions,
                                             keys: Keys) -> None:
    started = threading.Event()

    def stuck(_: StreamEntry, ctx: JobContext) -> None:
        started.set()
        while not ctx.stop.is_set():
            time.sleep(0.01)
        ctx.check_stop()

    [(_, h, _)] = await enqueue(functions, 1)
    w = worker(settings, redis, Recorder(stuck), block_ms=5000, drain_timeout_s=0.2)
    task = asyncio.create_task(w.run())
    await wait_for(started.is_set)
    w.stop()
    assert await asyncio.wait_for(task, 5) == 0
    assert await pending(redis, keys) == 1  # left for another consumer, not lost
    assert not await redis.exists(keys.lease(h))  # lease released
    assert not await redis.exists(keys.result(h))


async def test_stop_reading_is_prompt(redis: Redis, settings: EventflowSettings) -> None:
    w = worker(settings, redis, Recorder(), block_ms=30_000)
    task = asyncio.create_task(w.run())
    await wait_for(lambda: redis.exists(w.keys.heartbeat(w.name)))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    w.stop()
    await task
    # A 30 s blocking read must not delay shutdown (the brief asks for < 100 ms to stop reading).
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("kill_between", [True])
async def test_commit_then_crash_is_acked_on_redelivery_without_rerun(
        redis: Redis, settings: EventflowSettings, functions: Functions, keys: Keys, kill_between: bool) -> None:
    [(job_id, h, entry_id)] = await enqueue(functions)
    # Simulate a worker that committed and died before its ack: entry pending for "dead", result present.
    await redis.xreadgroup(keys.group, "dead", {keys.job_stream: ">"}, count=1)
    fence = await functions.acquire_lease(h, job_id, "tok", 10_000, {})
    await functions.commit_result(h, job_id, "tok", fence, "{}", {})
    # The reaper hands it to the new consumer.
    handler = Recorder()
    w = worker(settings, redis, handler, block_ms=50, pending_rescan_s=0.05, name="fresh")
    await redis.xclaim(keys.job_stream, keys.group, "fresh", 0, [entry_id])
    task = asyncio.create_task(w.run())
    await wait_for(lambda: w.processed == 1)
    w.stop()
    await task
    assert handler.calls[h] == 0
    assert await pending(redis, keys) == 0


async def test_handler_declared_on_event_loop_runs_there_once_per_job(redis: Redis, settings: EventflowSettings,
                                                                      functions: Functions, keys: Keys) -> None:
    """A trivially short handler runs on the loop's thread (no hand-off), still through the whole protocol;
    its permanent failure still goes to the DLQ. Isolation "process" applies to undeclared handlers only."""
    jobs = await enqueue(functions, 30)
    poisoned = jobs[7][1]
    threads: set[int] = set()

    def behaviour(entry: StreamEntry, _: JobContext) -> None:
        threads.add(threading.get_ident())
        if entry.request_hash == poisoned:
            raise InputError("band 9 out of range")

    handler = Recorder(behaviour)
    w = worker(settings, redis, on_event_loop(handler), concurrency=8, block_ms=50, isolation="process")
    task = asyncio.create_task(w.run())
    await wait_for(lambda: w.processed == 30, 20)
    w.stop()
    assert await task == 0
    assert threads == {threading.get_ident()}  # the test's loop thread: no worker thread, no child process
    assert all(n == 1 for n in handler.calls.values()) and len(handler.calls) == 30
    assert await pending(redis, keys) == 0
    for job_id, h, _ in jobs:
        state = await redis.hget(keys.job_state(job_id), "state")
        assert state == ("dead_lettered" if h == poisoned else "succeeded")
        assert bool(await redis.exists(keys.result(h))) is (h != poisoned)
        assert not await redis.exists(keys.lease(h))
    types = Counter(e[1]["type"] for e in await redis.xrange(keys.event_stream))
    assert types["started"] == 30 and types["succeeded"] == 29 and types["dead_lettered"] == 1
