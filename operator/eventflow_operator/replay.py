"""DlqReplay: the same selection and replay loop as ``eventflow dlq replay``, with progress in ``.status``.

Resumable: status.lastReplayedId and the outcome counts are written as the replay goes (at least every
``status_interval_s``, and before giving up or being cancelled). A replay restarted with the operator
selects the same records again, skips those up to lastReplayedId and carries on; a record handled after
the last write is answered "already" by the Redis function, so nothing is enqueued twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from eventflow.dlq import DlqFilter, DlqOutcome, parse_time_ms, process_dead_letters, select_dead_letters
from eventflow_operator.startup import OperatorContext

PLURAL = "dlqreplays"
FINISHED_PHASES = frozenset({"Completed", "Failed"})
#: Outcomes that leave a record where it is (counted in status.skipped).
SKIPPED = frozenset({"already", "succeeded", "missing", "no_payload"})

log = logging.getLogger(__name__)


class ReplaySpecError(ValueError):
    """The spec cannot be run; the message names the field."""


def filter_from_spec(spec: Mapping[str, Any]) -> DlqFilter:
    """The DLQ selection a DlqReplay spec describes."""
    bounds: dict[str, int | None] = {}
    for name in ("since", "until"):
        text = spec.get(name)
        try:
            bounds[name] = parse_time_ms(str(text)) if text else None
        except ValueError:
            raise ReplaySpecError(f"spec.{name}: {text!r} is not an RFC 3339 time") from None
    since, until = bounds["since"], bounds["until"]
    if since is not None and until is not None and since > until:
        raise ReplaySpecError("spec.since is after spec.until: the window selects nothing")
    return DlqFilter(failure_class=spec.get("failureClass") or None, job_id=spec.get("jobId") or None,
                     since_ms=since, until_ms=until, max_count=int(spec.get("maxCount") or 100))


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class ReplayDeleted(Exception):
    """The DlqReplay object was deleted while its replay ran: stop replaying (what was done stays done)."""


class Progress:
    """Counts of one replay, written to status at most every interval (and when flushed)."""

    def __init__(self, context: OperatorContext, namespace: str, name: str, status: Mapping[str, Any],
                 matched: int, dry_run: bool) -> None:
        self.context, self.namespace, self.name = context, namespace, name
        self.outcomes: dict[str, int] = {str(k): int(v) for k, v in (status.get("outcomes") or {}).items()}
        self.last_id: str = str(status.get("lastReplayedId") or "")
        self.matched, self.dry_run = matched, dry_run
        self.written_at = 0.0

    def record(self, done: DlqOutcome) -> None:
        """Count one handled record."""
        self.outcomes[done.outcome] = self.outcomes.get(done.outcome, 0) + 1
        self.last_id = done.dlq_id

    def fields(self) -> dict[str, Any]:
        """The status fields these counts make."""
        processed = sum(self.outcomes.values())
        return {"matched": self.matched, "processed": processed, "replayed": self.outcomes.get("replayed", 0),
                "skipped": sum(n for o, n in self.outcomes.items() if o in SKIPPED),
                "outcomes": dict(self.outcomes), "lastReplayedId": self.last_id or None}

    async def write(self, *, force: bool = False, **extra: Any) -> None:
        """Patch status now if forced or the interval has passed since the last write."""
        interval = self.context.settings.operator.status_interval_s
        if not force and time.monotonic() - self.written_at < interval:
            return
        if not await self.context.status.patch(PLURAL, self.namespace, self.name, {**self.fields(), **extra}):
            # Deleting the object is how a user stops a replay: noticed here, at most one interval late.
            raise ReplayDeleted(f"DlqReplay {self.namespace}/{self.name} was deleted: {self.summary()}")
        self.written_at = time.monotonic()

    def summary(self) -> str:
        """One line for status.message."""
        f = self.fields()
        if self.dry_run:
            return f"dry run: {f['processed']} of {f['matched']} matched records would be replayed"
        return f"replayed {f['replayed']} of {f['matched']} matched records ({f['skipped']} skipped)"


async def run(context: OperatorContext, *, namespace: str, name: str, spec: Mapping[str, Any],
              status: Mapping[str, Any], generation: int | None) -> dict[str, Any]:
    """Run (or resume) the replay; returns the final status. Redis errors propagate (the caller retries)."""
    which = filter_from_spec(spec)
    dry_run = bool(spec.get("dryRun", False))
    rate = float(spec.get("ratePerSecond") or 0)
    selected = await select_dead_letters(context.redis, context.keys, which)
    progress = Progress(context, namespace, name, status, len(selected), dry_run)
    if progress.last_id:
        # Resumed: records up to the last recorded one were handled (and counted) before the restart.
        last = _id_key(progress.last_id)
        selected = [(i, e) for i, e in selected if _id_key(i) > last]
    await progress.write(force=True, phase="Running", observedGeneration=generation,
                         message=f"{'dry run' if dry_run else 'replaying'}: {progress.matched} matched records")

    async def on_outcome(_: int, done: DlqOutcome) -> None:
        progress.record(done)
        await progress.write(message=progress.summary())

    try:
        await process_dead_letters(context.functions, selected, "replay", dry_run=dry_run, rate_per_s=rate,
                                   on_outcome=on_outcome)
    except ReplayDeleted:
        raise  # nowhere left to record progress
    except BaseException:
        # Interrupted (Redis gone, operator stopping): keep what was done, so a retry resumes after it.
        await asyncio.shield(_flush(progress))
        raise
    return {**progress.fields(), "phase": "Completed", "message": progress.summary(),
            "observedGeneration": generation}


async def _flush(progress: Progress) -> None:
    try:
        await progress.write(force=True, message=progress.summary())
    except Exception:  # the status write is best effort here; the original error matters more
        log.warning("could not record replay progress", exc_info=True)
