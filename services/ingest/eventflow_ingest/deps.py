"""FastAPI dependencies: settings, Redis functions, and the tenant taken from the bearer token (static or signed)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from eventflow import tokens
from eventflow.keys import Keys
from eventflow.metrics import IngestMetrics
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings, IngestSettings
from eventflow_ingest.errors import ApiError


# Every dependency is `async def` although none awaits: FastAPI runs plain `def` dependencies in its thread
# pool, and those hops (five per request) cost more CPU than the whole submission (bench/README.md).
async def _settings(request: Request) -> EventflowSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def _functions(request: Request) -> Functions:
    return request.app.state.functions  # type: ignore[no-any-return]


async def _keys(request: Request) -> Keys:
    return request.app.state.keys  # type: ignore[no-any-return]


async def _metrics(request: Request) -> IngestMetrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


#: Methods a read-scoped token may use: they change nothing.
_SAFE_METHODS = frozenset({"GET", "HEAD"})


def _unauthorized(error: str, message: str, challenge: str = "Bearer") -> ApiError:
    return ApiError(401, error, message, "Authorization", {"WWW-Authenticate": challenge})


def authenticate(ingest: IngestSettings, authorization: str, method: str, signed: tokens.VerifiedTokens) -> str:
    """The tenant of the request's bearer token; ApiError 401 (no, unknown or bad token) or 403 (read scope).

    ``authorization`` is the raw Authorization header ("" when absent). Shared by the FastAPI dependency
    and the lean submit handler (eventflow_ingest.submit), so both answer alike.
    """
    if not ingest.tokens and not ingest.hmac_keys:
        if ingest.allow_anonymous:
            return "default"
        raise _unauthorized("unauthorized", "no tokens configured and anonymous access is off")
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise _unauthorized("unauthorized", "a bearer token is required")
    if ingest.hmac_keys and tokens.is_signed(presented):
        try:
            claims = signed.verify(presented)
        except tokens.TokenRejected as exc:
            raise _unauthorized(exc.reason, f"bearer token rejected: {exc}", 'Bearer error="invalid_token"') from None
        # Authenticated but not allowed to change anything: 403, so the client does not retry with the same token.
        if claims.scope is tokens.Scope.read and method not in _SAFE_METHODS:
            raise ApiError(403, "insufficient_scope", f"a {claims.scope} token cannot {method} this resource",
                           "Authorization", {"WWW-Authenticate": 'Bearer error="insufficient_scope"'})
        return claims.tenant
    tenant = None
    # Compare against every token in constant time so timing reveals neither which nor how much matched.
    for token, owner in ingest.tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            tenant = owner
    if tenant is None:
        raise _unauthorized("unauthorized", "unknown bearer token")
    return tenant


async def _tenant(request: Request) -> str:
    state = request.app.state
    return authenticate(state.settings.ingest, request.headers.get("authorization", ""), request.method,
                        state.signed_tokens)


SettingsDep = Annotated[EventflowSettings, Depends(_settings)]
FunctionsDep = Annotated[Functions, Depends(_functions)]
KeysDep = Annotated[Keys, Depends(_keys)]
MetricsDep = Annotated[IngestMetrics, Depends(_metrics)]
TenantDep = Annotated[str, Depends(_tenant)]
