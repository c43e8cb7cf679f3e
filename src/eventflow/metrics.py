"""Every Prometheus metric EventFlow exports, one small class per component.

Names follow the seed dashboards where they exist (``redis_stream_pending_entries``,
``redis_stream_pending_age_max``), else ``eventflow_<component>_<what>_<unit>``. Each class registers on
the registry it is given, so tests and several components in one process never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class IngestMetrics:
    """Admission counters and latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("eventflow_ingest_requests_total", "HTTP requests by route and status code.",
                                ["route", "code"], registry=registry)
        self.accepted = Counter("eventflow_ingest_jobs_accepted_total", "Jobs newly added to the stream.",
                                registry=registry)
        self.duplicates = Counter("eventflow_ingest_jobs_duplicate_total", "Submissions answered with an "
                                  "existing job.", registry=registry)
        self.rejected = Counter("eventflow_ingest_jobs_rejected_total", "Submissions refused, by reason.",
                                ["reason"], registry=registry)
        self.latency = Histogram("eventflow_ingest_request_duration_seconds", "Submit latency in seconds.",
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
                                 registry=registry)


#: eventflow_circuit_breaker_state values.
BREAKER_LEVEL = {"closed": 0, "counting": 0, "half_open": 1, "open": 2}


class ConsumerMetrics:
    """Job outcomes, durations and the consumer heartbeat."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter("eventflow_jobs_total", "Jobs finished by this consumer, by outcome.", ["outcome"],
                            registry=registry)
        self.duration = Histogram("eventflow_job_duration_seconds", "Wall-clock seconds per executed job.",
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                  registry=registry)
        self.in_flight = Gauge("eventflow_consumer_jobs_in_flight", "Jobs executing now.", registry=registry)
        self.heartbeat = Gauge("eventflow_consumer_heartbeat_timestamp_seconds", "Last heartbeat, Unix seconds.",
                               registry=registry)
        self.failures = Counter("eventflow_consumer_failures_total", "Failed attempts, by failure class.",
                                ["failure_class"], registry=registry)
        self.breaker_state = Gauge("eventflow_circuit_breaker_state", "Circuit breaker state as this consumer last "
                                   "saw it: 0 closed, 1 half-open, 2 open.", ["dependency"], registry=registry)
        self.breaker_opened = Counter("eventflow_circuit_breaker_opened_total", "Times a job failure from this "
                                      "consumer opened a dependency's breaker.", ["dependency"], registry=registry)
        self.breaker_waits = Counter("eventflow_consumer_breaker_wait_seconds_total", "Seconds this consumer did not "
                                     "pull work because a breaker was open.", registry=registry)


class ReaperMetrics:
    """Stream health (for Prometheus and KEDA) and recovery counters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.stream_length = Gauge("eventflow_stream_length", "Entries in the job stream.", registry=registry)
        self.lag = Gauge("eventflow_stream_lag", "Entries not yet delivered to the consumer group.",
                         registry=registry)
        self.pending = Gauge("redis_stream_pending_entries", "Entries delivered but not acked.", registry=registry)
        self.pending_age = Gauge("redis_stream_pending_age_max", "Idle seconds of the oldest pending entry.",
                                 registry=registry)
        self.undelivered_age = Gauge("eventflow_stream_oldest_undelivered_age_seconds",
                                     "Age of the oldest undelivered entry (from its id), seconds.",
                                     registry=registry)
        self.dlq_depth = Gauge("eventflow_dlq_depth", "Entries in the dead-letter stream.", registry=registry)
        self.breaker_state = Gauge("eventflow_circuit_breaker_state", "Dependency circuit breaker: 0 closed, "
                                   "1 half-open, 2 open (reclaims and retries are held while open).",
                                   ["dependency"], registry=registry)
        self.consumers_alive = Gauge("eventflow_consumers_alive", "Consumers with a live heartbeat.",
                                     registry=registry)
        self.reclaimed = Counter("eventflow_reaper_reclaimed_total", "Entries handed to live consumers.",
                                 registry=registry)
        self.dead_lettered = Counter("eventflow_reaper_dead_lettered_total", "Entries moved to the DLQ.",
                                     registry=registry)
        self.lost = Counter("eventflow_lost_entries_total", "Pending entries found deleted from the stream.",
                            registry=registry)
        self.trimmed = Counter("eventflow_reaper_trimmed_entries_total", "Acked entries trimmed by retention.",
                               registry=registry)
        self.consumers_removed = Counter("eventflow_reaper_consumers_removed_total", "Dead consumers deleted.",
                                         registry=registry)
        self.heartbeat = Gauge("eventflow_reaper_heartbeat_timestamp_seconds", "Last reaper cycle, Unix seconds.",
                               registry=registry)
