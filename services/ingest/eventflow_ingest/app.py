"""create_app(settings): the FastAPI application whose lifespan owns the Redis client."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from eventflow import __version__, tokens
from eventflow.errors import ConfigError
from eventflow.metrics import IngestMetrics
from eventflow.redis.client import connect, functions_for, keys_for
from eventflow.settings import EventflowSettings
from eventflow_ingest import errors, routes
from eventflow_ingest.submit import SUBMIT_PATH, LeanSubmit, body_problem, media_type, reply

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyGuard:
    """ASGI middleware: 415 for non-JSON POST bodies and 413 past the size limit, before any parsing."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check headers, then count streamed bytes."""
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # ASGI header names are lowercase bytes; pick the two we need instead of decoding every header.
        ctype = length = None
        for name, value in scope.get("headers", []):
            if name == b"content-type":
                ctype = media_type(value)
            elif name == b"content-length":
                length = value.decode("latin-1")
        problem = body_problem(ctype, length, self.max_body_bytes)
        if problem is not None:
            await reply(send, *problem)
            return
        seen = 0
        too_big = False

        async def counted() -> Message:
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    too_big = True
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await reply(send, 413, "body_too_large", f"body larger than {self.max_body_bytes} bytes", None)


class _BodyTooLarge(Exception):
    pass


class IngestApp(FastAPI):
    """The FastAPI app, with ``POST /v1/ndvi/jobs`` answered by :class:`LeanSubmit` ahead of its middleware."""

    #: None: every request goes through FastAPI (EVENTFLOW_INGEST__LEAN_SUBMIT=false).
    lean_submit: LeanSubmit | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route the submit operation to the lean handler, everything else to FastAPI."""
        # Exact path only, and no root_path (whose stripping is Starlette's business): anything else,
        # a trailing slash included, gets FastAPI's answer.
        if (self.lean_submit is not None and scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] == SUBMIT_PATH and not scope.get("root_path")):
            scope["app"] = self
            await self.lean_submit(scope, receive, send, super().__call__)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: EventflowSettings) -> IngestApp:
    """The ingest application for these settings."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings)
        app.state.redis = redis
        app.state.functions = functions_for(redis, settings)
        app.state.keys = keys_for(settings)
        try:
            yield
        finally:
            await redis.aclose()

    app = IngestApp(
        title="EventFlow ingest",
        version=__version__,
        description="Admission of NDVI jobs into the EventFlow job stream. See docs/api.md.",
        lifespan=lifespan,
        # EventFlow reports through Prometheus and JSON logs with trace ids, and configures no OpenTelemetry;
        # left on, FastAPI's native hooks query the global OTel providers on every request (~3% of CPU).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    registry = CollectorRegistry()
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = IngestMetrics(registry)
    app.state.signed_tokens = tokens.VerifiedTokens(settings.ingest.hmac_keys)
    if settings.ingest.lean_submit:
        app.lean_submit = LeanSubmit(app.state, settings.ingest.max_body_bytes, settings.ingest.retry_after_s)
    errors.install(app, settings.ingest.retry_after_s)
    app.include_router(routes.jobs_router)
    app.include_router(routes.health_router)
    app.add_middleware(BodyGuard, max_body_bytes=settings.ingest.max_body_bytes)
    return app


def run(settings: EventflowSettings) -> int:
    """Entry point used by ``eventflow ingest``: serve HTTP until SIGTERM."""
    import uvicorn

    if not settings.redis.url:
        raise ConfigError("EVENTFLOW_REDIS__URL: not set")
    if not settings.ingest.tokens and not settings.ingest.hmac_keys and not settings.ingest.allow_anonymous:
        raise ConfigError("EVENTFLOW_INGEST__TOKENS: no bearer tokens configured; set tokens or "
                          "EVENTFLOW_INGEST__HMAC_KEYS, or EVENTFLOW_INGEST__ALLOW_ANONYMOUS=true (development only)")
    uvicorn.run(create_app(settings), host=settings.ingest.host, port=settings.ingest.port, log_config=None,
                access_log=False, timeout_graceful_shutdown=10)
    return 0
