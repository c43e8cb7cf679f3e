"""Network faults through the suite's TCP proxy: a lost reply must not duplicate a job."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from eventflow.embedded import EmbeddedServer
from eventflow.keys import Keys
from eventflow.redis.client import connect
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings
from tests.faultproxy import FaultProxy
from tests.integration.test_consumer import enqueue


async def test_lost_reply_to_submit_does_not_duplicate(redis_server: EmbeddedServer, redis: Redis,
                                                       keys: Keys, settings: EventflowSettings) -> None:
    proxy = await FaultProxy(redis_server.port).start()
    client = connect(settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": proxy.url})}))
    try:
        functions = Functions(client, keys)
        proxy.drop_reply_after(b"eventflow_submit_job")
        [(job_id, _, entry_id)] = await enqueue(functions)
        assert proxy.dropped == 1, "the fault was not injected"
        assert await redis.xlen(keys.job_stream) == 1
        assert (await redis.xrange(keys.job_stream))[0][0] == entry_id
        assert await redis.get(keys.dedupe(await redis.hget(keys.job_state(job_id), "request_hash"))) == job_id
    finally:
        await client.aclose()
        await proxy.stop()


async def test_negative_control_plain_xadd_duplicates(redis_server: EmbeddedServer, redis: Redis,
                                                      settings: EventflowSettings) -> None:
    """The hazard the function exists for: the same fault on a plain XADD writes the entry twice."""
    proxy = await FaultProxy(redis_server.port).start()
    client = connect(settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": proxy.url})}))
    try:
        proxy.drop_reply_after(b"XADD")
        await client.xadd("plain", {"a": "1"})
        assert proxy.dropped == 1
        assert await redis.xlen("plain") == 2
    finally:
        await client.aclose()
        await proxy.stop()


async def test_blackholed_redis_times_out_instead_of_hanging(redis_server: EmbeddedServer) -> None:
    proxy = await FaultProxy(redis_server.port).start()
    proxy.blackhole = True
    client = Redis.from_url(proxy.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        try:
            await asyncio.wait_for(client.ping(), 10)
            raised = False
        except Exception:  # redis TimeoutError/ConnectionError after its retries
            raised = True
        assert raised
    finally:
        await client.aclose()
        await proxy.stop()
