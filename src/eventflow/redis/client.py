"""Connections, bootstrap (library, group, epoch) and the start-up checks every service runs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventflow.errors import ConfigError, EpochMismatch
from eventflow.keys import Keys
from eventflow.redis.functions import LIBRARY_NAME, Functions, library_source, library_version
from eventflow.settings import EventflowSettings


def keys_for(settings: EventflowSettings) -> Keys:
    """The key layout the settings describe."""
    return Keys(prefix=settings.streams.prefix, group=settings.streams.group)


def connect(settings: EventflowSettings) -> Redis:
    """An asyncio Redis client for the configured URL (strings decoded as UTF-8)."""
    if not settings.redis.url:
        raise ConfigError("EVENTFLOW_REDIS__URL: not set (only `eventflow up` can start an embedded server)")
    password = settings.redis.password.get_secret_value() if settings.redis.password else None
    return Redis.from_url(
        settings.redis.url,
        password=password,
        decode_responses=True,
        socket_timeout=settings.redis.socket_timeout_s,
        socket_connect_timeout=settings.redis.connect_timeout_s,
        health_check_interval=30,
        # Commands are retried after a lost connection. That is safe only because every write that
        # must not happen twice is a Redis Function that recognises its own retry (see eventflow.lua).
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


def functions_for(redis: Redis, settings: EventflowSettings, *, batch: bool = False) -> Functions:
    """The Function wrappers bound to this client and the configured key layout (``batch``: calls issued
    in the same loop turn share one pipeline, see :class:`eventflow.redis.functions.CallBatcher`)."""
    return Functions(redis, keys_for(settings), settings.streams.event_stream_maxlen, batch=batch)


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What a service logs once at start."""

    redis_version: str
    aof_enabled: bool
    appendfsync: str
    maxmemory_policy: str
    library_version: str | None
    epoch: str | None


async def server_facts(redis: Redis, keys: Keys) -> ServerFacts:
    """Version, persistence and EventFlow bootstrap facts of the server."""
    info = await redis.info("server")
    persistence = await redis.info("persistence")
    try:
        cfg = await redis.config_get("appendfsync")
        policy = await redis.config_get("maxmemory-policy")
    except ResponseError:  # CONFIG may be forbidden by ACL in production
        cfg, policy = {}, {}
    version = await Functions(redis, keys).version()
    return ServerFacts(
        redis_version=str(info.get("redis_version", info.get("valkey_version", "?"))),
        aof_enabled=bool(int(persistence.get("aof_enabled", 0))),
        appendfsync=str(cfg.get("appendfsync", "unknown")),
        maxmemory_policy=str(policy.get("maxmemory-policy", "unknown")),
        library_version=version,
        epoch=await redis.get(keys.epoch),
    )


async def bootstrap(redis: Redis, keys: Keys, *, allow_fresh: bool = True) -> str:
    """Load the Function library, create the stream and group, and write the epoch; returns the epoch.

    A server with EventFlow keys but no epoch was wiped or tampered with: refuse instead of silently
    recreating the group (facts #6). ``allow_fresh=False`` also refuses a server never bootstrapped.
    """
    await redis.function_load(library_source(), replace=True)
    epoch = await redis.get(keys.epoch)
    if epoch is None:
        if not allow_fresh:
            raise EpochMismatch(f"{keys.epoch} missing and allow_fresh is off")
        if await redis.exists(keys.dead_letter_stream) or await redis.exists(keys.event_stream):
            raise EpochMismatch(
                f"{keys.epoch} is missing but EventFlow streams exist: the server was partly wiped; "
                "investigate before bootstrapping again"
            )
        epoch = uuid.uuid4().hex
    try:
        await redis.xgroup_create(keys.job_stream, keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if not str(exc).startswith("BUSYGROUP"):
            raise
    # Written last: its presence promises the stream and group exist.
    await redis.set(keys.epoch, epoch, nx=True)
    return str(await redis.get(keys.epoch))


async def check_ready(redis: Redis, keys: Keys) -> str:
    """Raise unless the library matches and the epoch exists; returns the epoch (services call this)."""
    await Functions(redis, keys).check_version()
    epoch = await redis.get(keys.epoch)
    if epoch is None:
        raise EpochMismatch(f"{keys.epoch} missing: Redis was wiped or never bootstrapped; run `eventflow bootstrap`")
    return str(epoch)


def run_with_redis(settings: EventflowSettings, serve: Callable[[EventflowSettings, Redis], Awaitable[int]], *,
                   fast_loop: bool = False) -> int:
    """A service's process entry point: connect, ``await serve(settings, redis)`` until it returns, close.

    ``fast_loop``: run on uvloop when it is installed (the consumer's extra installs it): its C transports
    and scheduler cost a fraction of asyncio's per Redis round trip (bench/README.md, pipeline_bench.py).
    """

    async def main() -> int:
        redis = connect(settings)
        try:
            return await serve(settings, redis)
        finally:
            await redis.aclose()

    loop_factory = None
    if fast_loop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


#: Exit code of a consumer or reaper that found Redis wiped or replaced under it: not ready, restart me.
EXIT_WIPED = 3


async def epoch_problem(redis: Redis, keys: Keys, expected: str) -> str | None:
    """Why the data set under a running service is no longer the one it started on, or None.

    A missing epoch means Redis was wiped (e.g. restarted without persistence); another epoch means it
    was re-bootstrapped or restored. Either way the service must not carry on (recreating the group would
    silently forget every pending entry): it exits EXIT_WIPED and refuses to start until bootstrapped.
    """
    found = await redis.get(keys.epoch)
    if found is None:
        return f"{keys.epoch} disappeared: Redis was wiped; run `eventflow bootstrap` after restoring data"
    if str(found) != expected:
        return f"{keys.epoch} changed from {expected} to {found}: Redis was re-bootstrapped or restored"
    return None


__all__ = [
    "EXIT_WIPED",
    "LIBRARY_NAME",
    "ServerFacts",
    "bootstrap",
    "check_ready",
    "connect",
    "epoch_problem",
    "functions_for",
    "keys_for",
    "library_version",
    "run_with_redis",
    "server_facts",
]
