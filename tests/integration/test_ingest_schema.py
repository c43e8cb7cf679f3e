"""schemathesis against the live ingest's /openapi.json (uvicorn on 127.0.0.1, real Redis): no 5xx, and every
answer matches the documented status codes, content types, headers and response schemas."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from schemathesis import GenerationMode

from eventflow.keys import Keys
from tests.integration.test_ingest import SAMPLE, api, body

__all__ = ["api"]  # re-exported so pytest finds the fixture in this module too

pytestmark = pytest.mark.slow

TOKEN = "schema-test-token"
#: Per operation; about 3 ms each here, so the whole run stays well under a minute on 2 cores.
MAX_EXAMPLES = 400
#: Checks that do not apply to this API, and why:
#: - positive_data_acceptance: the schema cannot say that hrefs must lie under a data root or that
#:   red_band/nir_band are required without a sensor, so most schema-valid bodies are rightly a 422.
EXCLUDED = [schemathesis.checks.positive_data_acceptance]
REAL_HREF = (SAMPLE / "T33UUU_20170216T102101_B04.jp2").as_uri()


def with_real_inputs(value: Any) -> Any:
    """The generated body with every href pointing at the bundled sample, so vetting passes and the request
    goes all the way to Redis with whatever else was generated."""
    if isinstance(value, dict):
        return {k: REAL_HREF if k == "href" else with_real_inputs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [with_real_inputs(v) for v in value]
    return value


def fuzz(base_url: str, job_id: str) -> Counter[tuple[str, int]]:
    """Run every operation; raises schemathesis' failure group on the first problem. Returns what was seen."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    seen: Counter[tuple[str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)
        if "job_id" in operation.path:  # random ids only ever find nothing: also aim at a real job
            strategy |= operation.as_strategy(path_parameters={"job_id": job_id})

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy, real_inputs=st.booleans())
        def check(case: Any, real_inputs: bool) -> None:
            if real_inputs and isinstance(case.body, dict):
                case.body = with_real_inputs(case.body)
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            seen[(case.operation.label, response.status_code)] += 1
            case.validate_response(response, excluded_checks=EXCLUDED)

        check()
    return seen


async def test_schemathesis_finds_no_server_error(api: Any, redis: Redis, keys: Keys) -> None:
    client = await api(ingest={"tokens": {TOKEN: "tenant-fuzz"}, "allow_anonymous": False})
    job = await client.post("/v1/ndvi/jobs", json=body(), headers={"Authorization": f"Bearer {TOKEN}"})
    assert job.status_code == 202
    # schemathesis is synchronous; the server runs on this loop, so the fuzzer gets a thread.
    seen = await asyncio.to_thread(fuzz, str(client.base_url), job.json()["job_id"])
    assert not [key for key in seen if key[1] >= 500], seen
    # The run reached Redis: some generated bodies were admitted, and the real job was read and cancelled.
    assert seen[("POST /v1/ndvi/jobs", 202)] > 0, seen
    assert seen[("GET /v1/ndvi/jobs/{job_id}", 200)] > 0 and seen[("DELETE /v1/ndvi/jobs/{job_id}", 200)] > 0, seen
    assert await redis.xlen(keys.job_stream) == 1 + seen[("POST /v1/ndvi/jobs", 202)]

