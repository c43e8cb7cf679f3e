"""The reaper cycle: dead-letter entries over the ceiling, hand idle ones to live consumers, remove dead
consumers, record lost work, export stream health.

Safe as two replicas: every state change is one server-side function that re-checks its precondition
(reclaiming checks idle time, retry schedule and ceiling; dead-lettering checks the entry is still
pending; consumer removal checks heartbeat and pending list), so two reapers racing at worst skip an
entry until the next cycle and never duplicate a DLQ record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from eventflow.contract import now_ms
from eventflow.errors import DEPENDENCIES
from eventflow.metrics import BREAKER_LEVEL, ReaperMetrics
from eventflow.redis.client import EXIT_WIPED, check_ready, epoch_problem, functions_for, keys_for
from eventflow.settings import EventflowSettings

log = logging.getLogger(__name__)


@dataclass
class CycleReport:
    """What one cycle did (returned for tests and logged at debug)."""

    dead_lettered: int = 0
    reclaimed: int = 0
    lost: int = 0
    consumers_removed: int = 0
    trimmed: int = 0
    held: int = 0


class Reaper:
    """The recovery controller bound to one Redis and one key layout."""

    def __init__(self, settings: EventflowSettings, redis: Redis, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.cfg = settings.reaper
        self.redis = redis
        self.keys = keys_for(settings)
        self.functions = functions_for(redis, settings)
        self.metrics = ReaperMetrics(registry or CollectorRegistry())
        self.stopping = asyncio.Event()
        self.lost_ids: list[str] = []

    async def live_consumers(self) -> list[str]:
        """Registered consumers whose heartbeat key exists."""
        names = list(await self.redis.zrange(self.keys.consumer_registry, 0, -1))
        if not names:
            return []
        alive = await self.redis.mget([self.keys.heartbeat(n) for n in names])
        return [n for n, hb in zip(names, alive, strict=True) if hb is not None]

    async def cycle(self) -> CycleReport:
        """One pass of recovery and health export."""
        report = CycleReport()
        k, ceiling = self.keys, self.settings.streams.max_deliveries
        live = await self.live_consumers()
        # Entries idle past the threshold (their owner stopped heartbeating), plus scheduled retries due.
        idle = await self.redis.xpending_range(k.job_stream, k.group, min="-", max="+", count=self.cfg.claim_batch,
                                               idle=self.cfg.min_idle_ms)
        due = await self.redis.zrangebyscore(k.retry_schedule, "-inf", now_ms(), start=0, num=self.cfg.claim_batch)
        candidates = {row["message_id"]: False for row in idle}
        candidates.update(dict.fromkeys(due, True))
        if await self._breakers_open():
            # Consumers pull nothing while a dependency's breaker is open; reclaiming or re-injecting now
            # would only burn deliveries toward the DLQ ceiling for work that never ran. Hold it.
            report.held = len(candidates)
            candidates = {}
        hashes = await self._request_hashes(list(candidates))
        for entry_id, is_due in candidates.items():
            target = random.choice(live) if live else ""
            if not target:
                # Nobody to hand work to; still enforce the ceiling so poison does not wait for consumers.
                outcome = "ceiling" if await self._at_ceiling(entry_id, ceiling) else "no_consumer"
            else:
                outcome = await self.functions.reclaim_entry(entry_id, hashes.get(entry_id, ""), target,
                                                             self.cfg.min_idle_ms, force=is_due, max_deliveries=ceiling)
            if outcome == "claimed":
                report.reclaimed += 1
            elif outcome == "ceiling":
                if await self._dead_letter(entry_id, ceiling):
                    report.dead_lettered += 1
            elif outcome == "lost":
                report.lost += 1
                self.lost_ids.append(entry_id)
                log.error("lost work: pending entry %s was deleted from the job stream; recorded on the "
                          "dead-letter stream with class 'lost'", entry_id, extra={"entry_id": entry_id})
        # Remove dead consumers, only when their pending list is empty (atomic in the function).
        consumers = {c["name"]: int(c["pending"]) for c in await self.redis.xinfo_consumers(k.job_stream, k.group)}
        for name in set(consumers) | set(await self.redis.zrange(k.consumer_registry, 0, -1)):
            if name not in live and consumers.get(name, 0) == 0 and await self.functions.reap_consumer(name):
                report.consumers_removed += 1
        report.trimmed, _ = await self.functions.trim_stream(now_ms() - self.cfg.retention_ms)
        await self.export(len(live))
        self.metrics.trimmed.inc(report.trimmed)
        self.metrics.reclaimed.inc(report.reclaimed)
        self.metrics.dead_lettered.inc(report.dead_lettered)
        self.metrics.lost.inc(report.lost)
        self.metrics.consumers_removed.inc(report.consumers_removed)
        now = time.time()
        self.metrics.heartbeat.set(now)
        await self.redis.set(k.reaper_heartbeat, str(now), px=int(self.cfg.interval_s * 3000) + 1000)
        return report

    async def _breakers_open(self) -> bool:
        """Export each dependency's breaker state; True if any is open (its cool-down not over)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for dependency in DEPENDENCIES:
                pipe.hmget(self.keys.breaker(dependency), "state", "open_until")
            rows = await pipe.execute()
        now, any_open = now_ms(), False
        for dependency, (state, open_until) in zip(DEPENDENCIES, rows, strict=True):
            is_open = state == "open" and int(open_until or 0) > now
            any_open |= is_open
            self.metrics.breaker_state.labels(dependency).set(BREAKER_LEVEL.get(state or "closed", 0))
        return any_open

    async def _request_hashes(self, entry_ids: list[str]) -> dict[str, str]:
        """Request hash of each entry (to check its lease), read in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xrange(self.keys.job_stream, entry_id, entry_id)
            found = await pipe.execute()
        return {e: rows[0][1].get("request_hash", "")[:64] for e, rows in zip(entry_ids, found, strict=True) if rows}

    async def _at_ceiling(self, entry_id: str, ceiling: int) -> bool:
        rows = await self.redis.xpending_range(self.keys.job_stream, self.keys.group, min=entry_id, max=entry_id,
                                               count=1)
        return bool(rows) and int(rows[0]["times_delivered"]) >= ceiling

    async def _dead_letter(self, entry_id: str, ceiling: int) -> bool:
        found = await self.redis.xrange(self.keys.job_stream, entry_id, entry_id)
        fields = found[0][1] if found else {}
        dlq_id = await self.functions.dead_letter(
            entry_id, job_id=fields.get("job_id", "")[:64], request_hash=fields.get("request_hash", "")[:64],
            min_deliveries=ceiling)
        if dlq_id:
            log.error("dead-lettered after %d deliveries", ceiling,
                      extra={"entry_id": entry_id, "job_id": fields.get("job_id")})
        return dlq_id is not None

    async def export(self, alive: int) -> None:
        """Update stream-health gauges: length, lag, pending, oldest ages, DLQ depth, consumers alive."""
        k = self.keys
        m = self.metrics
        m.stream_length.set(await self.redis.xlen(k.job_stream))
        m.dlq_depth.set(await self.redis.xlen(k.dead_letter_stream))
        m.consumers_alive.set(alive)
        group = next((g for g in await self.redis.xinfo_groups(k.job_stream) if g["name"] == k.group), None)
        if group is None:
            return
        m.pending.set(int(group["pending"]))
        lag = group.get("lag")
        m.lag.set(float(lag) if lag is not None else float("nan"))
        oldest = await self.redis.xpending_range(k.job_stream, k.group, min="-", max="+", count=1)
        m.pending_age.set(int(oldest[0]["time_since_delivered"]) / 1000 if oldest else 0)
        undelivered = await self.redis.xrange(k.job_stream, _next_id(group["last-delivered-id"]), "+", count=1)
        if undelivered:
            ms = int(undelivered[0][0].split("-")[0])
            m.undelivered_age.set(max(0.0, time.time() - ms / 1000))
        else:
            m.undelivered_age.set(0)

    async def run(self) -> int:
        """Cycle every ``interval_s`` until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stopping.set)
        epoch = await check_ready(self.redis, self.keys)
        log.info("reaper started")
        while not self.stopping.is_set():
            try:
                if problem := await epoch_problem(self.redis, self.keys, epoch):
                    log.error("not ready: %s; exiting without touching the group", problem)
                    return EXIT_WIPED
                report = await self.cycle()
                if any(vars(report).values()):
                    log.info("cycle: %s", report)
            except RedisError as exc:
                log.warning("reaper cycle failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.cfg.interval_s)
        log.info("reaper stopped")
        return 0


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


async def serve(settings: EventflowSettings, redis: Redis) -> int:
    """Run the reaper with its metrics endpoint until stopped."""
    registry = CollectorRegistry()
    reaper = Reaper(settings, redis, registry)
    if settings.metrics.enabled:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics.port, settings.metrics.host, registry=registry)
    return await reaper.run()


def run(settings: EventflowSettings) -> int:
    """Entry point used by ``eventflow reaper``: connect, cycle until SIGTERM, close."""
    from eventflow.redis.client import run_with_redis

    return run_with_redis(settings, serve)
