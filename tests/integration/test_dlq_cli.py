"""`eventflow dlq list|show|replay|purge` against a real Redis."""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis

from eventflow.cli import main
from eventflow.embedded import EmbeddedServer
from eventflow.keys import Keys
from eventflow.redis.functions import Functions
from tests.integration.test_consumer import enqueue


async def dead_letter_all(functions: Functions, redis: Redis, keys: Keys, classes: list[str]) -> list[tuple]:
    jobs = await enqueue(functions, len(classes))
    await redis.xreadgroup(keys.group, "c", {keys.job_stream: ">"}, count=len(classes))
    for (job_id, h, entry_id), cls in zip(jobs, classes, strict=True):
        await functions.dead_letter(entry_id, job_id=job_id, request_hash=h, failure_class=cls, message=f"{cls}!")
    return jobs




@pytest.fixture(autouse=True)
def _redis_url(monkeypatch: pytest.MonkeyPatch, redis_server: EmbeddedServer) -> None:
    monkeypatch.setenv("EVENTFLOW_REDIS__URL", redis_server.url)


async def test_replay_keeps_the_hash_skips_succeeded_and_is_idempotent(
        functions: Functions, redis: Redis, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = await dead_letter_all(functions, redis, keys, ["input", "input", "poison"])
    (job_a, hash_a, _), (job_b, hash_b, _), _ = jobs
    await redis.hset(keys.result(hash_b), mapping={"fence": "1", "json": "{}"})  # b succeeded meanwhile
    code, rows, _ = await_cli(capsys, "list", "--failure-class", "input")
    assert code == 0 and {r["job_id"] for r in rows} == {job_a, job_b}
    before = await redis.xlen(keys.job_stream)
    code, rows, _ = await_cli(capsys, "replay", "--failure-class", "input", "--dry-run")
    assert code == 0 and {r["outcome"] for r in rows} == {"would_replay"}
    assert await redis.xlen(keys.job_stream) == before
    code, rows, _ = await_cli(capsys, "replay", "--failure-class", "input")
    outcomes = {r["job_id"]: r["outcome"] for r in rows}
    assert outcomes == {job_a: "replayed", job_b: "succeeded"}
    assert await redis.xlen(keys.job_stream) == before + 1
    new_id = next(r["detail"] for r in rows if r["job_id"] == job_a)
    [(_, fields)] = await redis.xrange(keys.job_stream, new_id, new_id)
    assert fields["request_hash"] == hash_a and fields["job_id"] == job_a and fields["replay_generation"] == "1"
    state = await redis.hgetall(keys.job_state(job_a))
    assert state["state"] == "queued" and state["entry_id"] == new_id and "error_class" not in state
    # Interrupted and run again: nothing is enqueued twice.
    code, rows, _ = await_cli(capsys, "replay", "--failure-class", "input")
    assert {r["outcome"] for r in rows} == {"already"}
    assert await redis.xlen(keys.job_stream) == before + 1


async def test_purge_needs_a_filter_and_deletes_only_matches(
        functions: Functions, redis: Redis, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = await dead_letter_all(functions, redis, keys, ["input", "poison"])
    code, _, err = await_cli(capsys, "purge")
    assert code == 2 and "--failure-class" in err
    code, rows, _ = await_cli(capsys, "purge", "--job-id", jobs[1][0])
    assert code == 0 and [r["outcome"] for r in rows] == ["purged"]
    remaining = [f["job_id"] for _, f in await redis.xrange(keys.dead_letter_stream)]
    assert remaining == [jobs[0][0]]


async def test_bad_time_filter_names_the_argument(functions: Functions, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = await_cli(capsys, "list", "--since", "yesterday-ish")
    assert code == 2 and "--since" in err


def await_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict], str]:
    """The CLI runs its own event loop, so call it from a worker thread of this test's loop."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        code = pool.submit(main, ["dlq", *argv]).result()
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err
