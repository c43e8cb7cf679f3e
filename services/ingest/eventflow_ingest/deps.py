"""FastAPI dependencies: settings, Redis functions, and the tenant taken from the bearer token."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from eventflow.keys import Keys
from eventflow.metrics import IngestMetrics
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings
from eventflow_ingest.errors import ApiError


def _settings(request: Request) -> EventflowSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _functions(request: Request) -> Functions:
    return request.app.state.functions  # type: ignore[no-any-return]


def _keys(request: Request) -> Keys:
    return request.app.state.keys  # type: ignore[no-any-return]


def _metrics(request: Request) -> IngestMetrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


def _tenant(request: Request) -> str:
    settings: EventflowSettings = request.app.state.settings
    tokens = settings.ingest.tokens
    header = request.headers.get("authorization", "")
    if not tokens:
        if settings.ingest.allow_anonymous:
            return "default"
        raise ApiError(401, "unauthorized", "no tokens configured and anonymous access is off",
                       "Authorization", {"WWW-Authenticate": "Bearer"})
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "unauthorized", "a bearer token is required", "Authorization",
                       {"WWW-Authenticate": "Bearer"})
    tenant = None
    # Compare against every token in constant time so timing reveals neither which nor how much matched.
    for token, owner in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            tenant = owner
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown bearer token", "Authorization",
                       {"WWW-Authenticate": "Bearer"})
    return tenant


SettingsDep = Annotated[EventflowSettings, Depends(_settings)]
FunctionsDep = Annotated[Functions, Depends(_functions)]
KeysDep = Annotated[Keys, Depends(_keys)]
MetricsDep = Annotated[IngestMetrics, Depends(_metrics)]
TenantDep = Annotated[str, Depends(_tenant)]
