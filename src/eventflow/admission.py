"""Admission of one NDVI job request: vet its inputs, hash it for its tenant, enqueue it idempotently.

The one path from a validated request to a stream entry, shared by ingest (``POST /v1/ndvi/jobs``) and
the operator (``NdviJob``), so both dedupe against each other and hit the same backlog bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from eventflow.contract import JobState, NdviJobRequest, StreamEntry, new_job_id, new_trace_id, now_ms
from eventflow.hashing import request_hash as hash_request
from eventflow.inputs import vet_href
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings

#: Names pydantic adds to an error location for the member of a union; the JSON has no such level.
_UNION_MEMBERS = frozenset({"MultibandInputs", "BandFileInputs"})


@dataclass(frozen=True, slots=True)
class Admitted:
    """Outcome of :func:`admit_job`."""

    job_id: str
    request_hash: str
    #: True when this call (or an earlier call with the same job id) put the entry on the stream;
    #: False when the request duplicates another job, whose id is ``job_id``.
    created: bool
    entry_id: str
    #: State of the job now: ``queued`` when created, the existing job's state for a duplicate.
    state: JobState


def field_path(loc: Iterable[Any], drop: Iterable[str] = ()) -> str:
    """A validation error location as the dotted JSON path a user wrote (``inputs.red.href``)."""
    skip = _UNION_MEMBERS | set(drop)
    return ".".join(str(p) for p in loc if str(p) not in skip)


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(field path, message) of the first problem, for answers that name one field."""
    errors = exc.errors()
    if not errors:
        return "", str(exc)
    message = str(errors[0].get("msg", "invalid")).removeprefix("Value error, ")  # pydantic's wrapper prefix
    return field_path(errors[0].get("loc", ())), message


def parse_request(data: Mapping[str, Any]) -> NdviJobRequest:
    """Validate a request body or NdviJob spec; raises pydantic's ValidationError (see :func:`first_error`)."""
    return NdviJobRequest.model_validate(dict(data))


async def admit_job(
    functions: Functions,
    settings: EventflowSettings,
    request: NdviJobRequest,
    tenant: str,
    *,
    idempotency_key: str | None = None,
    job_id: str | None = None,
    trace_id: str | None = None,
) -> Admitted:
    """Vet the inputs and enqueue the request through ``eventflow_submit_job`` (dedupe + backlog + XADD).

    Raises :class:`eventflow.inputs.InputRejected` (naming the field) for a disallowed input, and what
    :meth:`Functions.submit_job` raises: Backpressure, IdempotencyConflict, EpochMismatch, GroupMissing,
    or a Redis error. ``job_id`` lets a caller with a stable identity (the operator: the object's uid)
    make a repeated call recognise its own earlier entry instead of reporting a duplicate.
    """
    for field, href in request.hrefs():
        vet_href(field, href, settings.ndvi)
    payload = request.normalized()  # once: it is both hashed and carried (request.hash_for normalizes again)
    request_hash = hash_request(tenant, payload)
    entry = StreamEntry(job_id=job_id or new_job_id(), request_hash=request_hash, tenant=tenant,
                        enqueued_at_ms=now_ms(), trace_id=trace_id or new_trace_id(), payload=payload)
    submitted = await functions.submit_job(
        job_id=entry.job_id, request_hash=request_hash, tenant=tenant, entry_fields=entry.to_fields(),
        max_backlog=settings.ingest.max_backlog, idempotency_key=idempotency_key,
    )
    if submitted.created:
        state = JobState.queued
    else:
        raw = await functions.redis.hget(functions.keys.job_state(submitted.job_id), "state")
        state = JobState(raw) if raw else JobState.queued
    return Admitted(job_id=submitted.job_id, request_hash=request_hash, created=submitted.created,
                    entry_id=submitted.entry_id, state=state)
