"""Job requests for tests: request bodies, their stream entries, enqueueing them, key-order variants.

Enqueueing goes through ``eventflow_submit_job`` like the ingest, but without the ingest's href vetting,
so tests can name inputs that do not exist or sit outside any data root.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from eventflow.contract import NdviJobRequest, StreamEntry, new_job_id, now_ms
from eventflow.redis.functions import Functions


def farm_body(farm_id: str, href: str = "file:///tmp/x.tif", red_band: int = 1, nir_band: int = 2) -> dict[str, Any]:
    """A one-raster NDVI request body for ``farm_id``."""
    return {"farm_id": farm_id, "inputs": {"href": href, "red_band": red_band, "nir_band": nir_band}}


def entry_for(request: NdviJobRequest, tenant: str = "t") -> StreamEntry:
    """The stream entry the ingest would write for ``request`` (new job id, trace id ``tr``)."""
    return StreamEntry(job_id=new_job_id(), request_hash=request.hash_for(tenant), tenant=tenant,
                       enqueued_at_ms=now_ms(), trace_id="tr", payload=request.normalized())


async def enqueue_bodies(functions: Functions, bodies: Iterable[dict[str, Any]],
                         tenant: str = "t") -> list[tuple[str, str, str]]:
    """Submit each body in order; returns (job id, request hash, entry id) per body."""
    out = []
    for body in bodies:
        entry = entry_for(NdviJobRequest.model_validate(body), tenant)
        sub = await functions.submit_job(job_id=entry.job_id, request_hash=entry.request_hash, tenant=tenant,
                                         entry_fields=entry.to_fields(), max_backlog=100_000)
        out.append((sub.job_id, entry.request_hash, sub.entry_id))
    return out


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's keys in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value
