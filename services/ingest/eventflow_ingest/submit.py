"""POST /v1/ndvi/jobs: the admission answer, and the lean ASGI handler that serves it ahead of FastAPI.

FastAPI's request pipeline (middleware layers, routing, dependency solving, body and response
validation) cost more CPU than admission itself, and this is the one hot endpoint (bench/README.md,
"ingest_bench.py"). :class:`LeanSubmit` answers a request that passes every check with the same
validation, admission, metrics, status, headers and body bytes as the FastAPI route, which stays the
published operation in the OpenAPI spec. Anything the client got wrong before admission (bad JSON, an
invalid field, a missing or rejected token, a bad header) is handed to that route unchanged, so every
such answer and its ordering (JSON syntax before auth, auth before field validation) is FastAPI's own.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import State

from eventflow.admission import admit_job
from eventflow.contract import NdviJobRequest, SubmitResponse
from eventflow.inputs import InputRejected
from eventflow_ingest.deps import authenticate
from eventflow_ingest.errors import ApiError, body, error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The path of the submit operation (the jobs router's prefix).
SUBMIT_PATH = "/v1/ndvi/jobs"
#: Longest Idempotency-Key accepted (the route's ``Header(max_length=...)``).
MAX_IDEMPOTENCY_KEY_CHARS = 255


async def submit(state: State, job: NdviJobRequest, tenant: str,
                 idempotency_key: str | None) -> tuple[int, SubmitResponse, str]:
    """Admit ``job`` and count it: (status 202 or 200 for a duplicate, the answer, its Location)."""
    metrics = state.metrics
    started = time.perf_counter()
    try:
        admitted = await admit_job(state.functions, state.settings, job, tenant, idempotency_key=idempotency_key)
    except InputRejected:
        raise  # a 422 naming the field: a bad request, not a rejection counted by reason
    except Exception as exc:
        metrics.rejected.labels(reason=type(exc).__name__).inc()
        raise
    if admitted.created:
        status = 202
        metrics.accepted.inc()
    else:
        status = 200
        metrics.duplicates.inc()
    metrics.latency.observe(time.perf_counter() - started)
    metrics.requests.labels(route="submit", code=str(status)).inc()
    answer = SubmitResponse(job_id=admitted.job_id, request_hash=admitted.request_hash, status=admitted.state,
                            duplicate=not admitted.created)
    return status, answer, f"{SUBMIT_PATH}/{admitted.job_id}"


def body_problem(content_type: str | None, content_length: str | None,
                 max_body_bytes: int) -> tuple[int, str, str, str | None] | None:
    """(status, error, message, field) when the headers alone refuse the body (415, 413), else None."""
    if content_type != "application/json":
        return 415, "unsupported_media_type", "Content-Type must be application/json", "Content-Type"
    if content_length is not None and (not content_length.isdigit() or int(content_length) > max_body_bytes):
        return 413, "body_too_large", f"body larger than {max_body_bytes} bytes", None
    return None


def media_type(raw: bytes) -> str:
    """The media type of a raw Content-Type header value, lowercased, parameters dropped."""
    return raw.decode("latin-1").split(";")[0].strip().lower()


async def reply(send: Send, status: int, error: str, message: str, field: str | None) -> None:
    """Send an error body from outside FastAPI (before the request reaches it)."""
    import json

    payload = json.dumps(body(error, message, field)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class LeanSubmit:
    """ASGI handler for ``POST /v1/ndvi/jobs``; ``fallback`` (the FastAPI app) answers what it does not."""

    def __init__(self, state: State, max_body_bytes: int, retry_after_s: int) -> None:
        self.state = state
        self.max_body_bytes = max_body_bytes
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send, fallback: ASGIApp) -> None:
        """Check headers and size, parse, authenticate, admit, answer."""
        # One pass over the raw headers. Content-Type: the last one, as BodyGuard reads it; the others: the
        # first, as Starlette's Headers.get (and so the FastAPI route) reads them.
        ctype = length = authorization = idempotency_key = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                ctype = media_type(value)
            elif name == b"content-length":
                length = value.decode("latin-1")
            elif name == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif name == b"idempotency-key" and idempotency_key is None:
                idempotency_key = value.decode("latin-1")
        problem = body_problem(ctype, length, self.max_body_bytes)
        if problem is not None:
            await reply(send, *problem)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nothing was admitted, nobody to answer
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body_bytes:
                await reply(send, 413, "body_too_large", f"body larger than {self.max_body_bytes} bytes", None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)

        state = self.state
        try:
            # Straight from bytes in pydantic's JSON mode: what json.loads + model_validate (FastAPI's way)
            # accept, it accepts, with the same values (tests/unit/test_submit_parsing.py).
            job = NdviJobRequest.model_validate_json(raw)
            tenant = authenticate(state.settings.ingest, authorization or "", "POST", state.signed_tokens)
        except (ValidationError, ApiError):
            await fallback(scope, _replay(raw, receive), send)
            return
        if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
            await fallback(scope, _replay(raw, receive), send)
            return
        try:
            status, answer, location = await submit(state, job, tenant, idempotency_key)
        except Exception as exc:
            response = error_response(exc, self.retry_after_s)
            if response is None:
                raise  # uvicorn logs it and answers 500, as FastAPI's ServerErrorMiddleware would
            await response(scope, receive, send)
            return
        payload = answer.model_dump_json().encode()
        # The FastAPI route's headers, in its order.
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(payload)).encode()),
                                (b"content-type", b"application/json"),
                                (b"location", location.encode("latin-1"))]})
        await send({"type": "http.response.body", "body": payload})


def _replay(raw: bytes, receive: Receive) -> Receive:
    """A receive channel that yields the body already read, then the connection's own messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return replayed
