"""One table from exceptions to HTTP answers: status, JSON body {error, message, field}, Retry-After."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from eventflow.admission import field_path
from eventflow.errors import EpochMismatch, LibraryMismatch
from eventflow.inputs import InputRejected
from eventflow.redis.functions import Backpressure, GroupMissing, IdempotencyConflict

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error with a stable code and, where it applies, the offending field."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.field, self.headers = status, error, message, field, headers


def body(error: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    """The JSON error body every 4xx/5xx uses."""
    return {"error": error, "message": message, "field": field, **extra}


def _api(exc: ApiError, _: dict[str, str]) -> JSONResponse:
    return JSONResponse(body(exc.error, exc.message, exc.field), exc.status, headers=exc.headers)


def _input(exc: InputRejected, _: dict[str, str]) -> JSONResponse:
    return JSONResponse(body("input_not_allowed", f"{exc.field}: {exc}", exc.field), 422)


def _backpressure(exc: Backpressure, retry: dict[str, str]) -> JSONResponse:
    return JSONResponse(body("backlog_full", str(exc)), 429, headers=retry)


def _conflict(exc: IdempotencyConflict, _: dict[str, str]) -> JSONResponse:
    return JSONResponse(body("idempotency_conflict", str(exc), "Idempotency-Key"), 422)


def _not_ready(exc: Exception, retry: dict[str, str]) -> JSONResponse:
    log.error("redis not ready: %s", exc)
    return JSONResponse(body("not_ready", str(exc)), 503, headers=retry)


def _unreachable(exc: Exception, retry: dict[str, str]) -> JSONResponse:
    log.warning("redis unreachable: %s", exc)
    return JSONResponse(body("redis_unavailable", "the job store is unreachable; retry later"), 503, headers=retry)


def _response(exc: ResponseError, retry: dict[str, str]) -> JSONResponse:
    text = str(exc)
    if text.startswith(("OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "NOREPLICAS")):
        log.warning("redis refused the write: %s", text)
        return JSONResponse(body("redis_refused", text.split(" ", 1)[0]), 503, headers=retry)
    if "function not found" in text.lower():
        # The library is gone (FUNCTION FLUSH, or a server restored without it): like a missing epoch,
        # the store is not bootstrapped -- an operator's fix, not a bug in the request.
        log.error("redis not ready: %s", text)
        return JSONResponse(body("not_ready", "the Redis Function library is not loaded; run `eventflow "
                                 "bootstrap`"), 503, headers=retry)
    log.exception("unexpected redis error")
    return JSONResponse(body("internal", "unexpected store error"), 500)


#: Exception class -> answer (given the Retry-After header). Looked up along the exception's MRO, as
#: Starlette does, by both the FastAPI handlers and the lean submit handler.
_TABLE: dict[type[Exception], Callable[[Any, dict[str, str]], JSONResponse]] = {
    ApiError: _api,
    InputRejected: _input,
    Backpressure: _backpressure,
    IdempotencyConflict: _conflict,
    EpochMismatch: _not_ready,
    GroupMissing: _not_ready,
    LibraryMismatch: _not_ready,
    RedisConnectionError: _unreachable,
    RedisTimeoutError: _unreachable,
    ResponseError: _response,
}


def error_response(exc: Exception, retry_after_s: int) -> JSONResponse | None:
    """The answer for an exception from the table, or None for one it does not know (a 500)."""
    for cls in type(exc).__mro__:
        handler = _TABLE.get(cls)
        if handler is not None:
            return handler(exc, {"Retry-After": str(retry_after_s)})
    return None


def install(app: FastAPI, retry_after_s: int) -> None:
    """Register the exception → response table on the app."""

    async def _table(_: Request, exc: Exception) -> JSONResponse:
        response = error_response(exc, retry_after_s)
        assert response is not None  # registered only for the table's classes
        return response

    for cls in _TABLE:
        app.add_exception_handler(cls, _table)

    @app.exception_handler(StarletteHTTPException)
    async def _framework(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers a body it cannot decode (not UTF-8) with 400; that is the same client mistake as
        # malformed JSON, which is a 422. Unknown routes (404) and methods (405) keep their status.
        if exc.status_code == 400:
            return JSONResponse(body("invalid_request", "body: not valid UTF-8 JSON", None), 422)
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(body(error, str(exc.detail), None), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            # Its location is ("body", character offset): a position in the text, not a field.
            where = [p for p in first.get("loc", ()) if p != "body"]
            message = f"body: not valid JSON ({first.get('msg')}{f' at character {where[0]}' if where else ''})"
            return JSONResponse(body("invalid_request", message, None), 422)
        field = field_path(first.get("loc", ()), drop=("body",)) or None
        details = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or None,
                    "message": e.get("msg", "")} for e in errors[:20]]
        return JSONResponse(body("invalid_request", f"{field or 'body'}: {first.get('msg')}", field,
                                 details=details), 422)
