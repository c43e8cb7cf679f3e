"""The ``eventflow`` command: run services, run the whole pipeline locally, submit and inspect jobs."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from eventflow import __version__
from eventflow.errors import ConfigError, EventflowError
from eventflow.logs import configure_logging
from eventflow.settings import EventflowSettings, load_settings, settings_env

log = logging.getLogger("eventflow.cli")

DEFAULT_STATE_DIR = Path(".eventflow")
API_URL_FILE = "api-url"
REDIS_URL_FILE = "redis-url"


# ---------------------------------------------------------------- helpers

def _settings(**overrides: Any) -> EventflowSettings:
    return load_settings(**overrides)


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "data_dir", None) or os.environ.get("EVENTFLOW_STATE_DIR") or DEFAULT_STATE_DIR)


def _redis_url_from_state(args: argparse.Namespace) -> str | None:
    url_file = _state_dir(args) / REDIS_URL_FILE
    return url_file.read_text().strip() if url_file.exists() else None


def _service_settings(args: argparse.Namespace) -> EventflowSettings:
    settings = _settings()
    configure_logging(settings.log.level, settings.log.json_format, component=args.command)
    return settings


def sample_request() -> dict[str, Any]:
    """The bundled Sentinel-2 sample as an NDVI job request (red B04, NIR B08 as two files)."""
    from eventflow.samples import sample_dir

    root = sample_dir()
    return {
        "farm_id": "sample-farm",
        "inputs": {
            "red": {"href": (root / "T33UUU_20170216T102101_B04.jp2").as_uri(), "band": 1},
            "nir": {"href": (root / "T33UUU_20170216T102101_B08.jp2").as_uri(), "band": 1},
        },
        "sensor": "sentinel2",
    }


# ---------------------------------------------------------------- service commands

#: Service name -> module with ``run(settings) -> int``. Imported by name so the shared package does
#: not depend on the services (each service depends on it); only the chosen one is loaded.
SERVICE_MODULES = {
    "ingest": "eventflow_ingest.app",
    "consumer": "eventflow_consumer.worker",
    "reaper": "eventflow_reaper.reclaim",
}


def cmd_service(args: argparse.Namespace) -> int:
    """Run one service (ingest, consumer, reaper) until SIGTERM."""
    settings = _service_settings(args)
    module = importlib.import_module(SERVICE_MODULES[args.command])
    return int(module.run(settings))


def cmd_operator(args: argparse.Namespace) -> int:
    """Run the kopf operator (needs the [operator] extra)."""
    if importlib.util.find_spec("kopf") is None:
        print("eventflow operator: kopf is not installed; pip install 'eventflow[operator]'", file=sys.stderr)
        return 2
    settings = _settings()
    namespace = args.namespace or settings.operator.namespace
    os.execvp(sys.executable, [sys.executable, "-m", "kopf", "run", "--standalone", "-m",
                               "eventflow_operator.handlers", f"--liveness={settings.operator.liveness_url}",
                               *(["--namespace", namespace] if namespace else ["--all-namespaces"])])
    return 0  # pragma: no cover - execvp does not return


def cmd_bootstrap(args: argparse.Namespace) -> int:
    """Load the Function library, create the stream and group, write the epoch."""
    from eventflow.redis.client import bootstrap, connect, keys_for

    settings = _service_settings(args)

    async def main() -> str:
        redis = connect(settings)
        try:
            return await bootstrap(redis, keys_for(settings))
        finally:
            await redis.aclose()

    epoch = asyncio.run(main())
    print(json.dumps({"bootstrapped": True, "epoch": epoch}))
    return 0


# ---------------------------------------------------------------- up

def cmd_up(args: argparse.Namespace) -> int:
    """Run the whole pipeline locally (embedded Redis unless EVENTFLOW_REDIS__URL is set)."""
    from eventflow.embedded import EmbeddedServer, free_port
    from eventflow.redis.client import bootstrap, keys_for
    from eventflow.redis.client import connect as connect_redis
    from eventflow.samples import sample_dir
    from eventflow.supervisor import Child, Supervisor, child_env

    configure_logging("WARNING", json_format=False)
    state = _state_dir(args).resolve()
    state.mkdir(parents=True, exist_ok=True)
    base = _settings()
    server: EmbeddedServer | None = None
    stop_requested = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    redis_url = base.redis.url
    if not redis_url:
        server = EmbeddedServer(data_dir=state / "redis", port=args.redis_port or 0).start()
        redis_url = server.url
        print(f"eventflow up: embedded {server.kind}-server on {redis_url} (data: {server.data_dir}, "
              "AOF appendfsync always)", file=sys.stderr, flush=True)
    supervisor: Supervisor | None = None
    try:
        data_roots = base.ndvi.data_roots or [sample_dir().resolve(), (state / "inputs").resolve()]
        (state / "inputs").mkdir(exist_ok=True)
        output_root = base.ndvi.output_root if "EVENTFLOW_NDVI__OUTPUT_ROOT" in os.environ else state / "outputs"
        port = args.port or free_port()
        settings = _settings(
            redis={**base.redis.model_dump(), "url": redis_url},
            ndvi={**base.ndvi.model_dump(), "data_roots": data_roots, "output_root": output_root},
            ingest={**base.ingest.model_dump(), "port": port, "host": "127.0.0.1",
                    "allow_anonymous": base.ingest.allow_anonymous or not (base.ingest.tokens
                                                                           or base.ingest.hmac_keys)},
            consumer={**base.consumer.model_dump(), "drain_timeout_s": min(base.consumer.drain_timeout_s, 20.0)},
            reaper={**base.reaper.model_dump(),
                    "min_idle_ms": max(base.consumer.lease_ttl_ms + 5_000, min(base.reaper.min_idle_ms, 40_000)),
                    "interval_s": min(base.reaper.interval_s, 2.0)},
            metrics={**base.metrics.model_dump(), "enabled": False},
        )

        async def boot() -> str:
            redis = connect_redis(settings)
            try:
                return await bootstrap(redis, keys_for(settings))
            finally:
                await redis.aclose()

        asyncio.run(boot())
        env = settings_env(settings)
        logs = state / "logs"
        exe = [sys.executable, "-m", "eventflow"]
        children = [Child("ingest", [*exe, "ingest"], child_env(dict(os.environ), env), logs / "ingest.log")]
        for i in range(args.consumers):
            children.append(Child(f"consumer-{i + 1}", [*exe, "consumer"], child_env(dict(os.environ), env),
                                  logs / f"consumer-{i + 1}.log"))
        children.append(Child("reaper", [*exe, "reaper"], child_env(dict(os.environ), env), logs / "reaper.log"))
        supervisor = Supervisor(children)
        supervisor.start_all()
        api = f"http://127.0.0.1:{port}"
        if not _wait_ready(api, 60, lambda: stop_requested):
            print(f"eventflow up: ingest did not become ready; see {logs / 'ingest.log'}", file=sys.stderr)
            return 1
        (state / API_URL_FILE).write_text(api)
        (state / REDIS_URL_FILE).write_text(redis_url)
        print(f"EventFlow API listening on {api}", flush=True)
        print(f"eventflow up: {args.consumers} consumer(s), reaper, ingest running; logs in {logs}; "
              "Ctrl-C stops everything", file=sys.stderr, flush=True)
        if args.demo:
            code = _submit_and_wait(api, None, sample_request(), timeout_s=args.timeout, as_json=False)
            return code
        while not stop_requested:
            supervisor.poll()
            time.sleep(0.2)
        return 0
    finally:
        if supervisor is not None:
            print("eventflow up: stopping (consumers drain first)", file=sys.stderr, flush=True)
            supervisor.stop_all([["ingest", "reaper"], ["consumer-"]], timeout_s=settings.consumer.drain_timeout_s + 10)
        for name in (API_URL_FILE, REDIS_URL_FILE):
            (state / name).unlink(missing_ok=True)
        if server is not None:
            server.stop()
        print("eventflow up: stopped; no process left running", file=sys.stderr, flush=True)


def _wait_ready(api: str, timeout_s: float, cancelled: Any) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not cancelled():
        try:
            if httpx.get(f"{api}/readyz", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------- client commands

def _api(args: argparse.Namespace) -> str:
    if args.api:
        return str(args.api).rstrip("/")
    env = os.environ.get("EVENTFLOW_API_URL")
    if env:
        return env.rstrip("/")
    url_file = _state_dir(args) / API_URL_FILE
    if url_file.exists():
        return url_file.read_text().strip()
    return "http://127.0.0.1:8080"


def _headers(token: str | None) -> dict[str, str]:
    token = token or os.environ.get("EVENTFLOW_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _submit_and_wait(api: str, token: str | None, request: dict[str, Any], *, timeout_s: float, as_json: bool,
                     wait: bool = True) -> int:
    with httpx.Client(base_url=api, headers=_headers(token), timeout=30.0) as client:
        reply = client.post("/v1/ndvi/jobs", json=request)
        if reply.status_code not in (200, 202):
            print(f"eventflow submit: {reply.status_code} {reply.text}", file=sys.stderr)
            return 1
        submitted = reply.json()
        job_id = submitted["job_id"]
        print(f"job {job_id} {'(duplicate of an existing job) ' if submitted['duplicate'] else ''}"
              f"status={submitted['status']}", file=sys.stderr, flush=True)
        if not wait:
            print(json.dumps(submitted))
            return 0
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            view = client.get(f"/v1/ndvi/jobs/{job_id}").json()
            line = f"  {view['state']:<13} {view['progress'] * 100:5.1f}%  attempts={view['attempts']}"
            if line != last:
                print(line, file=sys.stderr, flush=True)
                last = line
            if view["state"] in ("succeeded", "failed", "dead_lettered", "cancelled"):
                break
            if time.monotonic() > deadline:
                print(f"eventflow submit: job {job_id} not finished after {timeout_s:.0f}s "
                      f"(state {view['state']}); check `eventflow status {job_id}`", file=sys.stderr)
                return 3
            time.sleep(0.2)
    if as_json:
        print(json.dumps(view, indent=2))
    else:
        _print_result(view)
    return 0 if view["state"] == "succeeded" else 1


def _print_result(view: dict[str, Any]) -> None:
    print(f"job {view['job_id']}: {view['state']}")
    if view.get("error"):
        print(f"  error: {view['error']['class']}: {view['error']['message']}")
    result = view.get("result") or {}
    for name, path in (result.get("outputs") or {}).items():
        print(f"  {name}: {path}")
    stats = result.get("stats") or {}
    if stats:
        print("  NDVI statistics (whole scene):")
        for key in ("valid_count", "nodata_count", "mean", "median", "std", "min", "max"):
            if key in stats:
                value = stats[key]
                print(f"    {key:<13} {value:.4f}" if isinstance(value, float) else f"    {key:<13} {value}")
    for warning in (result.get("ndvi") or {}).get("warnings") or []:
        print(f"  warning: {warning}")


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit an NDVI job (the bundled sample by default), wait, print result paths and statistics."""
    if args.file:
        try:
            request = json.loads(Path(args.file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"eventflow submit: --file {args.file}: {exc}", file=sys.stderr)
            return 2
    else:
        request = sample_request()
    try:
        return _submit_and_wait(_api(args), args.token, request, timeout_s=args.timeout, as_json=args.json,
                                wait=not args.no_wait)
    except httpx.HTTPError as exc:
        print(f"eventflow submit: cannot reach the API at {_api(args)}: {exc} (is `eventflow up` running?)",
              file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    """Print one job's state."""
    try:
        reply = httpx.get(f"{_api(args)}/v1/ndvi/jobs/{args.job_id}", headers=_headers(args.token), timeout=10)
    except httpx.HTTPError as exc:
        print(f"eventflow status: cannot reach the API at {_api(args)}: {exc}", file=sys.stderr)
        return 1
    if reply.status_code != 200:
        print(f"eventflow status: {reply.status_code} {reply.text}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply.json(), indent=2))
    else:
        _print_result(reply.json())
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a signed bearer token for a tenant, signed with a key from EVENTFLOW_INGEST__HMAC_KEYS."""
    from eventflow import tokens

    keys = _settings().ingest.hmac_keys
    if args.key_id not in keys:
        known = ", ".join(sorted(keys)) or "none configured"
        raise ConfigError(f"--key-id: {args.key_id!r} is not a key in EVENTFLOW_INGEST__HMAC_KEYS ({known})")
    if not tokens.TENANT_PATTERN.fullmatch(args.tenant):
        raise ConfigError(f"--tenant: {args.tenant!r} must match {tokens.TENANT_PATTERN.pattern}")
    print(tokens.mint(keys, args.key_id, args.tenant, args.ttl_s, tokens.Scope(args.scope)))
    return 0


def _time_bound(text: str | None, name: str) -> int | None:
    """A --since/--until value: Unix milliseconds, or an ISO-8601 time."""
    from eventflow.dlq import parse_time_ms

    if text is None:
        return None
    try:
        return parse_time_ms(text)
    except ValueError:
        raise ConfigError(f"--{name}: {text!r} is neither Unix milliseconds nor an ISO-8601 time") from None


def cmd_dlq(args: argparse.Namespace) -> int:
    """Inspect and act on the dead-letter stream: list, show, replay, purge."""
    from eventflow.contract import DeadLetterEntry
    from eventflow.dlq import DlqFilter, DlqOutcome, process_dead_letters, select_dead_letters
    from eventflow.redis.client import connect, functions_for, keys_for

    url = os.environ.get("EVENTFLOW_REDIS__URL") or _redis_url_from_state(args)
    if not url:
        print("eventflow dlq: EVENTFLOW_REDIS__URL is not set and no `eventflow up` is running", file=sys.stderr)
        return 2
    settings = _settings(redis={"url": url})

    def selection() -> DlqFilter:
        return DlqFilter(failure_class=args.failure_class, job_id=args.job_id,
                         since_ms=_time_bound(getattr(args, "since", None), "since"),
                         until_ms=_time_bound(getattr(args, "until", None), "until"),
                         max_count=args.max_count, newest_first=args.dlq_command == "list")

    def summary(dlq_id: str, entry: DeadLetterEntry, **extra: Any) -> str:
        return json.dumps({"dlq_id": dlq_id, "job_id": entry.job_id, "failure_class": entry.failure_class,
                           "message": entry.failure_message[:200], "deliveries": entry.delivery_count,
                           "original_entry_id": entry.original_entry_id, **extra})

    async def main() -> int:
        redis = connect(settings)
        keys = keys_for(settings)
        functions = functions_for(redis, settings)
        try:
            if args.dlq_command == "show":
                rows = await redis.xrange(keys.dead_letter_stream, args.dlq_id, args.dlq_id)
                if not rows:
                    print(f"eventflow dlq show: no DLQ record {args.dlq_id}", file=sys.stderr)
                    return 1
                record = DeadLetterEntry.from_fields(rows[0][1]).model_dump()
                print(json.dumps({"dlq_id": rows[0][0], **record}, indent=2))
                return 0
            selected = await select_dead_letters(redis, keys, selection())
            if args.dlq_command == "list":
                for dlq_id, entry in selected:
                    print(summary(dlq_id, entry))
                return 0
            if args.dlq_command == "purge" and not (args.all or args.failure_class or args.job_id or args.since
                                                    or args.until):
                print("eventflow dlq purge: name a filter (--failure-class, --job-id, --since, --until) or --all",
                      file=sys.stderr)
                return 2

            def report(i: int, done: DlqOutcome) -> None:
                print(summary(done.dlq_id, done.entry, outcome=done.outcome, detail=done.detail), flush=True)
                print(f"  {i + 1}/{len(selected)} {args.dlq_command}", file=sys.stderr, flush=True)

            counts = await process_dead_letters(functions, selected, args.dlq_command, dry_run=args.dry_run,
                                                rate_per_s=args.rate, on_outcome=report)
            print(json.dumps({"command": args.dlq_command, "dry_run": args.dry_run, "selected": len(selected),
                              **counts}), file=sys.stderr)
            return 0
        finally:
            await redis.aclose()

    return asyncio.run(main())


def cmd_config_docs(args: argparse.Namespace) -> int:
    """Print docs/configuration.md generated from the settings model."""
    from eventflow.configdocs import render

    text = render()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the CLI)."""
    parser = argparse.ArgumentParser(prog="eventflow", description="EventFlow: NDVI jobs on Redis Streams.")
    parser.add_argument("--version", action="version", version=f"eventflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole pipeline locally (embedded Redis by default)")
    up.add_argument("--consumers", type=_positive, default=2, help="consumer processes (default 2)")
    up.add_argument("--port", type=int, default=0, help="ingest port (default: a free port)")
    up.add_argument("--redis-port", type=int, default=0, help="embedded Redis port (default: a free port)")
    up.add_argument("--data-dir", default=None, help="state directory (default ./.eventflow)")
    up.add_argument("--demo", action="store_true", help="submit the bundled sample, print its result, stop")
    up.add_argument("--timeout", type=float, default=120.0, help="--demo: seconds to wait for the result")
    up.set_defaults(func=cmd_up)

    for name, func, text in (("ingest", cmd_service, "serve the ingest HTTP API"),
                             ("consumer", cmd_service, "run one consumer"),
                             ("reaper", cmd_service, "run the reaper"),
                             ("bootstrap", cmd_bootstrap, "load Redis functions, create stream/group, write epoch")):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func)
    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    op.add_argument("--namespace", default=None, help="namespace to watch (default: all)")
    op.set_defaults(func=cmd_operator)

    for name, func, text in (("submit", cmd_submit, "submit an NDVI job and wait for its result"),
                             ("status", cmd_status, "show a job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--api", default=None, help="ingest URL (default: EVENTFLOW_API_URL, the running "
                                                   "`eventflow up`, else http://127.0.0.1:8080)")
        p.add_argument("--token", default=None, help="bearer token (default: EVENTFLOW_TOKEN)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--data-dir", default=None, help="state directory of `eventflow up` (default ./.eventflow)")
        p.set_defaults(func=func)
        if name == "submit":
            p.add_argument("--file", default=None, help="request JSON file (default: the bundled sample)")
            p.add_argument("--no-wait", action="store_true", help="return after the job is accepted")
            p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
        else:
            p.add_argument("job_id", help="job id")

    tok = sub.add_parser("token", help="print a signed bearer token (key from EVENTFLOW_INGEST__HMAC_KEYS)")
    tok.add_argument("--key-id", required=True, help="key id in EVENTFLOW_INGEST__HMAC_KEYS to sign with")
    tok.add_argument("--tenant", required=True, help="tenant the token acts for")
    tok.add_argument("--ttl-s", type=_positive, default=3600, help="seconds until it expires (default 3600)")
    tok.add_argument("--scope", choices=["write", "read"], default="write",
                     help="write (default): submit, cancel and read; read: GET only")
    tok.set_defaults(func=cmd_token)

    dlq = sub.add_parser("dlq", help="inspect, replay or purge the dead-letter stream")
    dlq.add_argument("--data-dir", default=None, help="state directory of `eventflow up`")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="DLQ_COMMAND")
    for name, text in (("list", "list dead-lettered entries, newest first"),
                       ("replay", "put matching records back on the job stream (same request hash)"),
                       ("purge", "delete matching records for good")):
        p = dsub.add_parser(name, help=text)
        p.add_argument("--failure-class", default=None, help="only this failure class (e.g. input, poison, lost)")
        p.add_argument("--job-id", default=None, help="only this job")
        p.add_argument("--since", default=None, help="only records dead-lettered at/after (ms or ISO-8601)")
        p.add_argument("--until", default=None, help="only records dead-lettered at/before (ms or ISO-8601)")
        p.add_argument("--max-count", type=_positive, default=50 if name == "list" else 1000,
                       help="at most this many records")
        if name != "list":
            p.add_argument("--dry-run", action="store_true", help="print what would happen, change nothing")
            p.add_argument("--rate", type=float, default=0.0, help="records per second (default: no limit)")
        if name == "purge":
            p.add_argument("--all", action="store_true", help="purge every record (no filter)")
    show = dsub.add_parser("show", help="show one DLQ record")
    show.add_argument("dlq_id", help="DLQ record id")
    dlq.set_defaults(func=cmd_dlq)

    docs = sub.add_parser("config-docs", help="print docs/configuration.md generated from the settings")
    docs.add_argument("--output", default=None, help="write to this file instead of stdout")
    docs.set_defaults(func=cmd_config_docs)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"eventflow {args.command}: {exc}", file=sys.stderr)
        return 2
    except EventflowError as exc:
        print(f"eventflow {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
