"""Concurrent duplicate submissions over HTTP: one stream entry per request hash, one 202 and the rest 200."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter, defaultdict
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from eventflow.keys import Keys
from tests.integration.test_ingest import api, body
from tests.jobs import shuffled

__all__ = ["api"]  # re-exported so pytest finds the fixture in this module too

pytestmark = pytest.mark.slow

PAYLOADS = 1000
COPIES = 3
IN_FLIGHT = 48  # requests on the wire at once; the three copies of a payload are adjacent, so race


async def test_concurrent_duplicates_make_one_entry_per_request_hash(api: Any, redis: Redis, keys: Keys) -> None:
    served = await api()
    rng = random.Random(3)
    requests: list[tuple[int, bytes]] = []
    for i in range(PAYLOADS):
        payload = body(farm_id=f"farm-{i}", priority=i % 10)
        # Copies differ in key order and spacing only, and sit next to each other so they are in flight at once.
        for copy in range(COPIES):
            separators = (",", ":") if copy % 2 else (", ", ": ")
            requests.append((i, json.dumps(shuffled(payload, rng), separators=separators).encode()))
    # A semaphore, not the pool, bounds what is in flight: httpcore rescans its whole wait queue whenever a
    # connection frees up, which turns 3,000 queued requests into minutes of client CPU.
    in_flight = asyncio.Semaphore(IN_FLIGHT)
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30,
                                 limits=httpx.Limits(max_connections=IN_FLIGHT)) as client:

        async def submit(i: int, content: bytes) -> tuple[int, int, dict[str, Any]]:
            async with in_flight:
                reply = await client.post("/v1/ndvi/jobs", content=content,
                                          headers={"content-type": "application/json"})
            return i, reply.status_code, reply.json()

        replies = await asyncio.gather(*(submit(i, content) for i, content in requests))

    by_payload: dict[int, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for i, status, data in replies:
        by_payload[i].append((status, data))
    assert Counter(status for _, status, _ in replies) == {202: PAYLOADS, 200: PAYLOADS * (COPIES - 1)}
    hashes = set()
    for i, answers in by_payload.items():
        assert sorted(status for status, _ in answers) == [200] * (COPIES - 1) + [202], (i, answers)
        assert len({data["job_id"] for _, data in answers}) == 1, (i, answers)
        assert len({data["request_hash"] for _, data in answers}) == 1, (i, answers)
        assert [data["duplicate"] for status, data in answers if status == 200] == [True] * (COPIES - 1)
        hashes.add(answers[0][1]["request_hash"])
    assert len(hashes) == PAYLOADS

    entries = await redis.xrange(keys.job_stream)
    assert len(entries) == PAYLOADS
    on_stream = Counter(fields["request_hash"] for _, fields in entries)
    assert set(on_stream) == hashes and set(on_stream.values()) == {1}
    accepted = {data["job_id"] for _, status, data in replies if status == 202}
    assert {fields["job_id"] for _, fields in entries} == accepted
