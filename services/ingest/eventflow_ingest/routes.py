"""HTTP routes: the jobs resource and the health/metrics endpoints."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from eventflow import __version__
from eventflow.contract import JobState, JobView, NdviJobRequest, SubmitResponse
from eventflow.errors import EventflowError
from eventflow.redis.client import check_ready, server_facts
from eventflow_ingest.deps import FunctionsDep, KeysDep, SettingsDep, TenantDep
from eventflow_ingest.errors import ApiError
from eventflow_ingest.submit import submit

jobs_router = APIRouter(prefix="/v1/ndvi/jobs", tags=["jobs"])
health_router = APIRouter(tags=["health"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing, unknown, expired or badly signed bearer token."},
    403: {"description": "Valid token whose scope does not allow this action (a read token cannot write)."},
    413: {"description": "Body over the size limit."},
    415: {"description": "Content-Type is not application/json."},
    422: {"description": "Invalid request; the body names the field."},
    429: {"description": "Backlog full; retry after Retry-After seconds."},
    503: {"description": "Job store unavailable; retry after Retry-After seconds."},
}


@jobs_router.post(
    "",
    operation_id="submit_ndvi_job",
    status_code=202,
    response_model=SubmitResponse,
    responses={200: {"model": SubmitResponse, "description": "Duplicate: the existing job."}, **_ERRORS},
)
async def submit_job(
    job: NdviJobRequest,
    request: Request,
    response: Response,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> SubmitResponse:
    """Accept an NDVI job: 202 once it is durably on the stream, 200 with the existing job if a duplicate."""
    # A request that passes every check is normally answered by eventflow_ingest.submit.LeanSubmit before it
    # gets here; this route serves the rest (and all of them with EVENTFLOW_INGEST__LEAN_SUBMIT=false).
    status, answer, location = await submit(request.app.state, job, tenant, idempotency_key)
    response.headers["Location"] = location
    response.status_code = status
    return answer


async def _load(functions: FunctionsDep, keys: KeysDep, job_id: str, tenant: str) -> JobView:
    if len(job_id) > 64:
        raise ApiError(404, "not_found", "no such job", "job_id")
    data = await functions.redis.hgetall(keys.job_state(job_id))
    # Another tenant's job answers 404 like a missing one, so ids reveal nothing across tenants.
    if not data or data.get("tenant") != tenant:
        raise ApiError(404, "not_found", f"no job {job_id}", "job_id")
    result = await functions.redis.hget(keys.result(data["request_hash"]), "json")
    return JobView.from_hash(job_id, data, result if data.get("state") == JobState.succeeded else None)


@jobs_router.get("/{job_id}", operation_id="get_ndvi_job", response_model=JobView,
                 responses={404: {"description": "No such job."}, **_ERRORS})
async def get_job(job_id: str, functions: FunctionsDep, keys: KeysDep, tenant: TenantDep) -> JobView:
    """State, attempts, timestamps, progress, and the result or error of one job."""
    return await _load(functions, keys, job_id, tenant)


@jobs_router.delete("/{job_id}", operation_id="cancel_ndvi_job", response_model=JobView,
                    responses={404: {"description": "No such job."}, 409: {"description": "Already finished."},
                               **_ERRORS})
async def cancel_job(job_id: str, functions: FunctionsDep, keys: KeysDep, tenant: TenantDep) -> JobView:
    """Cancel a queued or running job; consumers skip it or stop it."""
    await _load(functions, keys, job_id, tenant)
    state = await functions.cancel_job(job_id)
    if state != JobState.cancelled:
        raise ApiError(409, "already_finished", f"job is {state}", "job_id")
    return await _load(functions, keys, job_id, tenant)


@health_router.get("/healthz", operation_id="healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok", "version": __version__}


@health_router.get("/readyz", operation_id="readyz", responses={503: {"description": "Not ready."}})
async def readyz(request: Request, settings: SettingsDep, keys: KeysDep) -> JSONResponse:
    """Redis reachable, library and epoch present, group present, persistence acceptable."""
    redis = request.app.state.redis
    checks: dict[str, Any] = {}
    try:
        checks["epoch"] = await check_ready(redis, keys)
        groups = await redis.xinfo_groups(keys.job_stream)
        checks["group"] = any(g["name"] == keys.group for g in groups)
        facts = await server_facts(redis, keys)
        checks["aof"] = facts.aof_enabled
        ok = checks["group"] and (facts.aof_enabled or not settings.redis.require_aof)
        if not ok:
            checks["reason"] = "consumer group missing" if not checks["group"] else "appendonly is off"
    except (RedisError, EventflowError, OSError) as exc:
        ok = False
        checks["reason"] = str(exc)
    return JSONResponse({"ready": ok, **checks}, 200 if ok else 503)


@health_router.get("/metrics", operation_id="metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus exposition."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
