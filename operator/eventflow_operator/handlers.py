"""kopf handlers for the EventFlow custom resources; run with ``kopf run -m eventflow_operator.handlers``."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from eventflow.settings import load_settings

GROUP = "eventflow.io"
VERSION = "v1alpha1"
FINALIZER = "eventflow.io/finalizer"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Set kopf's persistence explicitly and put EventFlow settings in ``memo``."""
    settings.persistence.finalizer = FINALIZER
    # Progress and diff-base live in our own annotations, so they survive kopf upgrades and are
    # namespaced apart from any other operator touching the same objects.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    memo.eventflow_settings = load_settings()


@kopf.on.resume(GROUP, VERSION, "ndvijobs", id="enqueue", retries=10, backoff=30, timeout=600)
@kopf.on.create(GROUP, VERSION, "ndvijobs", id="enqueue", retries=10, backoff=30, timeout=600)
def enqueue(
    name: str,
    namespace: str | None,
    uid: str,
    status: kopf.Status,
    patch: kopf.Patch,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Record a new NdviJob as Pending; putting it on the job stream lands with the operator issue."""
    if status.get("phase"):
        # Resumed after an operator restart: the phase was already recorded, keep it.
        return
    patch.status["phase"] = "Pending"
    logger.info("ndvijob accepted", extra={"ndvijob": f"{namespace}/{name}", "uid": uid})
