"""The operator on a real kube-apiserver with a real redis-server: NdviJob submission, status mirroring,
refusal of invalid specs, restarts, deletion (with Redis up and down) and DlqReplay.

The operator runs in-process under ``kopf.testing.KopfRunner``, configured like the pod (EVENTFLOW_*
variables and a kubeconfig), watching only this module's ``op-*`` namespaces; the consumer is simulated
by calling the same Redis Functions a consumer calls.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from eventflow.admission import admit_job
from eventflow.contract import NdviJobRequest
from eventflow.embedded import EmbeddedServer
from eventflow.keys import Keys
from eventflow.redis.client import bootstrap, connect, functions_for, keys_for
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings, load_settings
from tests.conftest import wait_for
from tests.e2e.cluster.controlplane import CHART, Cluster, free_port

kopf_testing = pytest.importorskip("kopf.testing", reason="the operator extra (kopf) is not installed")
kubernetes = pytest.importorskip("kubernetes", reason="the 'kubernetes' Python package is not installed")

REPO = Path(__file__).resolve().parents[2]
NDVIJOB_SAMPLE = REPO / "k8s/ndvijob-sample.yaml"
GROUP, VERSION = "eventflow.io", "v1alpha1"
NS_PREFIX = "op-"
#: Where the chart's operator ServiceAccount lives (its release namespace).
OPERATOR_NS = "eventflow-operator-test"
#: What the operator pod gets from the chart's ConfigMap, with short intervals for the test.
OPERATOR_ENV = {
    "EVENTFLOW_NDVI__DATA_ROOTS": json.dumps(["/data"]),  # the sample's file:///data/... input
    "EVENTFLOW_OPERATOR__STATUS_INTERVAL_S": "0.2",
    "EVENTFLOW_OPERATOR__REDIS_RETRY_S": "0.2",
    "EVENTFLOW_OPERATOR__REDIS_ATTEMPTS": "3",
    "EVENTFLOW_REDIS__CONNECT_TIMEOUT_S": "0.5",
}

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


class Operator:
    """``eventflow operator`` in this process (KopfRunner), restartable."""

    def __init__(self) -> None:
        self.runner: Any = None
        self.outputs: list[str] = []

    def start(self) -> None:
        self.runner = kopf_testing.KopfRunner(
            ["run", "--standalone", "--namespace", f"{NS_PREFIX}*", "-m", "eventflow_operator.handlers"],
            timeout=60)
        self.runner.__enter__()

    def stop(self) -> None:
        runner, self.runner = self.runner, None
        runner.__exit__(None, None, None)
        self.outputs.append(runner.output)
        assert runner.exception is None, runner.output
        assert runner.exit_code == 0, runner.output

    def restart(self) -> None:
        self.stop()
        self.start()


def operator_kubeconfig(cluster: Cluster, path: Path) -> Path:
    """A kubeconfig for the chart's operator ServiceAccount, bound by the chart's own (Cluster)Role: the
    operator under test can do exactly what the chart lets it do, no more."""
    rendered = cluster.helm("template", "eventflow", str(CHART), "--namespace", OPERATOR_NS,
                            "--show-only", "templates/operator/serviceaccount.yaml",
                            "--show-only", "templates/operator/rbac.yaml").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    [account] = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    if cluster.kubectl("get", "namespace", OPERATOR_NS, check=False).returncode != 0:
        cluster.kubectl("create", "namespace", OPERATOR_NS)
    cluster.kubectl("apply", "-n", OPERATOR_NS, "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
    token = cluster.kubectl("create", "token", account, "-n", OPERATOR_NS, "--duration=1h").stdout.strip()
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def op_settings(redis_server: EmbeddedServer, k8s_cluster: Cluster,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[EventflowSettings]:
    """The operator's environment (set for the module), bootstrapped Redis, the project's CRDs."""
    k8s_cluster.install_crds("eventflow")
    kubeconfig = operator_kubeconfig(k8s_cluster, tmp_path_factory.mktemp("operator") / "kubeconfig")
    env = {**OPERATOR_ENV, "EVENTFLOW_REDIS__URL": redis_server.url, "KUBECONFIG": str(kubeconfig)}
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("KUBE")]:
            mp.delenv(name)
        for name, value in env.items():
            mp.setenv(name, value)
        # The kubernetes package reads $KUBECONFIG once, at import (already done by this module): what a
        # fresh operator process would see, it is told here. kopf logs in through the same loader.
        mp.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        settings = load_settings()

        async def boot() -> None:
            client = connect(settings)
            await client.flushall()
            await client.function_flush()
            await bootstrap(client, keys_for(settings))
            await client.aclose()

        asyncio.run(boot())
        yield settings


@pytest.fixture(scope="module")
def operator(op_settings: EventflowSettings) -> Iterator[Operator]:
    op = Operator()
    op.start()
    try:
        yield op
    finally:
        if op.runner is not None:
            op.stop()


@pytest.fixture
async def rclient(op_settings: EventflowSettings) -> AsyncIterator[Redis]:
    client = connect(op_settings)
    yield client
    await client.aclose()


@pytest.fixture
def fns(rclient: Redis, op_settings: EventflowSettings) -> Functions:
    return functions_for(rclient, op_settings)


@pytest.fixture
def keys(op_settings: EventflowSettings) -> Keys:
    return keys_for(op_settings)


@pytest.fixture(scope="module")
def api(k8s_cluster: Cluster) -> Iterator[Any]:
    client = kubernetes.config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    yield kubernetes.client.CustomObjectsApi(client)
    client.close()


@pytest.fixture
def ns(k8s_cluster: Cluster, operator: Operator) -> Iterator[str]:
    """A fresh namespace the operator watches (the tenant of its NdviJobs)."""
    name = f"{NS_PREFIX}{secrets.token_hex(4)}"
    k8s_cluster.kubectl("create", "namespace", name)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def sample() -> dict[str, Any]:
    return yaml.safe_load(NDVIJOB_SAMPLE.read_text())


def apply(cluster: Cluster, ns: str, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))


async def wait_status(api: Any, ns: str, plural: str, name: str, predicate: Callable[[dict[str, Any]], Any],
                      timeout_s: float = 15) -> dict[str, Any]:
    """Poll the object until predicate(status) holds; return the status."""
    seen: dict[str, Any] = {}

    def check() -> bool:
        nonlocal seen
        seen = api.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name).get("status") or {}
        return bool(predicate(seen))

    try:
        await wait_for(check, timeout_s=timeout_s, interval_s=0.1)
    except AssertionError:
        raise AssertionError(f"{plural}/{name} status never matched; last: {json.dumps(seen, indent=1)}") from None
    return seen


async def entries_of(redis: Redis, keys: Keys, *, job_id: str | None = None,
                     tenant: str | None = None) -> list[tuple[str, dict[str, str]]]:
    rows = await redis.xrange(keys.job_stream)
    return [(i, f) for i, f in rows if (job_id is None or f.get("job_id") == job_id)
            and (tenant is None or f.get("tenant") == tenant)]


def events(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    items = cluster.kubectl_json("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}")
    return items["items"]  # type: ignore[no-any-return]


def exists(cluster: Cluster, ns: str, kind: str, name: str) -> bool:
    return cluster.kubectl("get", "-n", ns, kind, name, check=False).returncode == 0


async def test_sample_is_submitted_once_and_its_status_follows_the_job(
        k8s_cluster: Cluster, api: Any, ns: str, rclient: Redis, fns: Functions, keys: Keys) -> None:
    doc = sample()
    name = doc["metadata"]["name"]
    apply(k8s_cluster, ns, doc)
    # Submitted by the create handler, then the mirror adds the job's state (the Finished condition).
    status = await wait_status(api, ns, "ndvijobs", name, lambda s: s.get("jobId") and s.get("phase") == "Queued"
                               and len(s.get("conditions", [])) == 2)

    obj = api.get_namespaced_custom_object(GROUP, VERSION, ns, "ndvijobs", name)
    [(entry_id, fields)] = await entries_of(rclient, keys, tenant=ns)
    request = NdviJobRequest.model_validate(doc["spec"])
    assert fields["job_id"] == status["jobId"]
    assert fields["tenant"] == ns  # tenant = namespace
    assert fields["request_hash"] == status["requestHash"] == request.hash_for(ns)
    payload = json.loads(fields["payload"])
    assert payload == request.normalized()
    assert payload["inputs"] == {"href": "file:///data/sentinel2/S2A_31UFT_20240601.tif", "red_band": 4, "nir_band": 8}
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Submitted": "True", "Finished": "False"}
    await wait_for(lambda: any(e["reason"] == "Submitted" for e in events(k8s_cluster, ns, name)), timeout_s=10)

    # The spec is immutable: the API server refuses a change, so nothing is resubmitted.
    changed = k8s_cluster.kubectl("patch", "-n", ns, "ndvijob", name, "--type=merge", "-p",
                                  '{"spec":{"priority":9}}', check=False)
    assert changed.returncode != 0 and "spec is immutable" in changed.stderr, changed.stderr

    # A consumer takes the job: lease, progress, fenced commit, owner-checked ack.
    job_id, request_hash, consumer, token = status["jobId"], status["requestHash"], "op-test", uuid.uuid4().hex
    delivered = await rclient.xreadgroup(keys.group, consumer, {keys.job_stream: ">"}, count=10_000)
    assert entry_id in [i for _, rows in delivered for i, _ in rows]
    fence = await fns.acquire_lease(request_hash, job_id, token, 60_000, {"consumer": consumer})
    assert fence >= 1
    await fns.report_progress(job_id, 0.5, {})
    await wait_status(api, ns, "ndvijobs", name, lambda s: s.get("phase") == "Running" and s.get("progress") == 0.5
                      and s.get("attempts") == 1)
    result = {"outputs": {"ndvi": "/out/ndvi-2024-06-01-f1.tif"},
              "stats": {"valid_count": 1000, "nodata_count": 24, "mean": 0.4321, "median": 0.45, "std": 0.12,
                        "min": -0.2, "max": 0.91, "vegetation_fraction": 0.61,
                        "histogram": {"edges": [-1, 1], "counts": [1000]}}}
    assert await fns.commit_result(request_hash, job_id, token, fence, json.dumps(result), {}) == "committed"
    assert await fns.ack_entry(entry_id, consumer, request_hash, token)
    status = await wait_status(api, ns, "ndvijobs", name, lambda s: s.get("phase") == "Succeeded")
    assert status["result"]["outputs"] == result["outputs"]
    assert status["result"]["stats"] == {k: v for k, v in result["stats"].items() if k != "histogram"}
    assert status["progress"] == 1 and status["message"] == "succeeded: NDVI mean 0.4321"
    assert {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]} == {
        "Submitted": ("True", "Enqueued"), "Finished": ("True", "Succeeded")}
    assert len(await entries_of(rclient, keys, tenant=ns)) == 1


async def test_invalid_spec_fails_naming_the_field_and_enqueues_nothing(
        k8s_cluster: Cluster, api: Any, ns: str, rclient: Redis, keys: Keys) -> None:
    bad_geojson = sample()
    bad_geojson["metadata"]["name"] = "bad-fields"
    bad_geojson["spec"]["fields"] = {"type": "Point", "coordinates": [0, 0]}  # passes the CRD, not the contract
    outside = sample()
    outside["metadata"]["name"] = "bad-href"
    outside["spec"]["inputs"]["href"] = "file:///etc/passwd"  # not under a data root
    apply(k8s_cluster, ns, bad_geojson)
    apply(k8s_cluster, ns, outside)
    for name, field in (("bad-fields", "spec.fields"), ("bad-href", "spec.inputs.href")):
        status = await wait_status(api, ns, "ndvijobs", name, lambda s: s.get("phase") == "Failed")
        assert status["message"].startswith(f"{field}: "), status
        assert "jobId" not in status
        [cond] = status["conditions"]
        assert (cond["type"], cond["status"], cond["reason"]) == ("Submitted", "False", "InvalidSpec")
        await wait_for(lambda name=name, field=field: [
            e for e in events(k8s_cluster, ns, name)
            if e["reason"] == "InvalidSpec" and e["type"] == "Warning" and field in e["message"]], timeout_s=10)
    assert await entries_of(rclient, keys, tenant=ns) == []
    # A refused object deletes at once (nothing to cancel).
    k8s_cluster.kubectl("delete", "-n", ns, "ndvijob", "bad-fields", "bad-href", "--timeout=20s")


async def test_operator_restart_never_adds_a_second_entry(
        k8s_cluster: Cluster, api: Any, ns: str, operator: Operator, rclient: Redis, keys: Keys) -> None:
    apply(k8s_cluster, ns, sample())
    name = sample()["metadata"]["name"]
    first = await wait_status(api, ns, "ndvijobs", name, lambda s: s.get("phase") == "Queued")
    assert len(await entries_of(rclient, keys, tenant=ns)) == 1

    operator.restart()  # a plain restart: the resume handler finds jobId and submits nothing
    # A crash between XADD and the status write: the restarted operator submits again, with the same job id.
    k8s_cluster.kubectl("patch", "-n", ns, "ndvijob", name, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": {"jobId": None, "requestHash": None, "phase": "Pending"}}))
    operator.restart()
    again = await wait_status(api, ns, "ndvijobs", name, lambda s: s.get("jobId") and s.get("phase") == "Queued")
    assert again["jobId"] == first["jobId"] and again["requestHash"] == first["requestHash"]
    entries = await entries_of(rclient, keys, tenant=ns)
    assert [f["job_id"] for _, f in entries] == [first["jobId"]]


async def test_delete_cancels_the_job_and_never_waits_forever_for_redis(
        k8s_cluster: Cluster, api: Any, ns: str, rclient: Redis, keys: Keys, redis_server: EmbeddedServer) -> None:
    doc = sample()
    apply(k8s_cluster, ns, doc)
    for i in (2, 3):  # same request in the same namespace would dedupe: vary the output name
        other = copy.deepcopy(doc)
        other["metadata"]["name"] = f"job-{i}"
        other["spec"]["output"]["name"] = f"ndvi-{i}"
        apply(k8s_cluster, ns, other)
    jobs = {}
    for name in (doc["metadata"]["name"], "job-2", "job-3"):
        jobs[name] = (await wait_status(api, ns, "ndvijobs", name, lambda s: s.get("phase") == "Queued"))["jobId"]
    # A duplicate of job-2's request (another object, same tenant) mirrors job-2's job and does not own it.
    dup = copy.deepcopy(doc)
    dup["metadata"]["name"] = "dup-of-2"
    dup["spec"]["output"]["name"] = "ndvi-2"
    apply(k8s_cluster, ns, dup)
    dup_status = await wait_status(api, ns, "ndvijobs", "dup-of-2", lambda s: s.get("jobId"))
    assert dup_status["jobId"] == jobs["job-2"] and "Duplicate" in json.dumps(dup_status["conditions"])

    k8s_cluster.kubectl("delete", "-n", ns, "ndvijob", doc["metadata"]["name"], "dup-of-2", "--timeout=20s")
    assert await rclient.hget(keys.job_state(jobs[doc["metadata"]["name"]]), "state") == "cancelled"
    assert await rclient.hget(keys.job_state(jobs["job-2"]), "state") == "queued"  # not the duplicate's to cancel
    # The cancel released the request: the same spec applied again runs as a new job, not the cancelled one.
    apply(k8s_cluster, ns, doc)
    again = await wait_status(api, ns, "ndvijobs", doc["metadata"]["name"],
                              lambda s: s.get("jobId") and s.get("phase") == "Queued")
    assert again["jobId"] != jobs[doc["metadata"]["name"]]
    assert "Duplicate" not in json.dumps(again["conditions"])

    redis_server.kill()
    try:
        started = time.monotonic()
        k8s_cluster.kubectl("delete", "-n", ns, "ndvijob", "job-3", "--timeout=40s", timeout=45)
        elapsed = time.monotonic() - started
    finally:
        redis_server.restart()
    assert not exists(k8s_cluster, ns, "ndvijob", "job-3")
    assert elapsed < 30, elapsed
    # Deleted without cancelling: the job is still queued, visible and cancellable over HTTP.
    assert await rclient.hget(keys.job_state(jobs["job-3"]), "state") == "queued"


async def _dead_letters(op_settings: EventflowSettings, fns: Functions, rclient: Redis, keys: Keys,
                        failure_class: str, n: int) -> list[tuple[str, str]]:
    """n jobs of a tenant of their own, dead-lettered with failure_class; returns (job id, DLQ id)."""
    tenant = f"dlq-{failure_class}"
    admitted = []
    for i in range(n):
        request = NdviJobRequest.model_validate({"farm_id": f"farm-{i}", "sensor": "sentinel2",
                                                 "inputs": {"href": f"file:///data/s2/{failure_class}-{i}.tif"}})
        admitted.append(await admit_job(fns, op_settings, request, tenant))
    await rclient.xreadgroup(keys.group, "op-dlq", {keys.job_stream: ">"}, count=10_000)
    out = []
    for a in admitted:
        dlq_id = await fns.dead_letter(a.entry_id, job_id=a.job_id, request_hash=a.request_hash,
                                       failure_class=failure_class, message="store timed out")
        assert dlq_id
        out.append((a.job_id, dlq_id))
    return out


def replay_doc(name: str, failure_class: str, **spec: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DlqReplay", "metadata": {"name": name},
            "spec": {"failureClass": failure_class, "since": (now - timedelta(minutes=5)).isoformat(),
                     "until": (now + timedelta(minutes=5)).isoformat(), "maxCount": 50, "ratePerSecond": 50,
                     **spec}}


async def test_dlqreplay_dry_run_then_replay_then_nothing_twice(
        k8s_cluster: Cluster, api: Any, ns: str, op_settings: EventflowSettings, rclient: Redis, fns: Functions,
        keys: Keys) -> None:
    cls = f"transient-{secrets.token_hex(3)}"
    dead = await _dead_letters(op_settings, fns, rclient, keys, cls, 3)
    await _dead_letters(op_settings, fns, rclient, keys, f"input-{cls}", 1)  # another class: never selected
    job_ids = {j for j, _ in dead}
    before = await rclient.xlen(keys.job_stream)

    apply(k8s_cluster, ns, replay_doc("dry", cls, dryRun=True))
    dry = await wait_status(api, ns, "dlqreplays", "dry", lambda s: s.get("phase") == "Completed")
    assert (dry["matched"], dry["replayed"], dry["skipped"], dry["outcomes"]) == (3, 0, 0, {"would_replay": 3})
    assert await rclient.xlen(keys.job_stream) == before

    apply(k8s_cluster, ns, replay_doc("real", cls))
    real = await wait_status(api, ns, "dlqreplays", "real", lambda s: s.get("phase") == "Completed")
    assert (real["matched"], real["replayed"], real["skipped"]) == (3, 3, 0)
    assert real["lastReplayedId"] == dead[-1][1]
    new = [f for _, f in (await rclient.xrange(keys.job_stream))[before:]]
    assert sorted(f["job_id"] for f in new) == sorted(job_ids)
    assert {f["replay_generation"] for f in new} == {"1"}

    apply(k8s_cluster, ns, replay_doc("again", cls))
    again = await wait_status(api, ns, "dlqreplays", "again", lambda s: s.get("phase") == "Completed")
    assert (again["matched"], again["replayed"], again["skipped"], again["outcomes"]) == (3, 0, 3, {"already": 3})
    assert await rclient.xlen(keys.job_stream) == before + 3
    assert any(e["reason"] == "Completed" for e in events(k8s_cluster, ns, "real"))

    backwards = replay_doc("backwards", cls)
    backwards["spec"]["since"], backwards["spec"]["until"] = backwards["spec"]["until"], backwards["spec"]["since"]
    apply(k8s_cluster, ns, backwards)
    refused = await wait_status(api, ns, "dlqreplays", "backwards", lambda s: s.get("phase") == "Failed")
    assert refused["message"].startswith("spec.since is after spec.until"), refused
    assert await rclient.xlen(keys.job_stream) == before + 3


async def test_deleting_a_running_dlqreplay_stops_it(
        k8s_cluster: Cluster, api: Any, ns: str, op_settings: EventflowSettings, rclient: Redis, fns: Functions,
        keys: Keys) -> None:
    cls = f"stop-{secrets.token_hex(3)}"
    await _dead_letters(op_settings, fns, rclient, keys, cls, 20)
    before = await rclient.xlen(keys.job_stream)
    apply(k8s_cluster, ns, replay_doc("stopme", cls, ratePerSecond=5))  # 4 s for all 20
    await wait_status(api, ns, "dlqreplays", "stopme", lambda s: s.get("processed", 0) >= 2, timeout_s=20)
    k8s_cluster.kubectl("delete", "-n", ns, "dlqreplay", "stopme", "--timeout=20s")
    deleted_at = await rclient.xlen(keys.job_stream) - before
    # The replay notices at its next progress write (status interval 0.2 s here, i.e. ~1 more record at
    # 5/s); had it kept going, all 20 would be back on the stream 4 s after it started.
    await asyncio.sleep(4.5)
    replayed = await rclient.xlen(keys.job_stream) - before
    assert replayed < 20, "the deleted DlqReplay kept replaying"
    assert replayed <= deleted_at + 3, (deleted_at, replayed)


async def test_a_replayed_ndvijob_goes_back_to_queued(
        k8s_cluster: Cluster, api: Any, ns: str, rclient: Redis, fns: Functions, keys: Keys) -> None:
    doc = sample()
    name = doc["metadata"]["name"]
    apply(k8s_cluster, ns, doc)
    status = await wait_status(api, ns, "ndvijobs", name, lambda s: s.get("phase") == "Queued")
    [(entry_id, _)] = await entries_of(rclient, keys, tenant=ns)
    await rclient.xreadgroup(keys.group, "op-test", {keys.job_stream: ">"}, count=10_000)
    cls = f"input-{secrets.token_hex(3)}"
    assert await fns.dead_letter(entry_id, job_id=status["jobId"], request_hash=status["requestHash"],
                                 failure_class=cls, message="no such file")
    dead = await wait_status(api, ns, "ndvijobs", name, lambda s: s.get("phase") == "DeadLettered")
    assert dead["error"] == {"class": cls, "message": "no such file"}
    assert dead["message"] == f"{cls}: no such file"

    apply(k8s_cluster, ns, replay_doc("one-job", cls, jobId=status["jobId"]))
    await wait_status(api, ns, "dlqreplays", "one-job", lambda s: s.get("phase") == "Completed" and s["replayed"] == 1)
    back = await wait_status(api, ns, "ndvijobs", name, lambda s: s.get("phase") == "Queued")
    assert "error" not in back
    assert {c["type"]: c["status"] for c in back["conditions"]} == {"Submitted": "True", "Finished": "False"}
    assert [f.get("replay_generation") for _, f in await entries_of(rclient, keys, tenant=ns)] == [None, "1"]


def operator_process(op_settings: EventflowSettings, cluster: Cluster, log: Path) -> subprocess.Popen[bytes]:
    """`eventflow operator` as its own process (so it can be SIGKILLed), configured like the pod."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "EVENTFLOW_"))}
    env.update(OPERATOR_ENV, EVENTFLOW_REDIS__URL=str(op_settings.redis.url), KUBECONFIG=os.environ["KUBECONFIG"],
               EVENTFLOW_OPERATOR__LIVENESS_URL=f"http://127.0.0.1:{free_port()}/healthz")
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "eventflow", "operator", "--namespace", f"{NS_PREFIX}*"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


async def test_dlqreplay_resumes_after_the_operator_is_killed_mid_replay(
        k8s_cluster: Cluster, api: Any, ns: str, operator: Operator, op_settings: EventflowSettings, rclient: Redis,
        fns: Functions, keys: Keys, tmp_path: Path) -> None:
    cls = f"slow-{secrets.token_hex(3)}"
    dead = await _dead_letters(op_settings, fns, rclient, keys, cls, 8)
    before = await rclient.xlen(keys.job_stream)
    operator.stop()  # one operator at a time: a killable one takes over
    proc = operator_process(op_settings, k8s_cluster, tmp_path / "operator.log")
    try:
        apply(k8s_cluster, ns, replay_doc("slow", cls, ratePerSecond=5))
        await wait_status(api, ns, "dlqreplays", "slow", lambda s: s.get("processed", 0) >= 2, timeout_s=20)
    finally:
        proc.kill()  # SIGKILL: no cleanup, no final status write
        proc.wait(timeout=10)
    interrupted = api.get_namespaced_custom_object(GROUP, VERSION, ns, "dlqreplays", "slow")["status"]
    assert interrupted["phase"] == "Running" and interrupted["processed"] < 8, (tmp_path / "operator.log").read_text()
    operator.start()
    done = await wait_status(api, ns, "dlqreplays", "slow", lambda s: s.get("phase") == "Completed")
    assert (done["matched"], done["processed"], done["lastReplayedId"]) == (8, 8, dead[-1][1]), done
    # Resumed after lastReplayedId: at most the record handled after the last status write says "already".
    assert done["replayed"] >= 7 and done["replayed"] + done["outcomes"].get("already", 0) == 8, done
    new = [f["job_id"] for _, f in (await rclient.xrange(keys.job_stream))[before:]]
    assert sorted(new) == sorted(j for j, _ in dead)  # each record replayed exactly once
