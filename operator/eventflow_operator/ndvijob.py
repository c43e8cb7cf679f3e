"""NdviJob: validate the spec, submit it like ingest does, mirror the Redis job state into ``.status``.

Tenant: the object's namespace. Namespaces are where Kubernetes draws access boundaries (RBAC), so
anyone allowed to create NdviJobs in a namespace acts for that tenant and no further; a tenant named in
the spec or an annotation would let them submit (and dedupe against) any other tenant's jobs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from eventflow.admission import Admitted, admit_job, first_error, parse_request
from eventflow.contract import JobState, JobView, NdviJobRequest
from eventflow.inputs import InputRejected
from eventflow.redis.functions import IdempotencyConflict
from eventflow_operator.startup import OperatorContext

PLURAL = "ndvijobs"

#: Job state in Redis -> NdviJob phase.
PHASES: dict[JobState, str] = {
    JobState.queued: "Queued",
    JobState.running: "Running",
    JobState.retrying: "Retrying",
    JobState.succeeded: "Succeeded",
    JobState.failed: "Failed",
    JobState.dead_lettered: "DeadLettered",
    JobState.cancelled: "Cancelled",
}
TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "DeadLettered", "Cancelled"})
#: Finished for good: a replay never re-queues a job with a result, and a cancelled job is never retried.
#: (Failed and DeadLettered jobs come back as Queued when a DlqReplay replays them.)
FINAL_PHASES = frozenset({"Succeeded", "Cancelled"})
#: Scalar whole-scene statistics copied into status.result (the histogram and per-field rows stay in Redis).
SUMMARY_STATS = ("valid_count", "nodata_count", "masked_count", "mean", "median", "std", "min", "max",
                 "vegetation_fraction")


class SpecRefused(Exception):
    """The spec can never be submitted as it is; ``field`` is its path under ``spec``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"spec.{field}: {message}" if field else f"spec: {message}")
        self.field = field


def job_id_for(uid: str, created: str | None) -> str:
    """The job id of this object's submission: creation time (ms, as new_job_id) + a digest of the uid.

    Deterministic, so a submission repeated after an operator crash is recognised by
    ``eventflow_submit_job`` as its own earlier call (created, same entry) and never a second entry;
    and the delete handler can cancel the job even if the crash came before status.jobId was written.
    """
    ms = int(datetime.fromisoformat(created).timestamp() * 1000) if created else 0
    return f"j{ms:013x}{hashlib.sha256(uid.encode()).hexdigest()[:12]}"


def parse_spec(spec: Mapping[str, Any]) -> NdviJobRequest:
    """The spec as a job request, or SpecRefused naming the first bad field."""
    try:
        return parse_request(spec)
    except ValidationError as exc:
        field, message = first_error(exc)
        raise SpecRefused(field, message) from None


async def submit(context: OperatorContext, request: NdviJobRequest, *, namespace: str, uid: str,
                 created: str | None) -> Admitted:
    """Submit through the shared admission path; SpecRefused for what no retry can fix.

    Redis being unreachable, not bootstrapped or at its backlog bound propagates: the caller retries.
    """
    try:
        return await admit_job(context.functions, context.settings, request, namespace,
                               idempotency_key=f"k8s-uid:{uid}", job_id=job_id_for(uid, created))
    except InputRejected as exc:
        raise SpecRefused(exc.field, str(exc)) from None
    except IdempotencyConflict as exc:
        raise SpecRefused("", f"another request already used this object's uid (job {exc.job_id})") from None


def now_iso() -> str:
    """RFC 3339 UTC time, second precision (what Kubernetes writes)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[Mapping[str, Any]] | None, type_: str, status: str, reason: str,
                  message: str) -> list[dict[str, Any]]:
    """The condition list with one condition set; lastTransitionTime moves only when status changes."""
    out = [dict(c) for c in conditions or [] if c.get("type") != type_]
    old = next((c for c in conditions or [] if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    out.append({"type": type_, "status": status, "reason": reason, "message": message,
                "lastTransitionTime": since or now_iso()})
    return sorted(out, key=lambda c: str(c["type"]))


def submitted_status(admitted: Admitted, own_job_id: str, generation: int | None,
                     current: Mapping[str, Any]) -> dict[str, Any]:
    """Status after a successful submission (the mirror fills in the rest)."""
    if admitted.job_id == own_job_id:
        reason, message = "Enqueued", f"job {admitted.job_id} is on the job stream"
    else:
        # Same tenant, same request: the dedupe contract hands back the existing job. It is not ours,
        # so deleting this object must not cancel it (see the delete handler).
        reason, message = "Duplicate", (f"same request as existing job {admitted.job_id}; this NdviJob mirrors "
                                        "it and deleting it does not cancel it")
    return {
        "phase": PHASES[admitted.state],
        "message": message,
        "jobId": admitted.job_id,
        "requestHash": admitted.request_hash,
        "observedGeneration": generation,
        "conditions": set_condition(current.get("conditions"), "Submitted", "True", reason, message),
    }


def refused_status(refused: SpecRefused, generation: int | None, current: Mapping[str, Any]) -> dict[str, Any]:
    """Status of a spec that will never be submitted."""
    return {
        "phase": "Failed",
        "message": str(refused),
        "observedGeneration": generation,
        "conditions": set_condition(current.get("conditions"), "Submitted", "False", "InvalidSpec", str(refused)),
    }


def waiting_status(message: str, generation: int | None, current: Mapping[str, Any]) -> dict[str, Any]:
    """Status while the submission waits for Redis (unreachable, not bootstrapped, backlog full)."""
    return {
        "phase": "Pending",
        "message": message,
        "observedGeneration": generation,
        "conditions": set_condition(current.get("conditions"), "Submitted", "False", "Waiting", message),
    }


async def read_job(context: OperatorContext, job_id: str) -> JobView | None:
    """The job as ``GET /v1/ndvi/jobs/{id}`` shows it, or None if Redis has no such job."""
    data = await context.redis.hgetall(context.keys.job_state(job_id))
    if not data:
        return None
    result = None
    if data.get("state") == JobState.succeeded:
        result = await context.redis.hget(context.keys.result(data.get("request_hash", "")), "json")
    return JobView.from_hash(job_id, data, result)


def mirrored_status(view: JobView | None, job_id: str, current: Mapping[str, Any]) -> dict[str, Any]:
    """The status fields the mirror owns, as they should be for this job state."""
    if view is None:
        # Kept as it was: the job state may come back (Redis restarted from its AOF).
        message = f"job {job_id} not found in Redis (wiped, or not bootstrapped?)"
        return {"message": message,
                "conditions": set_condition(current.get("conditions"), "Finished", "Unknown", "JobNotFound",
                                            message)}
    phase = PHASES[view.state]
    error = {"class": str(view.error.get("class", "")), "message": str(view.error.get("message", ""))[:1000]} \
        if view.error else None
    result = None
    if view.state is JobState.succeeded and view.result:
        stats = view.result.get("stats") or {}
        result = {"outputs": view.result.get("outputs") or {},
                  "stats": {k: stats[k] for k in SUMMARY_STATS if k in stats}}
    if view.state is JobState.succeeded:
        mean = (result or {}).get("stats", {}).get("mean")
        message = "succeeded" + (f": NDVI mean {mean:.4f}" if isinstance(mean, int | float) else "")
    elif view.state is JobState.running:
        message = f"running (attempt {view.attempts}, {view.progress:.0%})"
    elif view.state is JobState.queued:
        message = "queued, waiting for a consumer"
    elif error is not None:
        message = f"{error['class']}: {error['message']}"[:1000]
        if view.state is JobState.retrying:
            message = f"attempt {view.attempts} failed ({message}); will be retried"
    else:
        message = view.state.value
    finished = phase in TERMINAL_PHASES
    return {
        "phase": phase,
        "message": message,
        "attempts": view.attempts,
        "progress": round(view.progress, 4),
        "result": result,
        "error": error,
        "conditions": set_condition(current.get("conditions"), "Finished", "True" if finished else "False",
                                    phase if finished else "InProgress", message),
    }


def changed(desired: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``desired`` that differ from ``current`` (None deletes a field in a merge patch)."""
    return {k: v for k, v in desired.items() if current.get(k) != v}
