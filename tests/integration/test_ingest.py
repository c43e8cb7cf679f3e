"""The ingest API over real HTTP (uvicorn) on a real Redis: admission, dedupe, errors that change nothing."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from eventflow_ingest.app import create_app
from redis.asyncio import Redis

from eventflow.embedded import free_port
from eventflow.keys import Keys
from eventflow.settings import EventflowSettings

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "src/eventflow/samples/s2l1c"


def body(**over: Any) -> dict[str, Any]:
    req = {"farm_id": "farm-42", "inputs": {
        "red": {"href": (SAMPLE / "T33UUU_20170216T102101_B04.jp2").as_uri(), "band": 1},
        "nir": {"href": (SAMPLE / "T33UUU_20170216T102101_B08.jp2").as_uri(), "band": 1}}}
    req.update(over)
    return req


async def serve(settings: EventflowSettings) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None,
                                           lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, f"http://127.0.0.1:{port}"


@pytest.fixture
async def api(redis: Redis, make_settings: Callable[..., EventflowSettings]) -> AsyncIterator[Any]:
    """Factory: start ingest with settings overrides; returns an httpx client on it."""
    started: list[tuple[uvicorn.Server, asyncio.Task[None], httpx.AsyncClient]] = []

    async def create(**groups: dict[str, Any]) -> httpx.AsyncClient:
        server, task, url = await serve(make_settings(**groups))
        client = httpx.AsyncClient(base_url=url, timeout=10)
        started.append((server, task, client))
        return client

    yield create
    for server, task, client in started:
        await client.aclose()
        server.should_exit = True
        await task


async def snapshot(redis: Redis, keys: Keys) -> tuple[int, int]:
    """Stream length and the server's count of write commands: both must be unchanged by a rejection."""
    stats = await redis.info("commandstats")
    writes = sum(v["calls"] for k, v in stats.items() if k.split("_", 1)[-1] in {"xadd", "set", "hset", "fcall"})
    return await redis.xlen(keys.job_stream), writes


async def test_submit_get_and_duplicate(api: Any, redis: Redis, keys: Keys) -> None:
    client = await api()
    first = await client.post("/v1/ndvi/jobs", json=body())
    assert first.status_code == 202, first.text
    data = first.json()
    assert data["duplicate"] is False and data["status"] == "queued"
    assert first.headers["location"] == f"/v1/ndvi/jobs/{data['job_id']}"
    # Same request with keys reordered and 1 written as 1.0: the existing job, 200.
    reordered = json.loads(json.dumps({"inputs": {"nir": {"band": 1.0, "href": body()["inputs"]["nir"]["href"]},
                                                  "red": body()["inputs"]["red"]}, "farm_id": "farm-42"}))
    again = await client.post("/v1/ndvi/jobs", json=reordered)
    assert again.status_code == 200 and again.json()["job_id"] == data["job_id"] and again.json()["duplicate"]
    assert await redis.xlen(keys.job_stream) == 1
    view = await client.get(f"/v1/ndvi/jobs/{data['job_id']}")
    assert view.status_code == 200 and view.json()["state"] == "queued"
    assert (await client.get("/v1/ndvi/jobs/nope")).status_code == 404


async def test_cancel_is_idempotent_frees_the_request_and_finished_jobs_conflict(api: Any, redis: Redis,
                                                                                 keys: Keys) -> None:
    client = await api()
    job = (await client.post("/v1/ndvi/jobs", json=body())).json()
    cancelled = await client.delete(f"/v1/ndvi/jobs/{job['job_id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert (await client.delete(f"/v1/ndvi/jobs/{job['job_id']}")).status_code == 200
    resubmitted = await client.post("/v1/ndvi/jobs", json=body())  # cancelling freed the request: a new job
    assert resubmitted.status_code == 202, resubmitted.text
    assert resubmitted.json()["job_id"] != job["job_id"] and not resubmitted.json()["duplicate"]
    done = (await client.post("/v1/ndvi/jobs", json=body(farm_id="farm-done"))).json()
    await redis.hset(keys.job_state(done["job_id"]), "state", "succeeded")
    reply = await client.delete(f"/v1/ndvi/jobs/{done['job_id']}")
    assert reply.status_code == 409 and reply.json()["error"] == "already_finished"


@pytest.mark.parametrize(("payload", "field"), [
    (body(extra=1), "extra"),
    (body(farm_id="../etc"), "farm_id"),
    (body(priority=99), "priority"),
    (body(inputs={"href": "file:///etc/passwd", "red_band": 1, "nir_band": 2}), "inputs.href"),
    (body(inputs={"href": "/vsicurl/https://example.com/x.tif", "red_band": 1, "nir_band": 2}), "inputs.href"),
    (body(inputs={"href": "https://169.254.169.254/latest", "red_band": 1, "nir_band": 2}), "inputs.href"),
    (body(inputs={"href": "https://127.1/x.tif", "red_band": 1, "nir_band": 2}), "inputs.href"),
    (body(inputs={"href": "https://[::1]/x.tif", "red_band": 1, "nir_band": 2}), "inputs.href"),
    (body(inputs={"href": "https://2130706433/x.tif", "red_band": 1, "nir_band": 2}), "inputs.href"),
    (body(inputs={"href": "https://evil.example/x.tif", "red_band": 1, "nir_band": 2}), "inputs.href"),
    (body(inputs={"href": "file:///tmp/../etc/passwd", "red_band": 1, "nir_band": 2}), "inputs.href"),
    (body(inputs={"href": "ftp://x/y.tif", "red_band": 1, "nir_band": 2}), "inputs.href"),
    (body(fields={"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Point"}}]}),
     "fields"),
])
async def test_bad_input_is_422_naming_the_field_and_writes_nothing(api: Any, redis: Redis, keys: Keys,
                                                                    payload: dict[str, Any], field: str) -> None:
    client = await api()
    before = await snapshot(redis, keys)
    reply = await client.post("/v1/ndvi/jobs", json=payload)
    assert reply.status_code == 422, reply.text
    assert reply.json()["field"].startswith(field), reply.json()
    assert await snapshot(redis, keys) == before


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_nan_in_geojson_is_422_not_500(api: Any, redis: Redis, keys: Keys, literal: str) -> None:
    """Python's JSON parser accepts NaN / Infinity; they must end as a 422 on `fields`, not in the hash step."""
    client = await api()
    ring = [[0, 0], [1, 0], [1, 1], [0, 0]]
    fields = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    raw = json.dumps(body(fields=fields)).replace("[1, 1]", f"[1, {literal}]", 1)
    assert literal in raw
    before = await snapshot(redis, keys)
    reply = await client.post("/v1/ndvi/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["field"].startswith("fields"), reply.json()
    assert await snapshot(redis, keys) == before


async def test_symlink_escape_is_rejected(api: Any, redis: Redis, keys: Keys, tmp_path: Path) -> None:
    client = await api()
    link = tmp_path / "escape.tif"
    os.symlink("/etc/hostname", link)
    reply = await client.post("/v1/ndvi/jobs", json=body(inputs={"href": link.as_uri(), "red_band": 1,
                                                                 "nir_band": 2}))
    assert reply.status_code == 422 and reply.json()["field"] == "inputs.href"
    assert await redis.xlen(keys.job_stream) == 0


async def test_wrong_content_type_and_oversize_body(api: Any, redis: Redis, keys: Keys) -> None:
    client = await api(ingest={"max_body_bytes": 2048})
    before = await snapshot(redis, keys)
    reply = await client.post("/v1/ndvi/jobs", content=json.dumps(body()), headers={"content-type": "text/plain"})
    assert reply.status_code == 415 and reply.json()["field"] == "Content-Type"
    big = body(fields={"type": "FeatureCollection", "features": [], "pad": "x" * 5000})
    reply = await client.post("/v1/ndvi/jobs", json=big)
    assert reply.status_code == 413 and reply.json()["error"] == "body_too_large"
    reply = await client.post("/v1/ndvi/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 422
    assert await snapshot(redis, keys) == before


async def test_auth_and_tenant_scoping(api: Any, redis: Redis, keys: Keys) -> None:
    client = await api(ingest={"tokens": {"tok-a": "tenant-a", "tok-b": "tenant-b"}, "allow_anonymous": False})
    assert (await client.post("/v1/ndvi/jobs", json=body())).status_code == 401
    bad = await client.post("/v1/ndvi/jobs", json=body(), headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    a = await client.post("/v1/ndvi/jobs", json=body(), headers={"Authorization": "Bearer tok-a"})
    b = await client.post("/v1/ndvi/jobs", json=body(), headers={"Authorization": "Bearer tok-b"})
    assert a.status_code == b.status_code == 202
    assert a.json()["job_id"] != b.json()["job_id"]
    # Tenant b cannot see tenant a's job.
    other = await client.get(f"/v1/ndvi/jobs/{a.json()['job_id']}", headers={"Authorization": "Bearer tok-b"})
    assert other.status_code == 404
    assert (await client.get("/healthz")).status_code == 200
    assert await redis.xlen(keys.job_stream) == 2


async def test_backpressure_is_429_with_retry_after(api: Any, redis: Redis, keys: Keys) -> None:
    client = await api(ingest={"max_backlog": 2, "retry_after_s": 7})
    for i in range(2):
        assert (await client.post("/v1/ndvi/jobs", json=body(farm_id=f"farm-{i}"))).status_code == 202
    reply = await client.post("/v1/ndvi/jobs", json=body(farm_id="farm-9"))
    assert reply.status_code == 429 and reply.headers["retry-after"] == "7"
    assert await redis.xlen(keys.job_stream) == 2


async def test_readyz_and_metrics(api: Any, redis: Redis, keys: Keys) -> None:
    client = await api()
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    await client.post("/v1/ndvi/jobs", json=body())
    metrics = (await client.get("/metrics")).text
    assert "eventflow_ingest_jobs_accepted_total 1.0" in metrics
    await redis.delete(keys.epoch)
    assert (await client.get("/readyz")).status_code == 503
    reply = await client.post("/v1/ndvi/jobs", json=body(farm_id="farm-7"))
    assert reply.status_code == 503 and "retry-after" in reply.headers


async def test_redis_down_is_503_then_recovers(api: Any, redis_server: Any, redis: Redis, keys: Keys) -> None:
    client = await api()
    redis_server.kill()
    try:
        reply = await client.post("/v1/ndvi/jobs", json=body())
        assert reply.status_code == 503 and reply.headers["retry-after"]
        assert (await client.get("/readyz")).status_code == 503
    finally:
        redis_server.restart()
    # No manual step: the same process answers again once Redis is back (the data survived via AOF).
    for _ in range(50):
        reply = await client.post("/v1/ndvi/jobs", json=body())
        if reply.status_code == 202:
            break
        await asyncio.sleep(0.1)
    assert reply.status_code == 202, reply.text


async def test_openapi_published(api: Any) -> None:
    client = await api()
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/ndvi/jobs" in spec["paths"]
    assert spec["paths"]["/v1/ndvi/jobs"]["post"]["operationId"] == "submit_ndvi_job"


async def test_undecodable_bodies_and_unknown_routes_answer_the_error_body(api: Any, redis: Redis, keys: Keys) -> None:
    client = await api()
    before = await snapshot(redis, keys)
    json_type = {"content-type": "application/json"}
    # Found by schemathesis: a non-UTF-8 body was FastAPI's 400 {"detail": ...}; a JSON syntax error named the
    # character offset as its field.
    for content, message in ((b"HC\xff", "not valid UTF-8 JSON"), (b"{not json", "not valid JSON")):
        reply = await client.post("/v1/ndvi/jobs", content=content, headers=json_type)
        assert reply.status_code == 422 and reply.json()["error"] == "invalid_request", reply.text
        assert reply.json()["field"] is None and message in reply.json()["message"], reply.text
    missing = await client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json() == {"error": "not_found", "message": "Not Found",
                                                             "field": None}
    wrong = await client.put("/v1/ndvi/jobs", content=b"{}", headers=json_type)
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"
    assert "POST" in wrong.headers["allow"]
    assert await snapshot(redis, keys) == before


async def test_missing_function_library_is_503_not_500(api: Any, redis: Redis, keys: Keys) -> None:
    client = await api(ingest={"retry_after_s": 3})
    job = (await client.post("/v1/ndvi/jobs", json=body())).json()
    await redis.function_flush()  # a server restored without the library: not bootstrapped, not a bug
    submit = await client.post("/v1/ndvi/jobs", json=body(farm_id="farm-8"))
    cancel = await client.delete(f"/v1/ndvi/jobs/{job['job_id']}")
    for reply in (submit, cancel):
        assert reply.status_code == 503 and reply.headers["retry-after"] == "3", reply.text
        assert reply.json()["error"] == "not_ready" and "eventflow bootstrap" in reply.json()["message"]
    assert await redis.xlen(keys.job_stream) == 1
