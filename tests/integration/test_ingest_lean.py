"""The lean submit handler answers exactly as the FastAPI route: same statuses, headers, bodies, stream entries.

Every scenario runs twice on a freshly bootstrapped Redis, once against an ingest with
``lean_submit`` on (the default) and once with it off (every request through FastAPI), and the two
transcripts must match, job ids aside (they are random).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from eventflow import tokens
from eventflow.keys import Keys
from eventflow.redis.client import bootstrap
from eventflow.settings import EventflowSettings
from tests.integration.test_ingest import api, body, serve

__all__ = ["api"]

HMAC_KEYS = {"live": "L" * 32}
STATIC = "static-token-0123456789"
INGEST = {"tokens": {STATIC: "tenant-a"}, "hmac_keys": HMAC_KEYS, "allow_anonymous": False, "max_backlog": 3,
          "retry_after_s": 7, "max_body_bytes": 4096}
JSON = {"content-type": "application/json"}
AUTH = {**JSON, "authorization": f"Bearer {STATIC}"}


def signed(scope: tokens.Scope) -> dict[str, str]:
    token = tokens.mint(HMAC_KEYS, "live", "tenant-signed", 300, scope)
    return {**JSON, "authorization": f"Bearer {token}"}


def raw(payload: Any) -> bytes:
    return json.dumps(payload).encode()


#: (name, [(body bytes, headers), ...]) -- each scenario starts from an empty, bootstrapped Redis.
SCENARIOS: list[tuple[str, list[tuple[bytes, dict[str, str]]]]] = [
    ("accepted then duplicate (keys reordered, 1.0 for 1)", [
        (raw(body()), AUTH),
        (raw({"inputs": {"nir": {"band": 1.0, "href": body()["inputs"]["nir"]["href"]},
                         "red": body()["inputs"]["red"]}, "farm_id": "farm-42"}), AUTH)]),
    ("bad JSON is 422 before auth is looked at", [(b"{not json", JSON), (b"{not json", AUTH)]),
    ("not UTF-8", [(b"HC\xff", AUTH), (b"HC\xff", JSON)]),
    ("valid JSON without a token is 401 before field validation", [(raw(body(extra=1)), JSON)]),
    ("unknown field", [(raw(body(extra=1)), AUTH)]),
    ("no body, null, a list", [(b"", AUTH), (b"null", AUTH), (b"[]", AUTH)]),
    ("strict numbers", [(raw(body(priority="7")), AUTH), (raw(body(priority=True)), AUTH),
                        (raw(body(priority=3.0)), AUTH)]),
    ("unknown and malformed tokens", [
        (raw(body()), {**JSON, "authorization": "Bearer nope"}),
        (raw(body()), {**JSON, "authorization": "Basic abc"}),
        (raw(body()), {**JSON, "authorization": "Bearer ef1.live.e30.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"})]),
    ("signed tokens: write accepted, read is 403", [
        (raw(body()), signed(tokens.Scope.write)), (raw(body(farm_id="farm-7")), signed(tokens.Scope.read))]),
    ("idempotency key: limit, reuse, conflict", [
        (raw(body()), {**AUTH, "idempotency-key": "k" * 256}),
        (raw(body()), {**AUTH, "idempotency-key": "k" * 255}),
        (raw(body()), {**AUTH, "idempotency-key": "k" * 255}),
        (raw(body(farm_id="farm-other")), {**AUTH, "idempotency-key": "k" * 255})]),
    ("inputs not allowed", [
        (raw(body(inputs={"href": "file:///etc/passwd", "red_band": 1, "nir_band": 2})), AUTH),
        (raw(body(inputs={"href": "file:///tmp/%00x", "red_band": 1, "nir_band": 2})), AUTH),
        (raw(body(inputs={"href": "https://169.254.169.254/x", "red_band": 1, "nir_band": 2})), AUTH)]),
    ("content type and size", [
        (raw(body()), {**AUTH, "content-type": "text/plain"}),
        (raw(body(fields={"type": "FeatureCollection", "features": [], "pad": "x" * 5000})), AUTH)]),
    ("backlog full is 429", [(raw(body(farm_id=f"farm-{i}")), AUTH) for i in range(5)]),
]


async def transcript(client: httpx.AsyncClient, redis: Redis, keys: Keys,
                     requests: list[tuple[bytes, dict[str, str]]]) -> list[Any]:
    """What the client saw and what the stream holds, with job ids replaced by their order of appearance."""
    seen: list[Any] = []
    for content, headers in requests:
        reply = await client.post("/v1/ndvi/jobs", content=content, headers=headers)
        kept = {k: reply.headers[k] for k in ("content-type", "location", "retry-after", "www-authenticate",
                                              "content-length") if k in reply.headers}
        seen.append((reply.status_code, kept, reply.content))
    entries = [fields for _, fields in await redis.xrange(keys.job_stream)]
    for fields in entries:
        fields.pop("trace_id")
        fields.pop("enqueued_at_ms")
    text = json.dumps([seen, entries], default=lambda b: b.decode("latin-1"))
    ids = list(dict.fromkeys(re.findall(r"j[0-9a-f]{25}", text)))
    for n, job_id in enumerate(ids):
        text = text.replace(job_id, f"<job {n}>")
    return json.loads(text)  # type: ignore[no-any-return]


async def reset(redis: Redis, keys: Keys) -> None:
    await redis.flushall()
    await redis.function_flush()
    await bootstrap(redis, keys)


@pytest.mark.parametrize(("name", "requests"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
async def test_lean_and_fastapi_answer_alike(api: Any, redis: Redis, keys: Keys, name: str,
                                             requests: list[tuple[bytes, dict[str, str]]]) -> None:
    lean = await api(ingest=INGEST)
    full = await api(ingest={**INGEST, "lean_submit": False})
    await reset(redis, keys)
    via_lean = await transcript(lean, redis, keys, requests)
    await reset(redis, keys)
    via_full = await transcript(full, redis, keys, requests)
    assert via_lean == via_full


async def test_lean_metrics_count_like_the_route(make_settings: Callable[..., EventflowSettings], redis: Redis,
                                                 keys: Keys) -> None:
    server, task, url = await serve(make_settings(ingest={"max_backlog": 1}))
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.post("/v1/ndvi/jobs", json=body())).status_code == 202
            assert (await client.post("/v1/ndvi/jobs", json=body())).status_code == 200
            assert (await client.post("/v1/ndvi/jobs", json=body(farm_id="farm-9"))).status_code == 429
            text = (await client.get("/metrics")).text
    finally:
        server.should_exit = True
        await task
    for line in ('eventflow_ingest_jobs_accepted_total 1.0', 'eventflow_ingest_jobs_duplicate_total 1.0',
                 'eventflow_ingest_jobs_rejected_total{reason="Backpressure"} 1.0',
                 'eventflow_ingest_requests_total{code="202",route="submit"} 1.0',
                 'eventflow_ingest_requests_total{code="200",route="submit"} 1.0',
                 'eventflow_ingest_request_duration_seconds_count 2.0'):
        assert line in text, text


async def test_openapi_is_the_same_with_and_without_the_lean_handler(api: Any) -> None:
    lean = await api()
    full = await api(ingest={"lean_submit": False})
    spec = (await lean.get("/openapi.json")).json()
    assert spec == (await full.get("/openapi.json")).json()
    post = spec["paths"]["/v1/ndvi/jobs"]["post"]
    assert post["operationId"] == "submit_ndvi_job"
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/NdviJobRequest"}
    assert {"202", "200", "401", "403", "413", "415", "422", "429", "503"} <= set(post["responses"])


async def test_trailing_slash_and_other_methods_go_through_fastapi(api: Any, redis: Redis, keys: Keys) -> None:
    client = await api()
    slash = await client.post("/v1/ndvi/jobs/", content=raw(body()), headers=JSON, follow_redirects=False)
    assert slash.status_code in (307, 404, 405), slash.text  # whatever FastAPI says, never a lean 202
    assert (await client.put("/v1/ndvi/jobs", content=b"{}", headers=JSON)).status_code == 405
    assert await redis.xlen(keys.job_stream) == 0
