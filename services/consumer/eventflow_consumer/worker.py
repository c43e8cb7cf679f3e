"""The consumer runtime: read with the group, lease + fence, execute off-loop, commit, then ack.

Order per delivery (docs/contract.md): decode (poison -> DLQ) -> result exists? ack -> acquire lease
and fencing token (cancelled? ack) -> execute in a child process (or thread, or on the loop for a handler
declared trivially short) while a heartbeat renews the lease and resets the entry's idle time -> commit,
owner-checked ack and lease release in one eventflow_commit_and_ack call.
Function calls go through a CallBatcher: the calls that the jobs of one XREADGROUP batch issue in the
same loop turn (their leases, later their commits) share one pipeline round trip; each stays its own
atomic call with its own answer.
A transient failure is recorded and scheduled for a delayed retry (exponential backoff with jitter);
the entry stays pending and the reaper re-delivers it when due, counting a delivery toward the ceiling.
A permanent failure goes straight to the dead-letter stream with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from eventflow.contract import StreamEntry, now_ms
from eventflow.errors import DEPENDENCIES, LostLease, PoisonMessage
from eventflow.metrics import BREAKER_LEVEL, ConsumerMetrics
from eventflow.redis.client import EXIT_WIPED, check_ready, epoch_problem, functions_for, keys_for
from eventflow.redis.functions import BreakerDecision, CommitAck, NotOwner
from eventflow.settings import EventflowSettings
from eventflow_consumer.execution import (
    JobFailed,
    JobSpec,
    resolve_handler,
    run_in_process,
    run_in_thread,
    run_on_loop,
)
from eventflow_consumer.handlers import Handler, Stopped, runs_on_event_loop

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LeaseHeld:
    """When a job's lease was last known to be held (monotonic seconds): set when it is taken, moved on by
    every successful renewal; shared by the job and its renewal task."""

    confirmed_at: float


def default_name() -> str:
    """hostname-pid-random: unique per process, so a restarted pod never inherits a zombie's entries."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """One consumer process: a group member with ``concurrency`` jobs in flight."""

    def __init__(self, settings: EventflowSettings, redis: Redis, handlers: dict[Any, Handler] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.cfg = settings.consumer
        self.redis = redis
        self.keys = keys_for(settings)
        self.functions = functions_for(redis, settings, batch=True)
        # Handlers given here run in a thread (tests, benchmarks); the registry's run per isolation setting;
        # either runs on the loop if declared `on_event_loop`.
        self.inline_handlers: dict[Any, Handler] = dict(handlers or {})
        self.resolved: dict[Any, Handler | None] = {}  # job type -> registry/settings handler, imported once
        self.name = self.cfg.name or default_name()
        self.metrics = ConsumerMetrics(registry or CollectorRegistry())
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="job")
        self.stopping = asyncio.Event()
        self.closed = asyncio.Event()  # set after the drain: ends the consumer heartbeat
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.stops: dict[str, asyncio.Event] = {}
        self.slot_waiter: asyncio.Future[None] | None = None  # resolved when a job ends (the read loop waits)
        self.background: set[asyncio.Future[None]] = set()
        # Entries that failed transiently here: entry id -> delivery count at the time. They are left
        # for the reaper; picked up again only once it re-delivers them (count grows).
        self.parked: dict[str, int] = {}
        # Circuit breakers (state in Redis, shared by all consumers): `dirty` once this consumer has seen a
        # failure counted or a breaker not closed, so its successes are reported (they reset the count);
        # with a clean view successes cost no round trip. A granted probe is spent on the next job started.
        self.breaker_dirty = False
        self.probe_armed = False
        self.probe_entry: str | None = None
        self.gated = False
        self.processed = 0
        self.epoch = ""
        self.exit_code = 0

    def _ctx(self, entry_id: str, entry: StreamEntry | None = None, attempt: int | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {"entry_id": entry_id, "consumer": self.name}
        if entry is not None:
            extra.update(job_id=entry.job_id, request_hash=entry.request_hash, trace_id=entry.trace_id)
        if attempt is not None:
            extra["attempt"] = attempt
        return extra

    def _abandon(self, reason: str) -> None:
        """Redis is not the data set this consumer started on: stop every job without writing, exit 3."""
        if self.exit_code != EXIT_WIPED:
            log.error("not ready: %s; stopping in-flight jobs without writing", reason, extra={"consumer": self.name})
        self.exit_code = EXIT_WIPED
        for event in self.stops.values():
            event.set()
        self.stop()

    def stop(self) -> None:
        """Stop pulling new work; in-flight jobs drain (called from the SIGTERM handler)."""
        if not self.stopping.is_set():
            log.info("stop requested: no new reads, draining %d in-flight job(s)", len(self.in_flight),
                     extra={"consumer": self.name})
            self.stopping.set()

    async def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self.epoch = await check_ready(self.redis, self.keys)
        await self._heartbeat_once()
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        log.info("consumer started", extra={"consumer": self.name})
        try:
            await self._read_loop()
        finally:
            await self._drain()
            self.closed.set()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            with contextlib.suppress(RedisError):
                await self.redis.delete(self.keys.heartbeat(self.name))
            self.pool.shutdown(wait=False, cancel_futures=True)
            log.info("consumer stopped after %d job(s)", self.processed, extra={"consumer": self.name})
        return self.exit_code

    async def _heartbeat_once(self) -> None:
        if self.epoch and (problem := await epoch_problem(self.redis, self.keys, self.epoch)):
            self._abandon(problem)
            return
        value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "at": time.time()})
        await self.functions.consumer_heartbeat(self.name, self.cfg.heartbeat_ttl_ms, value)
        self.metrics.heartbeat.set(time.time())

    async def _heartbeat_loop(self) -> None:
        while not await _wait_or_timeout(self.closed, self.cfg.heartbeat_interval_ms / 1000):
            try:
                await self._heartbeat_once()
            except RedisError as exc:
                _reraise_cancel(exc)
                log.warning("heartbeat failed: %s", exc, extra={"consumer": self.name})

    async def _read_loop(self) -> None:
        next_rescan = 0.0
        stop_wait = asyncio.create_task(self.stopping.wait())
        # The breakers' "go" from the check after the last read, when nothing has waited since: the next
        # read is gated on it instead of on a second, back-to-back check (one round trip per read, not two).
        fresh: BreakerDecision | None = None
        try:
            while not self.stopping.is_set():
                free = self.cfg.concurrency - len(self.in_flight)
                if free <= 0:
                    fresh = None
                    # One future for "a slot freed", not a wait on every in-flight task (O(concurrency) per wake).
                    self.slot_waiter = asyncio.get_running_loop().create_future()
                    await asyncio.wait([stop_wait, self.slot_waiter], return_when=asyncio.FIRST_COMPLETED)
                    continue
                free, fresh = await self._gate(free, fresh), None
                if free <= 0:
                    continue
                if time.monotonic() >= next_rescan and not self.probe_armed:
                    more = await self._take_own_pending(free)
                    # Assigned entries beyond the free slots go first once a slot frees, not a period later.
                    next_rescan = 0.0 if more else time.monotonic() + self.cfg.pending_rescan_s
                    continue
                read = asyncio.create_task(self.redis.xreadgroup(
                    self.keys.group, self.name, {self.keys.job_stream: ">"},
                    count=min(free, self.cfg.batch_size), block=self.cfg.block_ms))
                # Race the blocking read against the stop signal so SIGTERM stops reading at once.
                await asyncio.wait([read, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    with contextlib.suppress(asyncio.CancelledError, RedisError):
                        await read
                    break
                try:
                    reply = read.result()
                except RedisError as exc:
                    log.warning("read failed: %s", exc, extra={"consumer": self.name})
                    await asyncio.sleep(0.5)
                    continue
                if reply and not self.probe_armed:
                    fresh = await self._may_start()
                    if fresh is not None and fresh.decision != "go":
                        # A breaker opened while this read was blocked: leave what it delivered pending here
                        # (no delivery burnt by a doomed run); the own-pending scan starts it once it closes.
                        next_rescan, fresh = 0.0, None
                        continue
                for _stream, entries in reply or []:
                    for entry_id, fields in entries:
                        self._spawn(entry_id, fields)
                if self.probe_armed:  # nothing to probe with: hand the probe back at once
                    self.probe_armed = False
                    await self._report_dependencies("", None, "none", probe=True)
        finally:
            stop_wait.cancel()

    async def _take_own_pending(self, free: int) -> bool:
        """Start entries pending for this consumer that nothing here is running (reaper-assigned).

        Returns True when runnable entries were left over for lack of free slots.
        """
        try:
            rows = await self.redis.xpending_range(self.keys.job_stream, self.keys.group, min="-", max="+",
                                                   count=100, consumername=self.name)
        except RedisError as exc:
            log.warning("pending scan failed: %s", exc, extra={"consumer": self.name})
            return False
        for row in rows:
            entry_id, deliveries = row["message_id"], int(row["times_delivered"])
            if entry_id in self.in_flight or self.parked.get(entry_id, -1) >= deliveries:
                continue
            if free <= 0:
                return True
            self.parked.pop(entry_id, None)
            found = await self.redis.xrange(self.keys.job_stream, entry_id, entry_id)
            if not found:
                # Deleted while pending: the reaper records it as lost work; nothing to run here.
                continue
            self._spawn(entry_id, found[0][1])
            free -= 1
        return False

    def _spawn(self, entry_id: str, fields: dict[str, str]) -> None:
        if self.probe_armed:
            self.probe_armed, self.probe_entry = False, entry_id
        task = asyncio.create_task(self._process(entry_id, fields), name=f"job-{entry_id}")
        self.in_flight[entry_id] = task
        self.metrics.in_flight.set(len(self.in_flight))

        def done(_: asyncio.Task[None]) -> None:
            self.in_flight.pop(entry_id, None)
            self.metrics.in_flight.set(len(self.in_flight))
            if self.slot_waiter is not None and not self.slot_waiter.done():
                self.slot_waiter.set_result(None)

        task.add_done_callback(done)

    async def _process(self, entry_id: str, fields: dict[str, str]) -> None:
        try:
            await self._execute(entry_id, fields)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never let one job kill the process; the entry stays pending and the reaper sees it.
            log.exception("unexpected error; entry left pending", extra=self._ctx(entry_id))
        finally:
            self.processed += 1

    async def _execute(self, entry_id: str, fields: dict[str, str]) -> None:
        f = self.functions
        try:
            entry = StreamEntry.from_fields(fields)
        except PoisonMessage as exc:
            log.error("poison message: %s", exc, extra=self._ctx(entry_id))
            await f.dead_letter(entry_id, job_id=fields.get("job_id", "")[:64],
                                request_hash=fields.get("request_hash", "")[:64], consumer=self.name,
                                failure_class=exc.failure_class, message=str(exc))
            self.metrics.jobs.labels(outcome="dead_lettered").inc()
            return
        token = uuid.uuid4().hex
        event = {"job_id": entry.job_id, "request_hash": entry.request_hash, "entry_id": entry_id,
                 "consumer": self.name, "trace_id": entry.trace_id}
        fence = await f.acquire_lease(entry.request_hash, entry.job_id, token, self.cfg.lease_ttl_ms, event)
        if fence == -2:
            # Committed by an earlier delivery (e.g. killed between commit and ack): ack, don't re-run.
            await self._ack(entry_id, entry, None)
            log.info("result already committed; acked without re-running", extra=self._ctx(entry_id, entry))
            return
        if fence == -1:
            await self._ack(entry_id, entry, None)
            self.metrics.jobs.labels(outcome="cancelled").inc()
            log.info("job cancelled; acked without running", extra=self._ctx(entry_id, entry))
            return
        if fence == 0:
            # Another live worker runs this request hash (a duplicate delivery): retry later, by which time
            # that worker has committed and the redelivery finds the result and acks.
            await self._retry_later(entry_id, entry, "lease_busy", "another worker holds the lease", event,
                                    self._ctx(entry_id, entry))
            log.info("lease held by another worker; entry left pending", extra=self._ctx(entry_id, entry))
            return
        await self._run_leased(entry_id, entry, fields, token, fence, event)

    async def _failpoint(self, point: str) -> None:
        """Fault injection for the fault tests (settings.consumer.failpoints); a no-op in production."""
        action = self.cfg.failpoints.get(point)
        if not action:
            return
        log.warning("failpoint %s: %s", point, action, extra={"consumer": self.name})
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action.startswith("sleep:"):
            await asyncio.sleep(float(action.split(":", 1)[1]))

    def _handler(self, job_type: Any) -> Handler | None:
        """The handler this process would run for the job type (given here, else the settings' override or
        the registry's, imported once); None if it cannot be imported here (a child reports the error)."""
        if job_type in self.inline_handlers:
            return self.inline_handlers[job_type]
        if job_type not in self.resolved:
            try:
                self.resolved[job_type] = resolve_handler(job_type.value, self.cfg.handlers.get(job_type.value))
            except Exception:  # e.g. an override only the job's child can import: the child reports it
                self.resolved[job_type] = None
        return self.resolved[job_type]

    async def _run_leased(self, entry_id: str, entry: StreamEntry, fields: dict[str, str], token: str,
                          fence: int, event: dict[str, str]) -> None:
        f = self.functions
        ctx_log = self._ctx(entry_id, entry, fence)
        stop = asyncio.Event()
        self.stops[entry_id] = stop
        lost = asyncio.Event()
        finished = asyncio.Event()
        started = time.perf_counter()
        # The heartbeat starts once the job has run for one heartbeat interval: most jobs of a busy stream
        # end sooner, and a timer per job costs far less than a renewal task per job.
        renewals: list[asyncio.Task[None]] = []
        held = LeaseHeld(time.monotonic())

        def start_renewal() -> None:
            renewals.append(asyncio.create_task(self._renew(entry_id, entry, token, stop, lost, finished, held)))

        timer = asyncio.get_running_loop().call_later(self.cfg.heartbeat_interval_ms / 1000, start_renewal)
        released = False
        try:
            await self._failpoint("before_execute")

            def progress(fraction: float) -> None:
                task = asyncio.ensure_future(self._progress(entry, fraction, event, stop))
                self.background.add(task)
                task.add_done_callback(self.background.discard)

            log.info("job started", extra=ctx_log)
            handler = self._handler(entry.job_type)
            output_dir = self.settings.ndvi.output_root / entry.tenant / entry.request_hash
            if handler is not None and runs_on_event_loop(handler):
                result = run_on_loop(handler, entry, self.settings.ndvi, output_dir, fence, progress, stop)
            elif self.cfg.isolation == "process" and entry.job_type not in self.inline_handlers:
                spec = JobSpec(fields=fields, handler_ref=self.cfg.handlers.get(entry.job_type.value),
                               ndvi=self.settings.ndvi.model_dump(mode="json"), output_dir=str(output_dir),
                               fence=fence, memory_bytes=self.cfg.job_memory_mb * 1024 * 1024)
                result = await run_in_process(spec, progress, self.cfg.job_timeout_s, stop)
            elif handler is None:  # a handler override this process cannot import: a deployment error
                raise JobFailed("handler_unavailable", False, f"no importable handler for {entry.job_type.value}")
            else:
                result = await run_in_thread(self.pool, handler, entry, self.settings.ndvi, output_dir, fence,
                                             progress, self.cfg.job_timeout_s, stop)
            if lost.is_set():
                raise LostLease("lease lost during execution")
            result["fence"] = fence
            await self._failpoint("before_commit")
            if time.monotonic() - held.confirmed_at > self.cfg.heartbeat_interval_ms / 1000:
                # Renewals fell behind (the process was paused, or the loop blocked): confirm the lease before
                # committing, so a zombie fences itself here rather than leaning on the commit's fence alone.
                if reason := await self._renew_once(entry_id, entry, token, held):
                    log.error("stopping job: %s", reason, extra=ctx_log)
                    lost.set()
                    raise LostLease(reason)
            result_json = json.dumps(result)
            # Commit and ack run shielded: a shutdown must not cut them in half.
            if "after_commit" in self.cfg.failpoints:
                # Two calls, so the fault tests can die in between (the one-call path has no such gap;
                # the recovery it tests still matters for a reply lost after a commit).
                outcome = await asyncio.shield(f.commit_result(
                    entry.request_hash, entry.job_id, token, fence, result_json, event))
                await self._failpoint("after_commit")
                released = await asyncio.shield(self._ack(entry_id, entry, token))  # an ack with a token releases
            else:
                done = await asyncio.shield(f.commit_and_ack(
                    entry_id, self.name, entry.request_hash, entry.job_id, token, fence, result_json, event))
                self._acked(entry_id, entry, done)
                outcome, released = done.outcome, True  # the call released the lease if still ours
            label = {"committed": "succeeded", "exists": "duplicate"}.get(outcome, outcome)
            self.metrics.jobs.labels(outcome=label).inc()
            await self._report_dependencies(entry_id, None, "ok")
            self.metrics.duration.observe(time.perf_counter() - started)
            if outcome == "exists":
                log.warning("another attempt already committed this request; nothing written", extra=ctx_log)
            else:
                log.info("job %s in %.3fs", label, time.perf_counter() - started, extra=ctx_log)
        except JobFailed as exc:
            self.metrics.failures.labels(failure_class=exc.failure_class).inc()
            dependency = exc.failure_class.removesuffix("_unavailable")
            if dependency in DEPENDENCIES:
                await self._report_dependencies(entry_id, dependency, "fail", str(exc))
            else:  # a permanent failure means the stores answered; a transient one proves nothing
                await self._report_dependencies(entry_id, None, "ok" if exc.permanent else "none")
            if exc.permanent:
                log.error("job failed permanently (%s): %s", exc.failure_class, exc, extra=ctx_log)
                await f.dead_letter(entry_id, job_id=entry.job_id, request_hash=entry.request_hash,
                                    consumer=self.name, failure_class=exc.failure_class, message=str(exc))
                self.metrics.jobs.labels(outcome="dead_lettered").inc()
            else:
                await self._retry_later(entry_id, entry, exc.failure_class, str(exc), event, ctx_log)
        except (LostLease, Stopped) as exc:
            log.warning("job stopped without writing: %s", exc, extra=ctx_log)
            await self._report_dependencies(entry_id, None, "none")
            await self._park(entry_id)
        except asyncio.CancelledError:
            stop.set()
            log.warning("job interrupted by shutdown; left pending for another consumer", extra=ctx_log)
            raise
        finally:
            finished.set()  # ends the renew loop even if a cancel gets swallowed inside the Redis client
            timer.cancel()
            for renewal in renewals:
                renewal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewal
            self.stops.pop(entry_id, None)
            if not released:
                with contextlib.suppress(RedisError):
                    await asyncio.shield(f.release_lease(entry.request_hash, token))

    async def _gate(self, free: int, fresh: BreakerDecision | None = None) -> int:
        """How many jobs may start now: `free` (breakers closed), 1 (a probe), or 0 after waiting (open).

        `fresh` is a "go" decided just now (no wait since): used instead of asking again.
        """
        if self.cfg.breaker_threshold == 0:
            return free
        if fresh is not None and fresh.decision == "go":
            d = fresh
        else:
            try:
                d = await self.functions.breaker_allow(DEPENDENCIES, self.name, self.cfg.breaker_probe_ttl_ms)
            except RedisError:
                return free  # the read that follows fails the same way and is handled there
        for dependency, state in d.states.items():
            self.metrics.breaker_state.labels(dependency).set(BREAKER_LEVEL.get(state, 0))
        if any(state != "closed" for state in d.states.values()):
            self.breaker_dirty = True
        if d.decision == "go":
            if self.gated:
                log.info("circuit breakers closed: pulling work again", extra={"consumer": self.name})
                self.gated = False
            return free
        if d.decision == "probe" and self.probe_entry is None:
            log.warning("circuit breaker half-open: one probe job tests %s", d.states, extra={"consumer": self.name})
            self.probe_armed = True
            return 1
        wait_ms = d.wait_ms
        if d.decision == "probe":  # our probe job is still running: nothing else starts meanwhile
            wait_ms = 200
        elif not self.gated:
            log.warning("circuit breaker open (%s): not pulling work; next check in %.1fs", d.states,
                        d.wait_ms / 1000, extra={"consumer": self.name})
            self.gated = True
        if "half_open" in d.states.values():
            # Another consumer's probe decides: look again soon, so this one resumes within 0.2 s of the
            # breaker closing instead of up to a second later (while the prober alone drains the backlog).
            wait_ms = min(wait_ms, 200)
        seconds = min(wait_ms / 1000, 1.0)
        await _wait_or_timeout(self.stopping, seconds)
        self.metrics.breaker_waits.inc(seconds)
        return 0

    async def _may_start(self) -> BreakerDecision | None:
        """After a read: the breakers' decision (work may start if it is "go"); None if there are no breakers
        or Redis did not answer (the jobs' own calls then fail the same way)."""
        if self.cfg.breaker_threshold == 0:
            return None
        try:
            return await self.functions.breaker_allow(DEPENDENCIES, self.name, self.cfg.breaker_probe_ttl_ms)
        except RedisError:
            return None

    async def _report_dependencies(self, entry_id: str, failed: str | None, verdict: str, message: str = "",
                                   probe: bool = False) -> None:
        """Tell the shared breakers what a job saw: `failed` names the dependency that failed it; otherwise
        `verdict` is 'ok' (the stores answered) or 'none' (the job proves nothing either way)."""
        if self.cfg.breaker_threshold == 0:
            return
        if entry_id and entry_id == self.probe_entry:
            probe, self.probe_entry = True, None
        if failed is None and not probe and (verdict == "none" or not self.breaker_dirty):
            return
        clean = True
        for dependency in DEPENDENCIES:
            outcome = verdict if failed is None else "fail" if dependency == failed else "none" if probe else ""
            if not outcome:
                continue
            try:
                state, changed = await self.functions.breaker_record(
                    dependency, outcome, consumer=self.name, threshold=self.cfg.breaker_threshold,
                    window_ms=self.cfg.breaker_window_ms, open_ms=self.cfg.breaker_open_ms, message=message)
            except RedisError as exc:
                log.warning("breaker report failed: %s", exc, extra={"consumer": self.name})
                return
            clean &= state == "closed"
            self.metrics.breaker_state.labels(dependency).set(BREAKER_LEVEL.get(state, 0))
            if changed and state == "open":
                self.metrics.breaker_opened.labels(dependency).inc()
                log.error("circuit breaker for %s opened: %s", dependency, message,
                          extra={"consumer": self.name, "entry_id": entry_id})
            elif changed:
                log.info("circuit breaker for %s is %s", dependency, state, extra={"consumer": self.name})
        self.breaker_dirty = not clean or failed is not None

    async def _retry_later(self, entry_id: str, entry: StreamEntry, failure_class: str, message: str,
                           event: dict[str, str], ctx_log: dict[str, Any]) -> None:
        """Schedule a delayed retry: full-jitter exponential backoff on the entry's delivery count."""
        deliveries = await self._park(entry_id)
        delay_ms = min(self.cfg.retry_max_ms, self.cfg.retry_base_ms * 2 ** max(0, deliveries - 1))
        delay_ms = int(delay_ms * random.uniform(0.5, 1.0))
        log.warning("job failed (%s): %s; retry in %.1fs", failure_class, message, delay_ms / 1000, extra=ctx_log)
        with contextlib.suppress(RedisError):
            await self.functions.schedule_retry(entry_id, entry.job_id, failure_class, message,
                                                now_ms() + delay_ms, event)

    async def _park(self, entry_id: str) -> int:
        """Leave the entry pending for the reaper; retake it only after a re-delivery (count grows).

        Returns the entry's current delivery count (0 if it is no longer pending for this consumer).
        """
        try:
            rows = await self.redis.xpending_range(self.keys.job_stream, self.keys.group, min=entry_id,
                                                   max=entry_id, count=1)
        except RedisError:
            rows = []
        if rows and rows[0]["consumer"] == self.name:
            self.parked[entry_id] = int(rows[0]["times_delivered"])
            return self.parked[entry_id]
        return 0

    async def _renew(self, entry_id: str, entry: StreamEntry, token: str, stop: asyncio.Event,
                     lost: asyncio.Event, finished: asyncio.Event, held: LeaseHeld) -> None:
        """Heartbeat the job; stop it before its lease could expire if renewal fails (self-fencing).

        Started one heartbeat interval after the lease was taken.
        """
        while not finished.is_set():
            if reason := await self._renew_once(entry_id, entry, token, held):
                log.error("stopping job: %s", reason, extra=self._ctx(entry_id, entry))
                lost.set()
                stop.set()
                return
            if await _wait_or_timeout(finished, self.cfg.heartbeat_interval_ms / 1000):
                return

    async def _renew_once(self, entry_id: str, entry: StreamEntry, token: str, held: LeaseHeld) -> str:
        """One heartbeat (lease renewal + idle reset); returns why the job must stop, or "" to carry on."""
        interval = self.cfg.heartbeat_interval_ms / 1000
        try:
            state = await self.functions.heartbeat_job(entry_id, self.name, entry.request_hash, token,
                                                       self.cfg.lease_ttl_ms)
        except RedisError as exc:
            _reraise_cancel(exc)
            # Unreachable Redis: keep trying while the lease surely still holds, then give up in time.
            if time.monotonic() - held.confirmed_at + 2 * interval < self.cfg.lease_ttl_ms / 1000:
                log.warning("heartbeat failed: %s", exc, extra={"job_id": entry.job_id})
                return ""
            return f"heartbeat failing for {time.monotonic() - held.confirmed_at:.1f}s"
        if state == 1:
            held.confirmed_at = time.monotonic()
            return ""
        return "lease lost" if state == 0 else "entry reclaimed by another consumer"

    async def _progress(self, entry: StreamEntry, fraction: float, event: dict[str, str],
                        stop: asyncio.Event) -> None:
        with contextlib.suppress(RedisError):
            state = await self.functions.report_progress(entry.job_id, fraction, event)
            if state == "cancelled":
                stop.set()

    def _acked(self, entry_id: str, entry: StreamEntry, done: CommitAck) -> None:
        """Book-keeping after eventflow_commit_and_ack (the entry is no longer parked here either way)."""
        if done.owner is not None:
            log.warning("ack refused, entry now owned elsewhere: NOTOWNER %s", done.owner,
                        extra=self._ctx(entry_id, entry))
        self.parked.pop(entry_id, None)

    async def _ack(self, entry_id: str, entry: StreamEntry, token: str | None) -> bool:
        """Owner-checked ack; True if acked (and, with a token, the lease released with it)."""
        acked = False
        try:
            acked = await self.functions.ack_entry(entry_id, self.name, entry.request_hash if token else None, token)
        except NotOwner as exc:
            log.warning("ack refused, entry now owned elsewhere: %s", exc, extra=self._ctx(entry_id, entry))
        self.parked.pop(entry_id, None)
        return acked

    async def _drain(self) -> None:
        if not self.in_flight:
            return
        tasks = list(self.in_flight.values())
        _done, pending = await asyncio.wait(tasks, timeout=self.cfg.drain_timeout_s)
        if pending:
            log.warning("drain timeout: %d job(s) handed back (left pending, leases released)", len(pending),
                        extra={"consumer": self.name})
            for event in self.stops.values():
                event.set()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def _wait_or_timeout(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event`; True if it is set.

    Loops that must end at shutdown check an event rather than rely on task cancellation alone: a cancel
    that lands while the Redis client is finishing a command can be absorbed by its connection handling.
    """
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


def _reraise_cancel(exc: BaseException) -> None:
    """Re-raise a cancellation that the Redis client turned into a connection error.

    Cancelling a task mid-command makes redis-py drop the connection, and the cancelled command can
    surface as ConnectionError instead of CancelledError; a retry loop that catches RedisError would then
    swallow the cancel and run forever (seen as a consumer that never exits after a SIGTERM drain).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


async def serve(settings: EventflowSettings, redis: Redis) -> int:
    """Run one consumer until SIGTERM/SIGINT; returns the exit code."""
    worker = Worker(settings, redis)
    if settings.metrics.enabled:
        from prometheus_client import start_http_server

        registry = CollectorRegistry()
        worker.metrics = ConsumerMetrics(registry)
        start_http_server(settings.metrics.port, settings.metrics.host, registry=registry)
    return await worker.run()


def run(settings: EventflowSettings) -> int:
    """Entry point used by ``eventflow consumer``: connect, serve until SIGTERM, close."""
    from eventflow.redis.client import run_with_redis

    return run_with_redis(settings, serve, fast_loop=True)
