"""Typed wrappers, one per function in eventflow.lua: the only place that calls FCALL or XACK.

Each wrapper builds its KEYS with :class:`eventflow.keys.Keys` and turns the reply (or a coded error)
into a Python value or exception, so callers never parse Redis replies.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from eventflow.contract import now_ms
from eventflow.errors import EpochMismatch, LibraryMismatch, LostLease
from eventflow.keys import Keys

LIBRARY_NAME = "eventflow"


def library_source() -> str:
    """The Lua source of the Function library."""
    return resources.files("eventflow.redis").joinpath("eventflow.lua").read_text()


def library_version(source: str | None = None) -> str:
    """LIBRARY_VERSION declared in the Lua source."""
    match = re.search(r"^local LIBRARY_VERSION = '([^']+)'", source or library_source(), re.M)
    if match is None:  # pragma: no cover - guarded by a unit test
        raise RuntimeError("eventflow.lua declares no LIBRARY_VERSION")
    return match.group(1)


class Backpressure(Exception):
    """The backlog is at its bound; nothing was written."""

    def __init__(self, backlog: int) -> None:
        super().__init__(f"backlog {backlog} at or above the bound")
        self.backlog = backlog


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused for a different request."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Idempotency-Key already used for job {job_id} with another request")
        self.job_id = job_id


class NotOwner(Exception):
    """The entry is pending for another consumer: this caller must not ack or dead-letter it."""


class Fenced(LostLease):
    """A newer attempt holds a higher fencing token; the caller's result is refused."""


class GroupMissing(Exception):
    """The job stream or its consumer group does not exist (not bootstrapped, or deleted)."""


def _code(exc: ResponseError) -> str:
    return str(exc).split(" ", 1)[0]


#: Error codes with which the lease / ownership Functions refuse a caller, and what they raise here.
_REFUSALS: dict[str, type[Exception]] = {"LEASELOST": LostLease, "FENCED": Fenced, "NOTOWNER": NotOwner}


def _refusal(exc: ResponseError) -> Exception:
    """The typed exception for a lease or ownership refusal (LostLease, Fenced, NotOwner), else ``exc``."""
    refused = _REFUSALS.get(_code(exc))
    return refused(str(exc)) if refused else exc


@dataclass(frozen=True, slots=True)
class Submitted:
    """Result of :func:`submit_job`."""

    job_id: str
    created: bool
    entry_id: str


@dataclass(frozen=True, slots=True)
class CommitAck:
    """Result of :meth:`Functions.commit_and_ack`."""

    outcome: str  #: "committed", "exists" or "cancelled"
    acked: bool  #: the entry was acked by this call
    owner: str | None  #: set when the entry is pending for another consumer (not acked)


class CallBatcher:
    """Sends the FCALLs issued in one event-loop turn as one pipeline: one round trip and one socket write
    for, e.g., the leases of a whole XREADGROUP batch instead of one per job.

    Each call stays its own FCALL, so its atomicity, its KEYS and its reply are exactly those of a lone
    call: one job's refused commit or NOTOWNER answer is delivered to that job's caller only. Nothing is
    delayed to wait for company: a call is sent on the next loop turn, with whatever else was issued
    meanwhile. A connection error fails every call of that pipeline, as it would have failed each alone.
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.queue: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self.sending: set[asyncio.Task[None]] = set()

    async def call(self, args: list[Any]) -> Any:
        """Queue one FCALL (its full argument list) and wait for its reply."""
        loop = asyncio.get_running_loop()
        if not self.queue:
            loop.call_soon(self._flush)
        future: asyncio.Future[Any] = loop.create_future()
        self.queue.append((args, future))
        return await future

    def _flush(self) -> None:
        batch, self.queue = self.queue, []
        task = asyncio.ensure_future(self._send(batch))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:  # a lone call (a quiet stream): skip the pipeline's own overhead
                try:
                    replies = [await self.redis.fcall(*batch[0][0])]
                except ResponseError as exc:
                    replies = [exc]
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for args, _ in batch:
                        pipe.fcall(*args)
                    replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller was cancelled; the call was still sent, as a lone one would be
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


class Functions:
    """The Function library bound to one connection and one key layout.

    With ``batch=True`` calls go through a :class:`CallBatcher` (the consumer's hot path); otherwise each
    is its own round trip.
    """

    def __init__(self, redis: Redis, keys: Keys, event_stream_maxlen: int = 100_000, *, batch: bool = False) -> None:
        self.redis = redis
        self.keys = keys
        self.event_cap = str(event_stream_maxlen)
        self.batcher = CallBatcher(redis) if batch else None

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        if self.batcher is not None:
            return await self.batcher.call([name, len(keys), *keys, *[str(a) for a in args]])
        return await self.redis.fcall(name, len(keys), *keys, *[str(a) for a in args])

    async def version(self) -> str | None:
        """The loaded library's version, or None if it is not loaded."""
        try:
            reply = await self.redis.fcall_ro("eventflow_version", 0)
        except ResponseError as exc:
            if "Function not found" in str(exc) or "function not found" in str(exc).lower():
                return None
            raise
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    async def check_version(self) -> str:
        """Raise LibraryMismatch unless the server runs exactly this code's library version."""
        expected = library_version()
        found = await self.version()
        if found != expected:
            raise LibraryMismatch(
                f"Redis Function library version {found!r} on the server, this code needs {expected!r}; "
                "run `eventflow bootstrap`"
            )
        return found

    async def submit_job(
        self,
        *,
        job_id: str,
        request_hash: str,
        tenant: str,
        entry_fields: dict[str, str],
        max_backlog: int,
        idempotency_key: str | None = None,
        dedupe_ttl_ms: int = 0,
    ) -> Submitted:
        """Idempotent admission (eventflow_submit_job)."""
        k = self.keys
        idem_key = k.idempotency(tenant, idempotency_key) if idempotency_key else k.idempotency(tenant, "-")
        flat: list[str] = []
        for name, value in entry_fields.items():
            flat += [name, value]
        try:
            reply = await self._call(
                "eventflow_submit_job",
                [k.job_stream, k.dedupe(request_hash), idem_key, k.job_state(job_id), k.event_stream, k.epoch],
                [k.group, max_backlog, "1" if idempotency_key else "0", job_id, request_hash, tenant,
                 now_ms(), self.event_cap, dedupe_ttl_ms, *flat],
            )
        except ResponseError as exc:
            code = _code(exc)
            if code == "BACKLOG":
                raise Backpressure(int(str(exc).split()[1])) from None
            if code == "IDEMCONFLICT":
                raise IdempotencyConflict(str(exc).split()[1]) from None
            if code == "EPOCH":
                raise EpochMismatch(str(exc)) from None
            if code == "NOGROUP":
                raise GroupMissing(str(exc)) from None
            raise
        return Submitted(job_id=_s(reply[0]), created=int(reply[1]) == 1, entry_id=_s(reply[2]))

    async def acquire_lease(
        self, request_hash: str, job_id: str, token: str, ttl_ms: int, event_fields: dict[str, str]
    ) -> int:
        """Take the lease: fencing token >= 1, 0 if held by another worker, -1 if the job is cancelled,
        -2 if its result is already committed."""
        k = self.keys
        reply = await self._call(
            "eventflow_acquire_lease",
            [k.lease(request_hash), k.fence(request_hash), k.job_state(job_id), k.event_stream,
             k.result(request_hash)],
            [token, ttl_ms, now_ms(), self.event_cap, *_flat(event_fields)],
        )
        return int(reply)

    async def renew_lease(self, request_hash: str, token: str, ttl_ms: int) -> bool:
        """Extend the lease; False means it was lost (stop the job, write nothing)."""
        return int(await self._call("eventflow_renew_lease", [self.keys.lease(request_hash)], [token, ttl_ms])) == 1

    async def release_lease(self, request_hash: str, token: str) -> bool:
        """Drop the lease if this token still holds it."""
        return int(await self._call("eventflow_release_lease", [self.keys.lease(request_hash)], [token])) == 1

    async def commit_result(
        self, request_hash: str, job_id: str, token: str, fence: int, result_json: str,
        event_fields: dict[str, str],
    ) -> str:
        """Commit the result: "committed", "exists" or "cancelled"; raises LostLease/Fenced."""
        k = self.keys
        try:
            reply = await self._call(
                "eventflow_commit_result",
                [k.result(request_hash), k.fence(request_hash), k.lease(request_hash), k.job_state(job_id),
                 k.event_stream],
                [token, fence, result_json, now_ms(), self.event_cap, *_flat(event_fields)],
            )
        except ResponseError as exc:
            raise _refusal(exc) from None
        return _s(reply)

    async def commit_and_ack(
        self, entry_id: str, consumer: str, request_hash: str, job_id: str, token: str, fence: int,
        result_json: str, event_fields: dict[str, str],
    ) -> CommitAck:
        """Commit, then (only if not refused) owner-checked ack and lease release, in one call
        (eventflow_commit_and_ack); raises LostLease/Fenced when the commit is refused (nothing acked)."""
        k = self.keys
        try:
            outcome, ack = await self._call(
                "eventflow_commit_and_ack",
                [k.result(request_hash), k.fence(request_hash), k.lease(request_hash), k.job_state(job_id),
                 k.event_stream, k.job_stream],
                [token, fence, result_json, now_ms(), self.event_cap, k.group, entry_id, consumer,
                 *_flat(event_fields)],
            )
        except ResponseError as exc:
            raise _refusal(exc) from None
        if isinstance(ack, int):
            return CommitAck(_s(outcome), ack == 1, None)
        return CommitAck(_s(outcome), False, _s(ack))

    async def ack_entry(self, entry_id: str, consumer: str, request_hash: str | None, token: str | None) -> bool:
        """Owner-checked ack (releasing the lease when a token is given); True if acked, False if it was no
        longer pending."""
        k = self.keys
        lease_key = k.lease(request_hash) if request_hash else k.job_stream
        try:
            reply = await self._call(
                "eventflow_ack_entry", [k.job_stream, lease_key], [k.group, entry_id, consumer, token or ""]
            )
        except ResponseError as exc:
            raise _refusal(exc) from None
        return int(reply) == 1

    async def schedule_retry(
        self, entry_id: str, job_id: str, failure_class: str, message: str, due_ms: int,
        event_fields: dict[str, str],
    ) -> int:
        """Record a transient failure and schedule the entry's retry; returns the entry's failure count."""
        k = self.keys
        reply = await self._call(
            "eventflow_schedule_retry",
            [k.failure(entry_id), k.job_state(job_id or "-"), k.event_stream, k.retry_schedule],
            [failure_class, message[:2000], now_ms(), self.event_cap, entry_id, due_ms, *_flat(event_fields)],
        )
        return int(reply)

    async def heartbeat_job(self, entry_id: str, consumer: str, request_hash: str, token: str, ttl_ms: int) -> int:
        """Renew the lease and reset the entry's idle time: 1 alive, 0 lease lost, -1 entry not ours."""
        k = self.keys
        return int(await self._call("eventflow_heartbeat_job", [k.job_stream, k.lease(request_hash)],
                                    [k.group, entry_id, consumer, token, ttl_ms]))

    async def reclaim_entry(self, entry_id: str, request_hash: str, target: str, min_idle_ms: int, *, force: bool,
                            max_deliveries: int) -> str:
        """Hand an entry to a live consumer (counts a delivery); see eventflow_reclaim_entry for replies."""
        k = self.keys
        return _s(await self._call(
            "eventflow_reclaim_entry",
            [k.job_stream, k.retry_schedule, k.dead_letter_stream, k.failure(entry_id), k.lease(request_hash or "-")],
            [k.group, entry_id, target, min_idle_ms, now_ms(), "1" if force else "0", max_deliveries]))

    async def dead_letter(
        self,
        entry_id: str,
        *,
        job_id: str = "",
        request_hash: str = "",
        consumer: str = "",
        failure_class: str = "",
        message: str = "",
        min_deliveries: int = 0,
    ) -> str | None:
        """Move a pending entry to the DLQ; returns the DLQ id, or None if it was not (or no longer) due."""
        k = self.keys
        try:
            reply = await self._call(
                "eventflow_dead_letter",
                [k.job_stream, k.dead_letter_stream, k.job_state(job_id or "-"), k.event_stream,
                 k.failure(entry_id), k.retry_schedule],
                [k.group, entry_id, consumer, failure_class, message[:2000], now_ms(), self.event_cap,
                 min_deliveries, job_id, request_hash],
            )
        except ResponseError as exc:
            raise _refusal(exc) from None
        dlq_id = _s(reply)
        return dlq_id or None

    async def report_progress(self, job_id: str, fraction: float, event_fields: dict[str, str]) -> str:
        """Record progress; returns the job state (e.g. "cancelled" tells the worker to stop)."""
        k = self.keys
        reply = await self._call(
            "eventflow_report_progress", [k.job_state(job_id), k.event_stream],
            [f"{fraction:.4f}", now_ms(), self.event_cap, *_flat(event_fields)],
        )
        return _s(reply)

    async def cancel_job(self, job_id: str) -> str:
        """Cancel a job; returns the resulting state, or "" if there is no such job.

        Also releases the request's dedupe key, so the same request can be submitted again.
        """
        k = self.keys
        # The hash names the dedupe key, which a Function must receive in KEYS; it never changes for a job,
        # and the Function checks it against the state hash.
        request_hash = _s(await self.redis.hget(k.job_state(job_id), "request_hash") or "")
        return _s(await self._call("eventflow_cancel_job",
                                   [k.job_state(job_id), k.event_stream, k.dedupe(request_hash or "-")],
                                   [now_ms(), self.event_cap, request_hash]))

    async def reap_consumer(self, consumer: str) -> bool:
        """Delete a consumer whose heartbeat is gone and whose pending list is empty."""
        k = self.keys
        reply = await self._call("eventflow_reap_consumer",
                                 [k.job_stream, k.heartbeat(consumer), k.consumer_registry], [k.group, consumer])
        return int(reply) == 1

    async def trim_stream(self, older_than_ms: int) -> tuple[int, str]:
        """Retention: delete acked entries older than the cutoff; returns (deleted, MINID used)."""
        k = self.keys
        reply = await self._call("eventflow_trim_stream", [k.job_stream], [f"{max(0, older_than_ms)}-0"])
        return int(reply[0]), _s(reply[1])

    async def replay_dead_letter(self, dlq_id: str, job_id: str, request_hash: str) -> tuple[str, str]:
        """Re-enqueue one DLQ record (same request hash); returns (outcome, detail)."""
        k = self.keys
        reply = await self._call(
            "eventflow_replay_dead_letter",
            [k.dead_letter_stream, k.job_stream, k.dlq_replayed, k.job_state(job_id or "-"), k.event_stream,
             k.result(request_hash or "-")],
            [dlq_id, now_ms(), self.event_cap])
        return _s(reply[0]), _s(reply[1])

    async def purge_dead_letter(self, dlq_id: str) -> bool:
        """Delete one DLQ record; True if it existed."""
        k = self.keys
        return int(await self._call("eventflow_purge_dead_letter", [k.dead_letter_stream, k.dlq_replayed],
                                    [dlq_id])) == 1

    async def consumer_heartbeat(self, consumer: str, ttl_ms: int, value: str) -> None:
        """Announce a live consumer: heartbeat key, registry entry, group membership."""
        k = self.keys
        await self._call("eventflow_consumer_heartbeat", [k.heartbeat(consumer), k.consumer_registry, k.job_stream],
                         [k.group, consumer, ttl_ms, now_ms(), value])

    async def breaker_allow(self, dependencies: tuple[str, ...], consumer: str,
                            probe_ttl_ms: int) -> BreakerDecision:
        """May this consumer start new work? ('go', 'probe' for exactly one job, or 'wait')."""
        reply = await self._call("eventflow_breaker_allow", [self.keys.breaker(d) for d in dependencies],
                                 [now_ms(), consumer, probe_ttl_ms])
        decision, wait_ms, *states = (_s(v) for v in reply)
        return BreakerDecision(decision, int(wait_ms), dict(zip(dependencies, states, strict=True)))

    async def breaker_record(self, dependency: str, outcome: str, *, consumer: str, threshold: int,
                             window_ms: int, open_ms: int, message: str = "") -> tuple[str, bool]:
        """Report a job's outcome for one dependency ('ok', 'fail', 'none'); returns (state, changed)."""
        state, changed = await self._call("eventflow_breaker_record", [self.keys.breaker(dependency)],
                                          [now_ms(), outcome, threshold, window_ms, open_ms, consumer,
                                           message[:500]])
        return _s(state), bool(int(changed))


@dataclass(frozen=True, slots=True)
class BreakerDecision:
    """eventflow_breaker_allow's answer: what to do, how long to wait, each dependency's state."""

    decision: str
    wait_ms: int
    states: dict[str, str]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flat(fields: dict[str, str]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        out += [name, str(value)]
    return out
