"""kopf handlers for the EventFlow custom resources; run with ``kopf run -m eventflow_operator.handlers``.

Handler ids are persisted in kopf's progress annotations: treat them as API. The logic lives in
ndvijob.py and replay.py; this module only maps kopf's events onto it.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from redis.exceptions import RedisError

from eventflow.errors import ConfigError, EpochMismatch, LibraryMismatch
from eventflow.redis.client import check_ready, server_facts
from eventflow.redis.functions import Backpressure, GroupMissing
from eventflow.settings import load_settings
from eventflow_operator import ndvijob, replay
from eventflow_operator.startup import GROUP, VERSION, OperatorContext, close_context, configure_kopf, open_context

log = logging.getLogger(__name__)

#: Redis unreachable or not (yet) able to take the call: worth retrying later.
RETRYABLE = (RedisError, OSError, EpochMismatch, GroupMissing, Backpressure)


def _context(memo: kopf.Memo) -> OperatorContext:
    return memo.eventflow  # type: ignore[no-any-return]


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Set kopf explicitly, load EventFlow settings and open Redis and the status writer into ``memo``."""
    configure_kopf(settings)
    try:
        eventflow_settings = load_settings()
    except ConfigError as exc:
        raise kopf.PermanentError(str(exc)) from None
    context = open_context(eventflow_settings)
    memo.eventflow = context
    try:
        epoch = await check_ready(context.redis, context.keys)
        facts = await server_facts(context.redis, context.keys)
        log.info("operator started: redis %s, aof %s, library %s, epoch %s", facts.redis_version,
                 facts.aof_enabled, facts.library_version, epoch)
    except LibraryMismatch as exc:
        # Submitting with another library version would write entries this code cannot vouch for.
        await close_context(context)
        raise kopf.PermanentError(str(exc)) from None
    except (RedisError, OSError, EpochMismatch) as exc:
        # Start anyway: deletions must keep working (bounded retries) while Redis is away, and
        # submissions retry until it is back.
        log.warning("operator started without Redis: %s", exc)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    """Close Redis and the status writer."""
    context = getattr(memo, "eventflow", None)
    if context is not None:
        await close_context(context)


# ------------------------------------------------------------------------------------------- NdviJob

@kopf.on.resume(GROUP, VERSION, ndvijob.PLURAL, id="submit", retries=None, timeout=None)
@kopf.on.create(GROUP, VERSION, ndvijob.PLURAL, id="submit", retries=None, timeout=None)
async def submit_ndvijob(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, namespace: str,
                         uid: str, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Validate the spec and put the job on the stream once; the job id derives from the uid."""
    if status.get("jobId") or status.get("phase") == "Failed":
        return  # submitted before (operator restart), or refused: the spec is immutable, so for good
    context = _context(memo)
    generation = meta.get("generation")
    try:
        request = ndvijob.parse_spec(spec)
        admitted = await ndvijob.submit(context, request, namespace=namespace, uid=uid,
                                        created=meta.get("creationTimestamp"))
    except ndvijob.SpecRefused as exc:
        patch.status.update(ndvijob.refused_status(exc, generation, status))
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        logger.info("ndvijob refused: %s", exc)
        return
    except RETRYABLE as exc:
        message = f"waiting to submit: {type(exc).__name__}: {exc}"
        patch.status.update(ndvijob.waiting_status(message, generation, status))
        # Submissions never give up: the object stays Pending, saying why, until Redis takes it.
        raise kopf.TemporaryError(message, delay=context.settings.operator.redis_retry_s) from exc
    own = ndvijob.job_id_for(uid, meta.get("creationTimestamp"))
    patch.status.update(ndvijob.submitted_status(admitted, own, generation, status))
    kopf.event(body, type="Normal", reason="Submitted", message=f"job {admitted.job_id} ({admitted.state.value})")
    logger.info("ndvijob submitted: job %s, created %s", admitted.job_id, admitted.created)


@kopf.daemon(GROUP, VERSION, ndvijob.PLURAL, id="mirror", cancellation_timeout=10)
async def mirror_ndvijob(stopped: kopf.DaemonStopped, name: str, namespace: str, status: kopf.Status,
                         memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Copy the Redis job state into .status every ``status_interval_s``, patching only on change.

    ``status`` is kopf's live view of the object, so the submission's jobId shows up here once written.
    Returns (for this operator run) when the job succeeded or was cancelled, or the spec was refused;
    failed and dead-lettered jobs are still watched, since a DlqReplay may queue them again.
    """
    context = _context(memo)
    interval_s = context.settings.operator.status_interval_s
    redis_down = False
    while not stopped:
        job_id = status.get("jobId")
        if not job_id and status.get("phase") == "Failed":
            return
        if job_id:
            try:
                view = await ndvijob.read_job(context, job_id)
            except (RedisError, OSError) as exc:
                if not redis_down:  # one line per outage, not one per interval
                    logger.warning("cannot read job %s from Redis: %s", job_id, exc)
                redis_down = True
            else:
                redis_down = False
                current = dict(status)
                desired = ndvijob.mirrored_status(view, job_id, current)
                delta = ndvijob.changed(desired, current)
                if delta and not await context.status.patch(ndvijob.PLURAL, namespace, name, delta):
                    return  # deleted meanwhile
                if desired.get("phase") in ndvijob.FINAL_PHASES:
                    return
        await stopped.wait(interval_s)


@kopf.on.delete(GROUP, VERSION, ndvijob.PLURAL, id="cancel", retries=None, timeout=None)
async def cancel_ndvijob(status: kopf.Status, meta: kopf.Meta, uid: str, memo: kopf.Memo, retry: int,
                         logger: kopf.Logger, **_: Any) -> None:
    """Cancel this object's job if it is queued or running (finished jobs are left as they are)."""
    if not status.get("jobId") and status.get("phase") == "Failed":
        return  # refused spec: nothing was submitted
    context = _context(memo)
    # Our own job id, not status.jobId: it also covers a crash between XADD and the status write, and it
    # never cancels another object's (or an HTTP client's) job this one merely duplicated.
    job_id = ndvijob.job_id_for(uid, meta.get("creationTimestamp"))
    attempts = context.settings.operator.redis_attempts
    try:
        state = await context.functions.cancel_job(job_id)
    except (RedisError, OSError) as exc:
        if retry + 1 < attempts:
            raise kopf.TemporaryError(f"cannot cancel job {job_id}: {exc}",
                                      delay=context.settings.operator.redis_retry_s) from exc
        # Give up and let the finalizer go: holding it until Redis returns would make the object (and
        # its namespace) undeletable. The job stays visible in Redis and can still be cancelled with
        # DELETE /v1/ndvi/jobs/{id}; a consumer may run it meanwhile.
        logger.error("job %s not cancelled: Redis unreachable after %d attempts (%s); deleting anyway",
                     job_id, attempts, exc)
        return
    logger.info("job %s on delete: %s", job_id, state or "no such job")


# ----------------------------------------------------------------------------------------- DlqReplay

@kopf.on.create(GROUP, VERSION, replay.PLURAL, id="replay", retries=None, timeout=None)
async def run_dlqreplay(spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, name: str, namespace: str,
                        patch: kopf.Patch, memo: kopf.Memo, retry: int, body: kopf.Body, logger: kopf.Logger,
                        **_: Any) -> None:
    """Replay the selected DLQ records once, like ``eventflow dlq replay``; resumes after a restart."""
    if status.get("phase") in replay.FINISHED_PHASES:
        return
    context = _context(memo)
    generation = meta.get("generation")
    try:
        final = await replay.run(context, namespace=namespace, name=name, spec=spec, status=status,
                                 generation=generation)
    except replay.ReplaySpecError as exc:
        patch.status.update({"phase": "Failed", "message": str(exc), "observedGeneration": generation})
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        return
    except replay.ReplayDeleted as exc:
        logger.info("dlqreplay stopped: %s", exc)
        return
    except (RedisError, OSError) as exc:
        attempts = context.settings.operator.redis_attempts
        if retry + 1 < attempts:
            raise kopf.TemporaryError(f"replay interrupted: {exc}", delay=context.settings.operator.redis_retry_s) \
                from exc
        message = f"Redis unreachable after {attempts} attempts: {exc}; records handled so far are in the counts"
        patch.status.update({"phase": "Failed", "message": message})
        kopf.warn(body, reason="ReplayFailed", message=message)
        return
    patch.status.update(final)
    kopf.event(body, type="Normal", reason="Completed", message=final["message"])
    logger.info("dlqreplay completed: %s", final["message"])
