"""The handler registry: job type -> function that executes one job (NDVI is the first).

Handlers are synchronous and run in a child process or a worker thread so the event loop keeps renewing
leases; only a handler declared with :func:`on_event_loop` runs on the loop itself. They write outputs
only under the directory they are given, and return a JSON-serialisable result.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from eventflow.contract import BandFileInputs, JobType, OutputOptions, StreamEntry
from eventflow.errors import DependencyUnavailable, TransientError
from eventflow.fetch import fetch
from eventflow.inputs import local_path, vet_href
from eventflow.settings import NdviSettings


class Stopped(TransientError):
    """The job was told to stop (lease lost, cancellation or shutdown); it wrote nothing final."""

    failure_class = "stopped"


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler may use: settings, where to write, and how to report progress."""

    ndvi: NdviSettings
    output_dir: Path
    fence: int
    progress: Callable[[float], None]
    stop: threading.Event

    def check_stop(self) -> None:
        """Raise Stopped if the runtime asked this job to stop."""
        if self.stop.is_set():
            raise Stopped("job stopped by the runtime")


Handler = Callable[[StreamEntry, JobContext], dict[str, Any]]


def on_event_loop(handler: Handler) -> Handler:
    """Declare a handler trivially short (pure, bounded, microseconds: no I/O, no waiting).

    The consumer then calls it directly on its event loop, whatever the isolation setting, instead of
    handing it to a thread or a child process, whose hand-off costs more than such a job. The price is
    what a thread or child would give: no wall-clock timeout, no memory limit, and the loop (lease
    renewal included) waits while it runs. NDVI is never declared so.
    """
    handler.eventflow_on_event_loop = True  # type: ignore[attr-defined]
    return handler


def runs_on_event_loop(handler: Handler | None) -> bool:
    """True if the handler was declared with :func:`on_event_loop`."""
    return getattr(handler, "eventflow_on_event_loop", False) is True

# Write errors that say the output store is full, read-only or broken, not that the job is bad.
_OUTPUT_STORE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ESTALE, errno.ENOTCONN}


def _check_input_store(paths: list[str], data_roots: list[Path]) -> None:
    """A data root that is gone (unmounted volume, stale network share) is the store's outage, retried
    behind the input-store breaker; a missing file under a healthy root stays the job's permanent error."""
    for path in paths:
        root = next((r for r in data_roots if Path(path).is_relative_to(r)), None)
        if root is not None and not os.path.isdir(root):
            raise DependencyUnavailable("input_store", f"data root {root} is not reachable")


def run_ndvi_job(entry: StreamEntry, ctx: JobContext) -> dict[str, Any]:
    """Compute NDVI for the entry's request; returns {"outputs": {...}, "stats": {...}, ...}."""
    from eventflow.ndvi import BandSource, NdviParams, run_ndvi

    request = entry.request()
    inputs = request.inputs
    try:
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DependencyUnavailable("output_store", f"output directory unavailable: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix=".inputs-", dir=ctx.output_dir) as downloads:
        local = _Inputs(ctx, Path(downloads))
        return _run(request, inputs, local, ctx, BandSource, NdviParams, run_ndvi)


class _Inputs:
    """Input hrefs as local paths: file:// vetted against the data roots, https/s3 via the vetted fetcher
    into a per-job temporary directory (one download per distinct href, deleted after the job)."""

    def __init__(self, ctx: JobContext, downloads: Path) -> None:
        self.ctx, self.downloads = ctx, downloads
        self.fetched: dict[str, Path] = {}

    def path(self, field: str, href: str) -> str:
        if urlsplit(href).scheme.lower() == "file":
            return str(local_path(field, href, self.ctx.ndvi))
        if href not in self.fetched:
            vet_href(field, href, self.ctx.ndvi)
            dest = self.downloads / f"input-{len(self.fetched)}{Path(urlsplit(href).path).suffix[:8]}"
            self.fetched[href] = fetch(field, href, dest, self.ctx.ndvi)
        return str(self.fetched[href])


def _run(request: Any, inputs: Any, local: _Inputs, ctx: JobContext, BandSource: Any, NdviParams: Any,
         run_ndvi: Any) -> dict[str, Any]:
    if isinstance(inputs, BandFileInputs):
        red = BandSource(local.path("inputs.red.href", inputs.red.href), inputs.red.band)
        nir = BandSource(local.path("inputs.nir.href", inputs.nir.href), inputs.nir.band)
    else:
        path = local.path("inputs.href", inputs.href)
        normalized = request.normalized()["inputs"]
        red = BandSource(path, int(normalized["red_band"]))
        nir = BandSource(path, int(normalized["nir_band"]))
    output = request.output or OutputOptions()
    qa = None
    if request.qa is not None:
        qa = BandSource(local.path("qa.href", request.qa.href), request.qa.band)
    normalized = request.normalized()
    params = NdviParams(
        red=red, nir=nir, scale=normalized.get("scale"), offset=normalized.get("offset"), nodata=request.nodata,
        max_pixels=ctx.ndvi.max_pixels, sensor=request.sensor.value if request.sensor else None,
        qa=qa, qa_kind=request.qa.kind if request.qa else None, fields=request.fields,
        all_touched=output.all_touched, vegetation_threshold=output.vegetation_threshold,
        previews=output.previews, resample=request.resample, compress=output.compress,
    )
    name = output.name
    _check_input_store([red.path, nir.path, *([qa.path] if qa else [])], ctx.ndvi.data_roots)
    # Each attempt writes its own file named by its fencing token, via a temporary name, so a zombie's
    # late write can never clobber the file a newer attempt committed.
    final = ctx.output_dir / f"{name}-f{ctx.fence}.tif"
    tmp = ctx.output_dir / f".{name}-f{ctx.fence}.tif.tmp"

    def progress(fraction: float) -> None:
        ctx.check_stop()
        ctx.progress(fraction)

    try:
        outcome = run_ndvi(params, tmp, progress)
        ctx.check_stop()
        tmp.replace(final)
    except OSError as exc:
        if exc.errno in _OUTPUT_STORE_ERRNOS:
            raise DependencyUnavailable("output_store", f"writing the output failed: {exc}") from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
    data = outcome.to_dict()
    data["output_path"] = str(final)
    outputs = {"ndvi": str(final)}
    for kind, path in (outcome.previews or {}).items():
        # Previews were written beside the temporary name: give them the final, per-fence name too.
        placed = ctx.output_dir / f"{name}-f{ctx.fence}.{'abs' if kind == 'absolute' else 'rel'}.png"
        Path(path).replace(placed)
        outputs[f"preview_{kind}"] = str(placed)
    data["previews"] = {k.removeprefix("preview_"): v for k, v in outputs.items() if k.startswith("preview_")}
    return {"outputs": outputs, "stats": outcome.stats.to_dict(), "fields": data.get("fields") or [], "ndvi": data}


#: Job type -> handler. A new event type registers here and needs no change to the runtime.
HANDLERS: dict[JobType, Handler] = {JobType.ndvi: run_ndvi_job}
