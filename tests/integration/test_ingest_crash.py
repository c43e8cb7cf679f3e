"""SIGKILL of a real redis-server (AOF, appendfsync always) during a submit storm through the real ingest.

The ingest may only answer 202, 200 or 503 -- never 500 -- and after a restart on the same data directory
every job it answered 202 for is on the stream; clients that retry their 503s end with exactly one entry each.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from eventflow.embedded import EmbeddedServer
from eventflow.keys import Keys
from eventflow.redis.client import bootstrap, connect
from eventflow.settings import EventflowSettings
from tests.conftest import wait_for
from tests.integration.test_ingest import body, serve

pytestmark = pytest.mark.slow

WORKERS = 24
BEFORE_KILL = 300  # accepted jobs before the SIGKILL
AFTER_RESTART = 300  # accepted jobs after the restart


class Storm:
    """Clients submitting distinct jobs back to back; every answer is recorded with its payload number."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.numbers = itertools.count()
        self.answers: list[tuple[int, int, dict[str, Any]]] = []
        self.stopped = False

    async def submit(self, i: int) -> int:
        reply = await self.client.post("/v1/ndvi/jobs", json=body(farm_id=f"farm-{i}"))
        self.answers.append((i, reply.status_code, reply.json()))
        return reply.status_code

    async def worker(self) -> None:
        while not self.stopped:
            await self.submit(next(self.numbers))

    def count(self, status: int) -> int:
        return sum(1 for _, s, _ in self.answers if s == status)


async def test_sigkill_during_submit_storm_loses_no_accepted_job(
        make_redis_server: Callable[..., EmbeddedServer], make_settings: Callable[..., EventflowSettings],
        keys: Keys) -> None:
    server = make_redis_server(aof=True, appendfsync="always")
    # Short timeouts so requests in the outage fail over to 503 in well under a second each.
    settings = make_settings(redis={"url": server.url, "socket_timeout_s": 1.0, "connect_timeout_s": 0.5})
    admin = connect(settings)
    assert await admin.config_get("appendonly") == {"appendonly": "yes"}
    assert await admin.config_get("appendfsync") == {"appendfsync": "always"}
    await bootstrap(admin, keys)
    ingest, serving, url = await serve(settings)
    client = httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=WORKERS))
    storm = Storm(client)
    workers = [asyncio.create_task(storm.worker()) for _ in range(WORKERS)]
    try:
        await wait_for(lambda: storm.count(202) >= BEFORE_KILL, timeout_s=60)
        await asyncio.to_thread(server.kill)  # SIGKILL: no shutdown, no final fsync
        killed_at = len(storm.answers)
        await wait_for(lambda: storm.count(503) >= WORKERS, timeout_s=30)
        await asyncio.to_thread(server.restart)  # same port, same data directory
        restarted_at = len(storm.answers)
        accepted_before = storm.count(202)
        await wait_for(lambda: storm.count(202) >= accepted_before + AFTER_RESTART, timeout_s=60)
        storm.stopped = True
        await asyncio.gather(*workers)

        statuses = Counter(status for _, status, _ in storm.answers)
        assert set(statuses) <= {202, 503}, statuses  # fresh payloads: never a duplicate, never a 500
        assert statuses[503] >= WORKERS and killed_at > 0 and restarted_at > killed_at
        accepted = {data["job_id"] for _, status, data in storm.answers if status == 202}
        for _, status, data in storm.answers:
            if status == 503:
                assert data["error"] in {"redis_unavailable", "redis_refused"} and data["field"] is None, data

        entries = await admin.xrange(keys.job_stream)
        on_stream = Counter(fields["job_id"] for _, fields in entries)
        assert accepted <= set(on_stream), f"{len(accepted - set(on_stream))} accepted jobs lost"
        assert set(on_stream.values()) == {1}

        # A client retrying its 503s gets 202 (the write never happened) or 200 (it happened, the answer was
        # lost), and then every payload is on the stream exactly once.
        failed = sorted({i for i, status, _ in storm.answers if status == 503})
        retried = Counter([await storm.submit(i) for i in failed])
        assert set(retried) <= {200, 202}, retried
        entries = await admin.xrange(keys.job_stream)
        submitted = {i for i, _, _ in storm.answers}
        hashes = Counter(fields["request_hash"] for _, fields in entries)
        assert len(entries) == len(submitted) and set(hashes.values()) == {1}
    finally:
        storm.stopped = True
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await client.aclose()
        ingest.should_exit = True
        await serving
        await admin.aclose()

