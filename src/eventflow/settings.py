"""EventflowSettings: every setting, from ``EVENTFLOW_<GROUP>__<FIELD>`` environment variables.

Built once at an entry point and passed down; nothing else reads ``os.environ``. docs/configuration.md
is generated from this model (``eventflow config-docs``) and a test fails when it drifts.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventflow.errors import ConfigError

ENV_PREFIX = "EVENTFLOW_"
ENV_NESTED_DELIMITER = "__"


class RedisSettings(BaseModel):
    """Where Redis is and how to talk to it."""

    url: str | None = Field(
        default=None,
        description="Redis URL (redis://host:port/db). Unset: `eventflow up` starts an embedded server; "
        "every other command refuses to start.",
    )
    password: SecretStr | None = Field(default=None, description="Password (or ACL user password).")
    socket_timeout_s: float = Field(default=5.0, gt=0, description="Per-command socket timeout, seconds.")
    connect_timeout_s: float = Field(default=2.0, gt=0, description="Connect timeout, seconds.")
    require_aof: bool = Field(
        default=True, description="Readiness fails unless the server has appendonly=yes (durability)."
    )


class StreamSettings(BaseModel):
    """Stream names and the consumer group."""

    prefix: str = Field(
        default="eventflow", pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$", description="Prefix of every Redis key."
    )
    group: str = Field(default="ndvi-workers", min_length=1, max_length=64, description="Consumer group name.")
    max_deliveries: int = Field(
        default=5, ge=1, le=100, description="Delivery ceiling: an entry delivered this many times is dead-lettered."
    )
    event_stream_maxlen: int = Field(
        default=100_000, ge=1000, description="Approximate cap on the lifecycle-event stream (entries)."
    )


class IngestSettings(BaseModel):
    """The HTTP admission service."""

    host: str = Field(default="127.0.0.1", description="Listen address.")
    port: int = Field(default=8080, ge=0, le=65535, description="Listen port (0 picks a free port).")
    max_backlog: int = Field(
        default=100_000, ge=1, description="Consumer-group lag + pending above which POST answers 429 (entries)."
    )
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent with 429/503, seconds.")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="Largest accepted request body, bytes.")
    tokens: dict[str, str] = Field(
        default_factory=dict,
        description='Static bearer tokens as JSON {"token": "tenant"}. Empty and no hmac_keys: no auth, tenant '
        '"default" (refused outside `eventflow up` unless allow_anonymous is set).',
    )
    hmac_keys: dict[str, str] = Field(
        default_factory=dict,
        description='HMAC-SHA256 keys for signed bearer tokens as JSON {"key_id": "secret"}: key ids are 1-32 '
        "characters of A-Z a-z 0-9 _ -, secrets at least 32 characters (e.g. `openssl rand -base64 32`). A token "
        "`ef1.<key_id>.<base64url claims>.<base64url signature>` names its key, so several keys allow rotation; "
        "mint one with `eventflow token --key-id K --tenant T --ttl-s N` (docs/api.md).",
    )
    allow_anonymous: bool = Field(default=False, description="Accept requests without a token (tenant \"default\").")
    lean_submit: bool = Field(
        default=True, description="Answer POST /v1/ndvi/jobs with the lean ASGI handler ahead of FastAPI's request "
        "pipeline (same checks, answers and OpenAPI operation; about twice the jobs/s per core, bench/README.md). "
        "false: through FastAPI like every other route.")

    @field_validator("hmac_keys")
    @classmethod
    def _hmac_keys_usable(cls, value: dict[str, str]) -> dict[str, str]:
        # Key ids travel inside the dot-separated token, and short secrets can be brute-forced offline from
        # one captured token; refuse both at start rather than minting weak tokens. Never echo a secret.
        for key_id, secret in value.items():
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", key_id):
                raise ValueError(f"key id {key_id!r} must be 1-32 characters of A-Z a-z 0-9 _ -")
            if len(secret) < 32:
                raise ValueError(f"secret of key {key_id!r} is shorter than 32 characters")
        return value


class ConsumerSettings(BaseModel):
    """The worker runtime."""

    name: str | None = Field(default=None, description="Consumer name; default hostname-pid-random.")
    concurrency: int = Field(default=2, ge=1, le=64, description="Jobs in flight per process.")
    batch_size: int = Field(default=10, ge=1, le=1000, description="XREADGROUP COUNT.")
    block_ms: int = Field(default=1000, ge=1, le=60_000, description="XREADGROUP BLOCK, milliseconds.")
    lease_ttl_ms: int = Field(default=30_000, ge=1000, description="Execution lease time-to-live, ms.")
    heartbeat_interval_ms: int = Field(default=5_000, ge=100, description="Lease/heartbeat renewal period, ms.")
    heartbeat_ttl_ms: int = Field(default=20_000, ge=1000, description="Consumer heartbeat key TTL, ms.")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="Grace period for in-flight jobs on SIGTERM, s.")
    pending_rescan_s: float = Field(default=5.0, gt=0, description="How often to process entries the reaper "
                                    "assigned to this consumer, seconds.")
    isolation: Literal["process", "thread"] = Field(
        default="process", description="Run each job in a child process (timeout and memory limit enforced) "
        "or a thread (light handlers only).")
    job_timeout_s: float = Field(default=900.0, gt=0, description="Wall-clock limit per job attempt, seconds.")
    job_memory_mb: int = Field(default=4096, ge=0, description="Address-space limit per job process, MiB "
                               "(0 = none; process isolation only).")
    retry_base_ms: int = Field(default=2000, ge=1, description="First retry delay after a transient failure, ms "
                               "(doubles per delivery, with jitter).")
    retry_max_ms: int = Field(default=300_000, ge=1, description="Largest retry delay, ms.")
    breaker_threshold: int = Field(default=5, ge=0, description="Consecutive dependency failures (input or output "
                                   "store unreachable) within breaker_window_ms that open its circuit breaker; "
                                   "0 disables the breakers.")
    breaker_window_ms: int = Field(default=60_000, ge=1, description="Window for counting breaker failures, ms.")
    breaker_open_ms: int = Field(default=30_000, ge=1, description="How long an open breaker stops every consumer "
                                 "from pulling work before one probe job may test the dependency, ms.")
    breaker_probe_ttl_ms: int = Field(default=120_000, ge=1, description="A probe that has not reported after this "
                                      "long (its consumer died) lets another consumer probe, ms.")
    handlers: dict[str, str] = Field(
        default_factory=dict, description='Handler overrides as JSON {"job_type": "module:function"}.')
    failpoints: dict[str, str] = Field(
        default_factory=dict, description='Fault injection for tests only, JSON {point: action}; points '
        'before_execute, before_commit, after_commit; actions "kill", "stop", "sleep:SECONDS".')


class ReaperSettings(BaseModel):
    """The recovery controller."""

    interval_s: float = Field(default=5.0, gt=0, description="Seconds between reaper cycles.")
    min_idle_ms: int = Field(default=60_000, ge=100, description="Pending idle time before an entry is reclaimed, ms.")
    claim_batch: int = Field(default=100, ge=1, le=10_000, description="Entries examined per cycle.")
    retention_ms: int = Field(default=3_600_000, ge=0, description="Acked entries older than this are trimmed "
                              "from the job stream, ms (never a pending or undelivered one).")


class NdviSettings(BaseModel):
    """Where inputs may come from and where outputs go."""

    data_roots: list[Path] = Field(
        default_factory=list, description='Directories file:// inputs must lie under (JSON list of paths).'
    )
    output_root: Path = Field(default=Path("./.eventflow/outputs"), description="Directory for NDVI outputs.")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts (https) and buckets (s3) remote inputs may come from."
    )
    max_pixels: int = Field(default=400_000_000, ge=1, description="Largest raster accepted, width*height pixels.")
    s3_url_template: str = Field(
        default="https://{bucket}.s3.amazonaws.com/{key}",
        description="How s3://bucket/key inputs are fetched (public objects; e.g. "
        "https://{bucket}.s3.eu-central-1.amazonaws.com/{key} or an S3-compatible endpoint).")
    fetch_max_bytes: int = Field(default=4 * 1024**3, ge=1, description="Largest remote input downloaded, bytes.")
    fetch_timeout_s: float = Field(default=60.0, gt=0, description="Connect/read timeout of remote input fetches, s.")
    fetch_allowed_networks: list[str] = Field(
        default_factory=list, description="CIDRs remote input hosts may resolve to besides public addresses (e.g. "
        "an on-prem object store at 10.20.0.0/16); loopback, private and link-local are refused otherwise.")
    fetch_ca_file: Path | None = Field(default=None, description="Extra CA bundle (PEM) trusted for remote inputs.")
    fetch_resolve: dict[str, str] = Field(
        default_factory=dict, description='Fixed addresses for remote input hosts as JSON {"host": "ip"}, like curl '
        "--resolve (split-horizon DNS, tests); the address checks still apply to them.")

    @field_validator("fetch_allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a network: {net!r}") from exc
        return value


class MetricsSettings(BaseModel):
    """Prometheus exposition for the consumer and reaper (ingest serves /metrics on its own port)."""

    enabled: bool = Field(default=True, description="Serve /metrics.")
    host: str = Field(default="127.0.0.1", description="Metrics listen address.")
    port: int = Field(default=9102, ge=0, le=65535, description="Metrics port (0 picks a free port).")


class OperatorSettings(BaseModel):
    """The kopf operator."""

    namespace: str | None = Field(default=None, description="Namespace to watch; unset watches all.")
    liveness_url: str = Field(default="http://0.0.0.0:8080/healthz",
                              description="kopf liveness endpoint (the chart's liveness probe calls it).")
    status_interval_s: float = Field(default=5.0, gt=0, description="How often an NdviJob's status is refreshed "
                                     "from its Redis job state, and a running DlqReplay's progress is "
                                     "written, seconds.")
    redis_retry_s: float = Field(default=10.0, gt=0, description="Delay before a handler retries after Redis "
                                 "was unreachable, seconds.")
    redis_attempts: int = Field(default=6, ge=1, description="Attempts to reach Redis before deleting an NdviJob "
                                "proceeds without cancelling its job (a finalizer must not block deletion "
                                "forever) and before a DlqReplay is marked Failed. Submissions retry "
                                "without a limit.")


class LogSettings(BaseModel):
    """Logging."""

    level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="Log level.")
    json_format: bool = Field(default=True, description="JSON lines (true) or plain text (false).")


class EventflowSettings(BaseSettings):
    """All EventFlow settings, grouped by component."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER, extra="ignore", frozen=True
    )

    redis: RedisSettings = Field(default_factory=RedisSettings)
    streams: StreamSettings = Field(default_factory=StreamSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
    reaper: ReaperSettings = Field(default_factory=ReaperSettings)
    ndvi: NdviSettings = Field(default_factory=NdviSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    operator: OperatorSettings = Field(default_factory=OperatorSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _reclaim_after_lease_expiry(self) -> EventflowSettings:
        # Reclaiming an entry while its dead worker's lease still holds only burns a delivery.
        if self.reaper.min_idle_ms <= self.consumer.lease_ttl_ms:
            raise ValueError(
                f"EVENTFLOW_REAPER__MIN_IDLE_MS ({self.reaper.min_idle_ms}) must exceed "
                f"EVENTFLOW_CONSUMER__LEASE_TTL_MS ({self.consumer.lease_ttl_ms})")
        return self

    @field_validator("ndvi")
    @classmethod
    def _roots_absolute(cls, value: NdviSettings) -> NdviSettings:
        return value.model_copy(update={
            "data_roots": [p.expanduser().resolve() for p in value.data_roots],
            "output_root": value.output_root.expanduser().resolve(),
        })


def env_name(loc: tuple[Any, ...]) -> str:
    """The environment variable for a validation error location, e.g. EVENTFLOW_CONSUMER__BATCH_SIZE."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(p.upper() for p in parts[:2])


def load_settings(**overrides: Any) -> EventflowSettings:
    """Build settings from the environment; a bad value raises ConfigError naming the variable."""
    try:
        return EventflowSettings(**overrides)
    except ValidationError as exc:
        problems = [f"{env_name(err['loc'])}: {err['msg']}" if err["loc"] else err["msg"].removeprefix("Value error, ")
                    for err in exc.errors()]
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


def settings_env(settings: EventflowSettings) -> dict[str, str]:
    """Settings flattened back to EVENTFLOW_* variables, to hand to child processes."""
    env: dict[str, str] = {}
    for group, model in settings:
        for name, value in model:
            if value is None:
                continue
            key = f"{ENV_PREFIX}{group.upper()}{ENV_NESTED_DELIMITER}{name.upper()}"
            if isinstance(value, SecretStr):
                env[key] = value.get_secret_value()
            elif isinstance(value, list | dict):
                env[key] = json.dumps([str(v) for v in value] if isinstance(value, list) else value)
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            else:
                env[key] = str(value)
    return env
