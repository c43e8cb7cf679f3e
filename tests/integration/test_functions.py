"""The Function library on a real server: admission, leases, fencing, owner-checked ack, DLQ, reaping."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from eventflow.contract import NdviJobRequest, now_ms
from eventflow.errors import EpochMismatch, LostLease
from eventflow.keys import Keys
from eventflow.redis.client import bootstrap
from eventflow.redis.functions import (
    Backpressure,
    CommitAck,
    Fenced,
    Functions,
    IdempotencyConflict,
    NotOwner,
    library_version,
)
from tests.jobs import entry_for

REQ = {"farm_id": "farm-1", "inputs": {"href": "file:///tmp/x.tif", "red_band": 1, "nir_band": 2}}


async def submit(functions: Functions, body: dict | None = None, tenant: str = "t", **kw: object):
    entry = entry_for(NdviJobRequest.model_validate(body or REQ), tenant)
    return await functions.submit_job(job_id=entry.job_id, request_hash=entry.request_hash, tenant=tenant,
                                      entry_fields=entry.to_fields(), max_backlog=kw.pop("max_backlog", 1000), **kw)


async def test_version_matches_source(functions: Functions) -> None:
    assert await functions.version() == library_version()


async def test_submit_is_idempotent_per_tenant(functions: Functions, redis: Redis, keys: Keys) -> None:
    first = await submit(functions)
    again = await submit(functions)
    other_tenant = await submit(functions, tenant="u")
    assert first.created and not again.created and other_tenant.created
    assert again.job_id == first.job_id and other_tenant.job_id != first.job_id
    assert await redis.xlen(keys.job_stream) == 2
    state = await redis.hgetall(keys.job_state(first.job_id))
    assert state["state"] == "queued" and state["entry_id"] == first.entry_id
    events = await redis.xrange(keys.event_stream)
    assert [e[1]["type"] for e in events] == ["queued", "queued"]


async def test_concurrent_identical_submits_make_one_entry(functions: Functions, redis: Redis, keys: Keys) -> None:
    results = await asyncio.gather(*[submit(functions) for _ in range(50)])
    assert len({r.job_id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert await redis.xlen(keys.job_stream) == 1


async def test_idempotency_key(functions: Functions, redis: Redis, keys: Keys) -> None:
    a = await submit(functions, idempotency_key="k1")
    b = await submit(functions, idempotency_key="k1")
    assert a.job_id == b.job_id and not b.created
    other = {**REQ, "farm_id": "farm-2"}
    with pytest.raises(IdempotencyConflict):
        await submit(functions, other, idempotency_key="k1")
    assert await redis.xlen(keys.job_stream) == 1


async def test_backlog_bound_refuses_without_writing(functions: Functions, redis: Redis, keys: Keys) -> None:
    for i in range(3):
        await submit(functions, {**REQ, "farm_id": f"farm-{i}"}, max_backlog=3)
    with pytest.raises(Backpressure) as info:
        await submit(functions, {**REQ, "farm_id": "farm-9"}, max_backlog=3)
    assert info.value.backlog == 3
    assert await redis.xlen(keys.job_stream) == 3
    # Pending entries count toward the backlog too; acked ones do not.
    rows = await redis.xreadgroup(keys.group, "c1", {keys.job_stream: ">"}, count=3)
    assert len(rows[0][1]) == 3
    with pytest.raises(Backpressure):
        await submit(functions, {**REQ, "farm_id": "farm-9"}, max_backlog=3)
    await functions.ack_entry(rows[0][1][0][0], "c1", None, None)
    assert (await submit(functions, {**REQ, "farm_id": "farm-9"}, max_backlog=3)).created


async def test_wiped_server_is_refused(functions: Functions, redis: Redis, keys: Keys) -> None:
    await redis.delete(keys.epoch)
    with pytest.raises(EpochMismatch):
        await submit(functions)
    assert await redis.xlen(keys.job_stream) == 0
    # bootstrap refuses too when EventFlow streams exist without the epoch (partly wiped server)
    await redis.xadd(keys.event_stream, {"type": "queued"})
    with pytest.raises(EpochMismatch):
        await bootstrap(redis, keys)


async def lease(functions: Functions, h: str = "h1", job: str = "j1", token: str = "tok", ttl: int = 10_000) -> int:
    return await functions.acquire_lease(h, job, token, ttl, {"job_id": job})


async def test_lease_is_exclusive_and_fencing_increases(functions: Functions, redis: Redis, keys: Keys) -> None:
    assert await lease(functions, token="a", ttl=200) == 1
    assert await lease(functions, token="b") == 0
    assert not await functions.renew_lease("h1", "b", 1000)
    assert await functions.renew_lease("h1", "a", 200)
    await asyncio.sleep(0.3)
    assert await lease(functions, token="b") == 2
    assert not await functions.release_lease("h1", "a")
    assert await functions.release_lease("h1", "b")
    assert await redis.hget(keys.job_state("j1"), "attempts") == "2"


async def test_zombie_commit_is_refused(functions: Functions, redis: Redis, keys: Keys) -> None:
    zombie = await lease(functions, token="zombie", ttl=100)
    await asyncio.sleep(0.2)  # the zombie's lease expires while it is paused
    fresh = await lease(functions, token="fresh")
    assert fresh > zombie
    with pytest.raises(LostLease):
        await functions.commit_result("h1", "j1", "zombie", zombie, '{"who":"zombie"}', {})
    assert await functions.commit_result("h1", "j1", "fresh", fresh, '{"who":"fresh"}', {}) == "committed"
    assert await redis.hget(keys.result("h1"), "fence") == str(fresh)
    # Even a zombie that somehow holds the current lease token cannot commit an older fence.
    await redis.delete(keys.result("h1"))
    with pytest.raises(Fenced):
        await functions.commit_result("h1", "j1", "fresh", zombie, "{}", {})
    assert not await redis.exists(keys.result("h1"))


async def test_negative_control_an_unfenced_commit_lets_the_zombie_win(functions: Functions, redis: Redis,
                                                                          keys: Keys) -> None:
    """The zombie scenario without the fenced commit: plain writes in wake-up order leave the stale result."""
    zombie = await lease(functions, token="zombie", ttl=100)
    await asyncio.sleep(0.2)
    fresh = await lease(functions, token="fresh")
    await redis.hset(keys.result("h1"), mapping={"fence": fresh, "json": '{"who":"fresh"}'})  # fresh commits
    await redis.hset(keys.result("h1"), mapping={"fence": zombie, "json": '{"who":"zombie"}'})  # zombie wakes
    assert await redis.hget(keys.result("h1"), "json") == '{"who":"zombie"}'  # the hazard the function closes


async def test_negative_control_without_the_result_check_a_redelivery_runs_again(functions: Functions,
                                                                                  redis: Redis, keys: Keys) -> None:
    """Killed between commit and ack: the lease is gone, so a bare SET NX lets the redelivery run the job a
    second time; eventflow_acquire_lease answers -2 (acked, not re-run) instead."""
    fence = await lease(functions, token="first", ttl=100)
    assert await functions.commit_result("h1", "j1", "first", fence, "{}", {}) == "committed"
    await asyncio.sleep(0.2)  # the killed worker's lease expires; its entry is redelivered
    assert await redis.set(keys.lease("h1"), "second", nx=True, px=10_000)  # the naive path: run again
    await redis.delete(keys.lease("h1"))
    assert await lease(functions, token="second") == -2


async def test_commit_is_once_only(functions: Functions, redis: Redis, keys: Keys) -> None:
    fence = await lease(functions, token="a")
    assert await functions.commit_result("h1", "j1", "a", fence, '{"n":1}', {}) == "committed"
    assert await functions.commit_result("h1", "j1", "a", fence, '{"n":2}', {}) == "exists"
    assert await redis.hget(keys.result("h1"), "json") == '{"n":1}'
    assert await redis.hget(keys.job_state("j1"), "state") == "succeeded"
    await functions.release_lease("h1", "a")
    # A later delivery of the same request learns at lease time that there is nothing to run.
    assert await functions.acquire_lease("h1", "j1", "b", 10_000, {}) == -2
    assert not await redis.exists(keys.lease("h1"))


async def test_ack_checks_owner_and_lease(functions: Functions, redis: Redis, keys: Keys) -> None:
    sub = await submit(functions)
    await redis.xreadgroup(keys.group, "old", {keys.job_stream: ">"}, count=1)
    # The reaper hands the entry to "new"; the old owner (a zombie) must not be able to ack it.
    await redis.xclaim(keys.job_stream, keys.group, "new", 0, [sub.entry_id])
    with pytest.raises(NotOwner):
        await functions.ack_entry(sub.entry_id, "old", None, None)
    assert (await redis.xpending(keys.job_stream, keys.group))["pending"] == 1
    fence = await lease(functions, token="tok")
    assert fence >= 1
    with pytest.raises(LostLease):
        await functions.ack_entry(sub.entry_id, "new", "h1", "other-token")
    assert await redis.get(keys.lease("h1")) == "tok"
    assert await functions.ack_entry(sub.entry_id, "new", "h1", "tok")
    assert not await redis.exists(keys.lease("h1"))  # the owner's ack released the lease with it
    assert not await functions.ack_entry(sub.entry_id, "new", "h1", "tok")


async def read_as(redis: Redis, keys: Keys, consumer: str, n: int) -> list[str]:
    rows = await redis.xreadgroup(keys.group, consumer, {keys.job_stream: ">"}, count=n)
    return [entry_id for _, entries in rows for entry_id, _ in entries]


async def pending_for(redis: Redis, keys: Keys) -> dict[str, str]:
    rows = await redis.xpending_range(keys.job_stream, keys.group, min="-", max="+", count=100)
    return {row["message_id"]: row["consumer"] for row in rows}


async def test_commit_and_ack_acks_only_what_it_committed(functions: Functions, redis: Redis, keys: Keys) -> None:
    sub = await submit(functions)
    h = NdviJobRequest.model_validate(REQ).hash_for("t")
    [entry_id] = await read_as(redis, keys, "c1", 1)
    zombie = await functions.acquire_lease(h, sub.job_id, "zombie", 100, {})
    await asyncio.sleep(0.2)  # the zombie's lease expires while it is paused
    fresh = await functions.acquire_lease(h, sub.job_id, "fresh", 10_000, {})
    with pytest.raises(LostLease):
        await functions.commit_and_ack(entry_id, "c1", h, sub.job_id, "zombie", zombie, '{"who":"zombie"}', {})
    await redis.set(keys.lease(h), "zombie")  # even holding the lease token, an older fence is refused
    with pytest.raises(Fenced):
        await functions.commit_and_ack(entry_id, "c1", h, sub.job_id, "zombie", zombie, '{"who":"zombie"}', {})
    assert not await redis.exists(keys.result(h))
    assert await pending_for(redis, keys) == {entry_id: "c1"}  # a refused commit is never acked
    assert await redis.get(keys.lease(h)) == "zombie"  # nor does it release the lease
    await redis.set(keys.lease(h), "fresh")
    done = await functions.commit_and_ack(entry_id, "c1", h, sub.job_id, "fresh", fresh, '{"who":"fresh"}', {})
    assert done == CommitAck("committed", True, None)
    assert await redis.hget(keys.result(h), "fence") == str(fresh)
    assert await pending_for(redis, keys) == {}
    assert not await redis.exists(keys.lease(h))
    # A retry of the same call (reply lost) finds the result and nothing left to ack.
    again = await functions.commit_and_ack(entry_id, "c1", h, sub.job_id, "fresh", fresh, "{}", {})
    assert again == CommitAck("exists", False, None)
    assert await redis.hget(keys.result(h), "json") == '{"who":"fresh"}'


async def batch_of_three(functions: Functions, redis: Redis, keys: Keys,
                         first: int = 0) -> list[tuple[str, str, str, int]]:
    """Three submitted jobs read by consumer c1, each leased: (job id, hash, entry id, fence)."""
    out = []
    for i in range(first, first + 3):
        body = {**REQ, "farm_id": f"farm-{i}"}
        sub = await submit(functions, body)
        out.append((sub.job_id, NdviJobRequest.model_validate(body).hash_for("t")))
    entry_ids = await read_as(redis, keys, "c1", 3)
    return [(job_id, h, entry_id, await functions.acquire_lease(h, job_id, f"tok-{h}", 10_000, {}))
            for (job_id, h), entry_id in zip(out, entry_ids, strict=True)]


def count_pipelines(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record each pipeline the client opens (to show a batch went out as one round trip)."""
    opened: list[int] = []
    real = redis.pipeline

    def pipeline(*args: object, **kw: object):  # type: ignore[no-untyped-def]
        opened.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(redis, "pipeline", pipeline)
    return opened


async def test_batched_commits_one_refused_is_not_acked_the_others_are(
        functions: Functions, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = await batch_of_three(functions, redis, keys)
    _, lost_hash, lost_entry, _ = jobs[1]
    await redis.set(keys.lease(lost_hash), "someone-else")  # job 1's lease was lost while it ran
    batched = Functions(redis, keys, batch=True)
    opened = count_pipelines(redis, monkeypatch)
    replies = await asyncio.gather(
        *(batched.commit_and_ack(entry_id, "c1", h, job_id, f"tok-{h}", fence, f'{{"job":"{job_id}"}}', {})
          for job_id, h, entry_id, fence in jobs), return_exceptions=True)
    assert opened == [1]  # one round trip for the whole batch
    assert replies[0] == CommitAck("committed", True, None) and replies[2] == CommitAck("committed", True, None)
    assert isinstance(replies[1], LostLease)
    assert await pending_for(redis, keys) == {lost_entry: "c1"}  # only the refused job is still pending
    assert [bool(await redis.exists(keys.result(h))) for _, h, _, _ in jobs] == [True, False, True]
    assert await redis.get(keys.lease(lost_hash)) == "someone-else"
    assert await redis.hget(keys.job_state(jobs[1][0]), "state") == "running"


async def test_batched_acks_refuse_entries_owned_by_another_consumer(
        functions: Functions, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = await batch_of_three(functions, redis, keys)
    taken = jobs[1][2]
    await redis.xclaim(keys.job_stream, keys.group, "c2", 0, [taken])  # the reaper gave it to c2
    batched = Functions(redis, keys, batch=True)
    opened = count_pipelines(redis, monkeypatch)
    replies = await asyncio.gather(
        *(batched.commit_and_ack(entry_id, "c1", h, job_id, f"tok-{h}", fence, "{}", {})
          for job_id, h, entry_id, fence in jobs))
    assert opened == [1]
    assert [r.acked for r in replies] == [True, False, True]
    assert replies[1] == CommitAck("committed", False, "c2")  # committed under its lease, but not c1's to ack
    assert await pending_for(redis, keys) == {taken: "c2"}
    # The no-token acks (result already there, job cancelled) are batched and owner-checked the same way.
    more = await batch_of_three(functions, redis, keys, first=3)
    await redis.xclaim(keys.job_stream, keys.group, "c2", 0, [more[0][2]])
    acks = await asyncio.gather(*(batched.ack_entry(entry_id, "c1", None, None) for _, _, entry_id, _ in more),
                                return_exceptions=True)
    assert isinstance(acks[0], NotOwner) and acks[1:] == [True, True]
    assert await pending_for(redis, keys) == {taken: "c2", more[0][2]: "c2"}


async def test_raw_xack_control_shows_the_hazard(functions: Functions, redis: Redis, keys: Keys) -> None:
    """Negative control: a raw XACK from the old owner silently drops the new owner's entry."""
    sub = await submit(functions)
    await redis.xreadgroup(keys.group, "old", {keys.job_stream: ">"}, count=1)
    await redis.xclaim(keys.job_stream, keys.group, "new", 0, [sub.entry_id])
    assert await redis.xack(keys.job_stream, keys.group, sub.entry_id) == 1
    assert (await redis.xpending(keys.job_stream, keys.group))["pending"] == 0


async def test_dead_letter_is_atomic_and_once(functions: Functions, redis: Redis, keys: Keys) -> None:
    sub = await submit(functions)
    await redis.xreadgroup(keys.group, "c1", {keys.job_stream: ">"}, count=1)
    await functions.schedule_retry(sub.entry_id, sub.job_id, "transient", "boom 1", now_ms() + 60_000, {})
    await functions.schedule_retry(sub.entry_id, sub.job_id, "transient", "boom 2", now_ms() + 60_000, {})
    assert await redis.zscore(keys.retry_schedule, sub.entry_id) is not None
    results = await asyncio.gather(*[functions.dead_letter(sub.entry_id, job_id=sub.job_id, request_hash="h")
                                     for _ in range(5)])
    assert len([r for r in results if r]) == 1
    dlq = await redis.xrange(keys.dead_letter_stream)
    assert len(dlq) == 1
    record = dlq[0][1]
    assert record["original_entry_id"] == sub.entry_id
    assert record["failure_class"] == "transient" and record["failure_message"] == "boom 2"
    assert int(record["first_failure_ms"]) <= int(record["last_failure_ms"])
    assert '"job_id"' in record["payload"] and record["delivery_count"] == "1"
    assert (await redis.xpending(keys.job_stream, keys.group))["pending"] == 0
    assert await redis.hget(keys.job_state(sub.job_id), "state") == "dead_lettered"
    assert await redis.zscore(keys.retry_schedule, sub.entry_id) is None


async def test_dead_letter_respects_minimum_deliveries(functions: Functions, redis: Redis, keys: Keys) -> None:
    sub = await submit(functions)
    await redis.xreadgroup(keys.group, "c1", {keys.job_stream: ">"}, count=1)
    assert await functions.dead_letter(sub.entry_id, min_deliveries=2) is None
    await redis.xclaim(keys.job_stream, keys.group, "c2", 0, [sub.entry_id])
    assert await functions.dead_letter(sub.entry_id, min_deliveries=2)


async def test_reap_consumer_only_when_dead_and_empty(functions: Functions, redis: Redis, keys: Keys) -> None:
    sub = await submit(functions)
    await redis.xreadgroup(keys.group, "dead", {keys.job_stream: ">"}, count=1)
    await functions.consumer_heartbeat("alive", 60_000, "1")
    assert not await functions.reap_consumer("dead")  # still owns a pending entry
    assert not await functions.reap_consumer("alive")  # heartbeat present
    await functions.ack_entry(sub.entry_id, "dead", None, None)
    assert await functions.reap_consumer("dead")
    names = {c["name"] for c in await redis.xinfo_consumers(keys.job_stream, keys.group)}
    assert names == {"alive"}


async def test_cancel(functions: Functions, redis: Redis, keys: Keys) -> None:
    sub = await submit(functions)
    assert await functions.cancel_job(sub.job_id) == "cancelled"
    assert await functions.cancel_job(sub.job_id) == "cancelled"
    assert await functions.cancel_job("nope") == ""
    h = await redis.hget(keys.job_state(sub.job_id), "request_hash")
    assert await functions.acquire_lease(h, sub.job_id, "t", 1000, {}) == -1


async def test_cancel_releases_the_dedupe_key_so_the_request_runs_again(functions: Functions, redis: Redis,
                                                                        keys: Keys) -> None:
    first = await submit(functions)
    assert (await submit(functions)).job_id == first.job_id  # a duplicate while queued
    assert await functions.cancel_job(first.job_id) == "cancelled"
    again = await submit(functions)
    assert again.created and again.job_id != first.job_id  # a new job, a second stream entry
    assert await redis.xlen(keys.job_stream) == 2
    assert (await submit(functions)).job_id == again.job_id  # which then dedupes as usual
    assert await redis.hget(keys.job_state(first.job_id), "state") == "cancelled"


async def test_cancel_releases_only_its_own_dedupe_key(functions: Functions, redis: Redis, keys: Keys) -> None:
    """A cancel called with another request's hash (a stale or forged caller) must not free that request."""
    victim = await submit(functions, {**REQ, "farm_id": "farm-victim"})
    target = await submit(functions)
    victim_hash = await redis.hget(keys.job_state(victim.job_id), "request_hash")
    reply = await functions.redis.fcall("eventflow_cancel_job", 3, keys.job_state(target.job_id), keys.event_stream,
                                        keys.dedupe(victim_hash), "1", "100", victim_hash)
    assert reply == "cancelled"
    assert await redis.get(keys.dedupe(victim_hash)) == victim.job_id


async def pending_row(redis: Redis, keys: Keys, entry_id: str) -> dict:
    rows = await redis.xpending_range(keys.job_stream, keys.group, min=entry_id, max=entry_id, count=1)
    return rows[0] if rows else {}


async def test_heartbeat_resets_idle_without_counting_a_delivery(functions: Functions, redis: Redis,
                                                                 keys: Keys) -> None:
    sub = await submit(functions)
    h = await redis.hget(keys.job_state(sub.job_id), "request_hash")
    await redis.xreadgroup(keys.group, "w1", {keys.job_stream: ">"}, count=1)
    assert await functions.acquire_lease(h, sub.job_id, "tok", 1000, {}) == 1
    await asyncio.sleep(0.15)
    assert (await pending_row(redis, keys, sub.entry_id))["time_since_delivered"] >= 150
    assert await functions.heartbeat_job(sub.entry_id, "w1", h, "tok", 1000) == 1
    row = await pending_row(redis, keys, sub.entry_id)
    assert row["time_since_delivered"] < 100 and row["times_delivered"] == 1
    # A zombie (wrong token, or no longer the owner) gets a refusal and changes nothing.
    assert await functions.heartbeat_job(sub.entry_id, "w1", h, "other", 1000) == 0
    await redis.xclaim(keys.job_stream, keys.group, "w2", 0, [sub.entry_id])
    assert await functions.heartbeat_job(sub.entry_id, "w1", h, "tok", 1000) == -1
    assert (await pending_row(redis, keys, sub.entry_id))["consumer"] == "w2"


async def test_reclaim_entry_rules(functions: Functions, redis: Redis, keys: Keys) -> None:
    sub = await submit(functions)
    await redis.xreadgroup(keys.group, "dead", {keys.job_stream: ">"}, count=1)
    assert await functions.reclaim_entry(sub.entry_id, "h1", "live", 60_000, force=False, max_deliveries=3) == "busy"
    await functions.schedule_retry(sub.entry_id, sub.job_id, "IOError", "flaky", now_ms() + 60_000, {})
    assert await functions.reclaim_entry(sub.entry_id, "h1", "live", 0, force=True, max_deliveries=3) == "scheduled"
    await redis.zadd(keys.retry_schedule, {sub.entry_id: now_ms() - 1})
    assert await functions.reclaim_entry(sub.entry_id, "h1", "live", 60_000, force=True, max_deliveries=3) == "claimed"
    row = await pending_row(redis, keys, sub.entry_id)
    assert (row["consumer"], row["times_delivered"]) == ("live", 2)  # the re-delivery counts
    assert await redis.zscore(keys.retry_schedule, sub.entry_id) is None
    # While a worker still holds the request's lease, re-delivering would only burn a delivery.
    assert await lease(functions, h="h1", token="w") >= 1
    assert await functions.reclaim_entry(sub.entry_id, "h1", "other", 0, force=False, max_deliveries=3) == "leased"
    assert await functions.release_lease("h1", "w")
    assert await functions.reclaim_entry(sub.entry_id, "h1", "other", 0, force=False, max_deliveries=3) == "claimed"
    assert await functions.reclaim_entry(sub.entry_id, "h1", "other", 0, force=False, max_deliveries=3) == "ceiling"
    await functions.ack_entry(sub.entry_id, "other", None, None)
    assert await functions.reclaim_entry(sub.entry_id, "h1", "other", 0, force=False, max_deliveries=3) == "gone"


async def test_reclaim_records_deleted_entries_as_lost(functions: Functions, redis: Redis, keys: Keys) -> None:
    sub = await submit(functions)
    await redis.xreadgroup(keys.group, "dead", {keys.job_stream: ">"}, count=1)
    await redis.xdel(keys.job_stream, sub.entry_id)
    assert await functions.reclaim_entry(sub.entry_id, "h1", "live", 0, force=False, max_deliveries=3) == "lost"
    [(_, record)] = await redis.xrange(keys.dead_letter_stream)
    assert record["failure_class"] == "lost" and record["original_entry_id"] == sub.entry_id
    assert await pending_row(redis, keys, sub.entry_id) == {}
