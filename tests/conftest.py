"""Shared fixtures: a real redis-server (or valkey-server) per test session, and per-test clients.

``EVENTFLOW_TEST_SERVER=valkey`` runs the suite against valkey-server. With ``CI=true`` a missing
server binary fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from eventflow.embedded import EmbeddedServer, find_server_binary
from eventflow.keys import Keys
from eventflow.redis.client import bootstrap, connect, functions_for
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings, load_settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One real server for the run: SIGKILL-able (kill) and restartable on the same data dir (restart)."""
    kind = os.environ.get("EVENTFLOW_TEST_SERVER", "redis")
    try:
        found_kind, _ = find_server_binary(kind)
    except FileNotFoundError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    if found_kind != kind and os.environ.get("CI") == "true":
        pytest.fail(f"EVENTFLOW_TEST_SERVER={kind} but only {found_kind}-server is available")
    server = EmbeddedServer(data_dir=tmp_path_factory.mktemp("redis"), kind=kind, appendfsync="always").start()
    yield server
    server.kill()


@pytest.fixture
def make_redis_server(redis_server: EmbeddedServer,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., EmbeddedServer]]:
    """Factory: a private server of the session's kind in its own data dir, SIGKILLed at teardown.

    For tests that crash Redis under load without disturbing the shared one. Keywords are EmbeddedServer
    options: ``appendfsync`` ("always" by default), ``aof``, ``extra_args`` (e.g. ``["--maxmemory", "2mb"]``).
    """
    made: list[EmbeddedServer] = []

    def create(**options: Any) -> EmbeddedServer:
        server = EmbeddedServer(data_dir=tmp_path_factory.mktemp("redis-private"), kind=redis_server.kind, **options)
        made.append(server)
        return server.start()

    yield create
    for server in made:
        server.kill()


@pytest.fixture
def make_settings(redis_server: EmbeddedServer, tmp_path: Path) -> Callable[..., EventflowSettings]:
    """Factory: settings pointing at the test server, outputs in tmp_path; overrides by group."""

    def create(**groups: dict[str, Any]) -> EventflowSettings:
        base: dict[str, Any] = {
            "redis": {"url": redis_server.url},
            "ndvi": {"data_roots": [str(REPO / "src/eventflow/samples"), str(REPO / "tests/data"), str(tmp_path)],
                     "output_root": str(tmp_path / "outputs")},
            "ingest": {"allow_anonymous": True},
            "metrics": {"enabled": False},
        }
        for group, values in groups.items():
            base[group] = {**base.get(group, {}), **values}
        return load_settings(**base)

    return create


@pytest.fixture
def settings(make_settings: Callable[..., EventflowSettings]) -> EventflowSettings:
    """Default test settings."""
    return make_settings()


@pytest.fixture
async def redis(redis_server: EmbeddedServer, settings: EventflowSettings) -> AsyncIterator[Redis]:
    """A client on a flushed, bootstrapped server."""
    client = connect(settings)
    await client.flushall()
    await client.function_flush()
    await bootstrap(client, Keys(settings.streams.prefix, settings.streams.group))
    yield client
    await client.aclose()


@pytest.fixture
def keys(settings: EventflowSettings) -> Keys:
    """The key layout of the test settings."""
    return Keys(settings.streams.prefix, settings.streams.group)


@pytest.fixture
def functions(redis: Redis, settings: EventflowSettings) -> Functions:
    """Function wrappers on the test server."""
    return functions_for(redis, settings)


async def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    """Await until predicate() (sync or async) is truthy; fail with a clear message on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)
