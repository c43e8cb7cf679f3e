"""Every Redis key, stream and group name EventFlow uses, built in one place.

Nothing else concatenates key strings: a service that needs a key asks a ``Keys`` instance, so the
layout below is the whole truth about what lives in Redis (docs/contract.md mirrors it).

| builder                   | default                                   | type        |
|---------------------------|-------------------------------------------|-------------|
| job_stream                | eventflow:jobs                            | stream      |
| group (not a key)         | ndvi-workers                              | group       |
| dead_letter_stream        | eventflow:dlq                             | stream      |
| event_stream              | eventflow:events                          | stream      |
| job_state(job_id)         | eventflow:job:{job_id}                    | hash        |
| dedupe(request_hash)      | eventflow:dedupe:{request_hash}           | string      |
| idempotency(tenant, key)  | eventflow:idem:{tenant}:{sha256(key)}     | string      |
| result(request_hash)      | eventflow:result:{request_hash}           | string/json |
| lease(request_hash)       | eventflow:lease:{request_hash}            | string      |
| fence(request_hash)       | eventflow:fence:{request_hash}            | counter     |
| failure(entry_id)         | eventflow:failure:{entry_id}              | hash        |
| retry_schedule            | eventflow:retries                         | zset        |
| dlq_replayed              | eventflow:dlq:replayed                    | hash        |
| heartbeat(consumer)       | eventflow:consumer:{consumer}             | string+TTL  |
| consumer_registry         | eventflow:consumers                       | zset        |
| reaper_heartbeat          | eventflow:reaper:heartbeat                | string+TTL  |
| epoch                     | eventflow:epoch                           | string      |
| breaker(dependency)       | eventflow:breaker:{dependency}            | hash        |
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builders under one configurable prefix."""

    prefix: str = "eventflow"
    group: str = "ndvi-workers"

    @property
    def job_stream(self) -> str:
        """The stream that carries NDVI jobs (written only by ingest, trimmed only by the reaper)."""
        return f"{self.prefix}:jobs"

    @property
    def dead_letter_stream(self) -> str:
        """Entries that failed permanently or exceeded the delivery ceiling."""
        return f"{self.prefix}:dlq"

    @property
    def event_stream(self) -> str:
        """Lifecycle events (queued, started, progress, succeeded, ...)."""
        return f"{self.prefix}:events"

    def breaker(self, dependency: str) -> str:
        """Circuit-breaker state of one downstream dependency, shared by every consumer."""
        return f"{self.prefix}:breaker:{dependency}"

    @property
    def dlq_replayed(self) -> str:
        """DLQ record id -> the entry id its replay created (makes replay idempotent)."""
        return f"{self.prefix}:dlq:replayed"

    @property
    def retry_schedule(self) -> str:
        """Entry ids waiting for a delayed retry, scored by due time (ms)."""
        return f"{self.prefix}:retries"

    @property
    def epoch(self) -> str:
        """Written once at bootstrap; its absence means the server was wiped."""
        return f"{self.prefix}:epoch"

    @property
    def consumer_registry(self) -> str:
        """Every consumer that announced itself, scored by its last heartbeat (ms)."""
        return f"{self.prefix}:consumers"

    @property
    def reaper_heartbeat(self) -> str:
        """Refreshed by the reaper every cycle."""
        return f"{self.prefix}:reaper:heartbeat"

    def job_state(self, job_id: str) -> str:
        """Hash with the job's state, attempts, timestamps, progress, result or error."""
        return f"{self.prefix}:job:{job_id}"

    def dedupe(self, request_hash: str) -> str:
        """Maps a request hash (tenant-scoped) to the job id that owns it."""
        return f"{self.prefix}:dedupe:{request_hash}"

    def idempotency(self, tenant: str, key: str) -> str:
        """Maps a client Idempotency-Key to a job id; hashed so any header value makes a safe key."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return f"{self.prefix}:idem:{tenant}:{digest}"

    def result(self, request_hash: str) -> str:
        """The committed result (JSON with the fencing token that wrote it)."""
        return f"{self.prefix}:result:{request_hash}"

    def lease(self, request_hash: str) -> str:
        """The execution lease: holds a random token, expires after the lease TTL."""
        return f"{self.prefix}:lease:{request_hash}"

    def fence(self, request_hash: str) -> str:
        """Monotonic fencing counter: INCR on every lease acquisition."""
        return f"{self.prefix}:fence:{request_hash}"

    def failure(self, entry_id: str) -> str:
        """Last failure class/message and first/last failure time of one stream entry."""
        return f"{self.prefix}:failure:{entry_id}"

    def heartbeat(self, consumer: str) -> str:
        """A live consumer's heartbeat; expiry marks the consumer dead."""
        return f"{self.prefix}:consumer:{consumer}"
