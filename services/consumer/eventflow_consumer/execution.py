"""Running one job's handler off the event loop: in a child process (default) or in a thread; or, for
a handler declared trivially short (``handlers.on_event_loop``), on the loop itself.

A child process gives what a thread cannot: a hard wall-clock timeout (the child is killed), a memory
limit (RLIMIT_AS), and a crash that takes down only the job. Children come from a forkserver that
preloads the NDVI stack, so a job starts in milliseconds, and each child dies with its parent
(PR_SET_PDEATHSIG), so a killed consumer leaves no job process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import multiprocessing
import os
import resource
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from eventflow.contract import StreamEntry
from eventflow.errors import EventflowError, PermanentError
from eventflow.settings import NdviSettings
from eventflow.supervisor import child_preexec
from eventflow_consumer.handlers import HANDLERS, Handler, JobContext, Stopped

_MP = multiprocessing.get_context("forkserver")
_MP.set_forkserver_preload(["eventflow_consumer.execution", "eventflow.ndvi", "eventflow_consumer.handlers"])


class JobFailed(Exception):
    """A handler's failure, carried across the process boundary by class name and kind."""

    def __init__(self, failure_class: str, permanent: bool, message: str) -> None:
        super().__init__(message)
        self.failure_class = failure_class
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything a child needs to run one job (picklable)."""

    fields: dict[str, str]
    handler_ref: str | None
    ndvi: dict[str, Any]
    output_dir: str
    fence: int
    memory_bytes: int


def resolve_handler(job_type: str, ref: str | None) -> Handler:
    """The registry's handler for job_type, or the ``module:function`` named by a settings override."""
    if ref:
        module, _, name = ref.partition(":")
        handler: Handler = getattr(importlib.import_module(module), name)
        return handler
    from eventflow.contract import JobType

    return HANDLERS[JobType(job_type)]


def classify(exc: BaseException) -> JobFailed:
    """Map an exception to a failure class and whether retrying can help."""
    if isinstance(exc, JobFailed):
        return exc
    if isinstance(exc, MemoryError):
        return JobFailed("memory_limit", False, "job exceeded its memory limit")
    if isinstance(exc, EventflowError):
        return JobFailed(exc.failure_class, isinstance(exc, PermanentError), str(exc))
    return JobFailed(type(exc).__name__, False, str(exc) or type(exc).__name__)


def _child_main(conn: Connection, spec: JobSpec) -> None:
    child_preexec()
    if spec.memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (spec.memory_bytes, spec.memory_bytes))
    stop = threading.Event()
    # SIGTERM asks the job to stop at its next progress report; the parent SIGKILLs if it does not.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        entry = StreamEntry.from_fields(spec.fields)
        ctx = JobContext(ndvi=NdviSettings.model_validate(spec.ndvi), output_dir=Path(spec.output_dir),
                         fence=spec.fence, progress=lambda f: conn.send(("progress", f)), stop=stop)
        result = resolve_handler(entry.job_type.value, spec.handler_ref)(entry, ctx)
        conn.send(("ok", result))
    except BaseException as exc:  # every failure must reach the parent as data, never as a hang
        failed = classify(exc)
        with contextlib.suppress(Exception):
            conn.send(("error", failed.failure_class, failed.permanent, str(failed)))
    finally:
        conn.close()


async def run_in_process(spec: JobSpec, progress: Callable[[float], None], timeout_s: float,
                         stop: asyncio.Event) -> dict[str, Any]:
    """Run the job in a child; raises JobFailed, Stopped (stop set) or JobFailed("timeout")."""
    loop = asyncio.get_running_loop()
    parent_conn, child_conn = _MP.Pipe(duplex=False)
    proc = _MP.Process(target=_child_main, args=(child_conn, spec), name="eventflow-job")
    proc.start()
    child_conn.close()
    outcome: asyncio.Future[tuple[str, list[Any]]] = loop.create_future()
    fd = parent_conn.fileno()

    def readable() -> None:
        try:
            while parent_conn.poll():
                kind, *payload = parent_conn.recv()
                if kind == "progress":
                    progress(float(payload[0]))
                elif not outcome.done():
                    outcome.set_result((kind, payload))
        except (EOFError, OSError):
            loop.remove_reader(fd)
            if not outcome.done():
                outcome.set_result(("exit", []))

    loop.add_reader(fd, readable)
    stop_wait = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([outcome, stop_wait], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if outcome in done:
            kind, payload = outcome.result()
        elif stop_wait in done:
            await _terminate(proc)
            raise Stopped("job stopped by the runtime")
        else:
            await _terminate(proc)
            raise JobFailed("timeout", False, f"job exceeded its wall-clock limit of {timeout_s:g}s")
    finally:
        stop_wait.cancel()
        loop.remove_reader(fd)
        if proc.is_alive():
            await _terminate(proc)
        await loop.run_in_executor(None, proc.join, 10)
        parent_conn.close()
    if kind == "ok":
        return dict(payload[0])
    if kind == "error":
        failure_class, permanent, message = payload
        if failure_class == "stopped":
            raise Stopped(message)
        raise JobFailed(str(failure_class), bool(permanent), str(message))
    code = proc.exitcode
    reason = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    raise JobFailed("crashed", False, f"job process died ({reason})")


async def _terminate(proc: multiprocessing.process.BaseProcess, grace_s: float = 2.0) -> None:
    if not proc.is_alive() or proc.pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, proc.join, grace_s)
    if proc.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


async def run_in_thread(pool: ThreadPoolExecutor, handler: Handler, entry: StreamEntry, ndvi: NdviSettings,
                        output_dir: Path, fence: int, progress: Callable[[float], None], timeout_s: float,
                        stop: asyncio.Event) -> dict[str, Any]:
    """Run the job in a worker thread (no hard kill or memory limit; for light handlers and tests)."""
    loop = asyncio.get_running_loop()
    stop_flag = threading.Event()
    ctx = JobContext(ndvi=ndvi, output_dir=output_dir, fence=fence,
                     progress=lambda f: loop.call_soon_threadsafe(progress, f), stop=stop_flag)
    future = loop.run_in_executor(pool, handler, entry, ctx)
    stop_wait = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([future, stop_wait], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        stop_flag.set()  # a thread cannot be killed: ask the handler to stop at its next check
        raise
    finally:
        stop_wait.cancel()
    if future in done:
        try:
            return dict(future.result())
        except Stopped:
            raise
        except Exception as exc:
            raise classify(exc) from exc
    stop_flag.set()
    if stop_wait in done:
        raise Stopped("job stopped by the runtime")
    raise JobFailed("timeout", False, f"job exceeded its wall-clock limit of {timeout_s:g}s")


def run_on_loop(handler: Handler, entry: StreamEntry, ndvi: NdviSettings, output_dir: Path, fence: int,
                progress: Callable[[float], None], stop: asyncio.Event) -> dict[str, Any]:
    """Run a handler declared ``on_event_loop`` right here, synchronously (no timeout, no memory limit).

    Failures come out as from the other two: JobFailed, or Stopped when the runtime asked the job to stop
    (checked before and after, since nothing can interrupt it in between).
    """
    flag = threading.Event()
    if stop.is_set():
        raise Stopped("job stopped by the runtime")
    ctx = JobContext(ndvi=ndvi, output_dir=output_dir, fence=fence, progress=progress, stop=flag)
    try:
        result = dict(handler(entry, ctx))
    except Stopped:
        raise
    except Exception as exc:
        raise classify(exc) from exc
    if stop.is_set():
        raise Stopped("job stopped by the runtime")
    return result
