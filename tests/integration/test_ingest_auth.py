"""Signed bearer tokens on the real ingest (uvicorn) and Redis: tenants, scopes, and rejections that write nothing."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from eventflow import tokens
from eventflow.cli import main
from eventflow.keys import Keys
from tests.integration.test_ingest import api, body, snapshot

__all__ = ["api"]  # re-exported so pytest finds the fixture in this module too

KEYS = {"live": "L" * 32, "next": "N" * 48}
STATIC = {"static-token-0123456789": "tenant-static"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def signed_api(api: Any) -> httpx.AsyncClient:
    return await api(ingest={"hmac_keys": KEYS, "tokens": STATIC, "allow_anonymous": False})


def cli_token(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """A token from `eventflow token`, with the keys in the environment as an operator would set them."""
    monkeypatch.setenv("EVENTFLOW_INGEST__HMAC_KEYS", json.dumps(KEYS))
    assert main(["token", *argv]) == 0
    return capsys.readouterr().out.strip()


async def test_cli_token_submits_for_its_tenant_only(api: Any, redis: Redis, keys: Keys,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    client = await signed_api(api)
    acme = cli_token(monkeypatch, capsys, "--key-id", "live", "--tenant", "acme", "--ttl-s", "300")
    other = cli_token(monkeypatch, capsys, "--key-id", "next", "--tenant", "globex", "--ttl-s", "300")
    first = await client.post("/v1/ndvi/jobs", json=body(), headers=bearer(acme))
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    assert (await redis.hget(keys.job_state(job_id), "tenant")) == "acme"
    # Dedupe is per tenant: the same request from another tenant (other key) is a new job.
    second = await client.post("/v1/ndvi/jobs", json=body(), headers=bearer(other))
    assert second.status_code == 202 and second.json()["job_id"] != job_id
    assert (await client.post("/v1/ndvi/jobs", json=body(), headers=bearer(acme))).status_code == 200
    # Static tokens keep working next to signed ones.
    static = await client.post("/v1/ndvi/jobs", json=body(), headers=bearer(next(iter(STATIC))))
    assert static.status_code == 202
    assert (await client.get(f"/v1/ndvi/jobs/{job_id}", headers=bearer(acme))).status_code == 200
    assert (await client.get(f"/v1/ndvi/jobs/{job_id}", headers=bearer(other))).status_code == 404
    assert await redis.xlen(keys.job_stream) == 3


def _tampered_claims() -> str:
    version, key_id, _, signature = tokens.mint(KEYS, "live", "acme", 300).split(".")
    claims = json.dumps({"tenant": "globex", "exp": int(time.time()) + 300}).encode()
    return f"{version}.{key_id}.{base64.urlsafe_b64encode(claims).rstrip(b'=').decode()}.{signature}"


REJECTED = {
    "expired": (lambda: tokens.mint(KEYS, "live", "acme", 60, now_s=int(time.time()) - 61), "token_expired"),
    "unknown key id": (lambda: tokens.mint({"gone": "G" * 32}, "gone", "acme", 300), "unknown_key"),
    "other secret, same key id": (lambda: tokens.mint({"live": "X" * 32}, "live", "acme", 300), "bad_signature"),
    "claims changed after signing": (_tampered_claims, "bad_signature"),
    "not a token": (lambda: "ef1.live.e30.nope", "malformed_token"),
    "unknown static token": (lambda: "static-token-guess", "unauthorized"),
}


@pytest.mark.parametrize("case", REJECTED)
async def test_rejected_token_is_401_naming_authorization_and_writes_nothing(api: Any, redis: Redis, keys: Keys,
                                                                              case: str) -> None:
    client = await signed_api(api)
    make, error = REJECTED[case]
    before = await snapshot(redis, keys)
    reply = await client.post("/v1/ndvi/jobs", json=body(farm_id="farm-rejected"), headers=bearer(make()))
    assert reply.status_code == 401, reply.text
    assert reply.json()["field"] == "Authorization" and reply.json()["error"] == error, reply.json()
    assert reply.headers["www-authenticate"].startswith("Bearer")
    assert await snapshot(redis, keys) == before


async def test_missing_token_is_401_when_only_signed_tokens_are_configured(api: Any, redis: Redis,
                                                                           keys: Keys) -> None:
    client = await api(ingest={"hmac_keys": KEYS, "allow_anonymous": False})
    before = await snapshot(redis, keys)
    for headers in ({}, {"Authorization": "Basic dXNlcjpwdw=="}, bearer(next(iter(STATIC)))):
        reply = await client.post("/v1/ndvi/jobs", json=body(), headers=headers)
        assert reply.status_code == 401 and reply.json()["field"] == "Authorization", reply.text
    assert await snapshot(redis, keys) == before


async def test_read_scope_reads_but_cannot_submit_or_cancel(api: Any, redis: Redis, keys: Keys) -> None:
    client = await signed_api(api)
    writer = tokens.mint(KEYS, "live", "acme", 300)
    reader = tokens.mint(KEYS, "live", "acme", 300, tokens.Scope.read)
    job_id = (await client.post("/v1/ndvi/jobs", json=body(), headers=bearer(writer))).json()["job_id"]
    assert (await client.get(f"/v1/ndvi/jobs/{job_id}", headers=bearer(reader))).json()["state"] == "queued"
    before = await snapshot(redis, keys)
    submit = await client.post("/v1/ndvi/jobs", json=body(farm_id="farm-read"), headers=bearer(reader))
    assert submit.status_code == 403, submit.text
    assert submit.json()["error"] == "insufficient_scope" and submit.json()["field"] == "Authorization"
    cancel = await client.delete(f"/v1/ndvi/jobs/{job_id}", headers=bearer(reader))
    assert cancel.status_code == 403 and cancel.json()["error"] == "insufficient_scope"
    assert await snapshot(redis, keys) == before
    assert await redis.hget(keys.job_state(job_id), "state") == "queued"
