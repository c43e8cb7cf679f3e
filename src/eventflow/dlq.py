"""Dead-letter selection and the rate-limited replay/purge loop shared by ``eventflow dlq`` and DlqReplay.

Replay is idempotent per DLQ record (``eventflow_replay_dead_letter`` remembers the entry each record's
replay created), so running the same selection again after an interruption enqueues nothing twice.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from redis.asyncio import Redis

from eventflow.contract import DeadLetterEntry
from eventflow.keys import Keys
from eventflow.redis.functions import Functions

Action = Literal["replay", "purge"]


@dataclass(frozen=True, slots=True)
class DlqFilter:
    """Which DLQ records to select; the criteria are ANDed."""

    failure_class: str | None = None
    job_id: str | None = None
    #: Dead-lettered at or after this time (ms since the epoch; the record id's time part).
    since_ms: int | None = None
    #: Dead-lettered at or before this time (ms, inclusive).
    until_ms: int | None = None
    max_count: int = 1000
    newest_first: bool = False


@dataclass(frozen=True, slots=True)
class DlqOutcome:
    """What happened to one selected record."""

    dlq_id: str
    entry: DeadLetterEntry
    #: replayed | already | succeeded | missing | no_payload (replay); purged | missing (purge);
    #: would_replay | would_purge (dry run).
    outcome: str
    #: The new stream entry id for ``replayed`` (the earlier one for ``already``), else "".
    detail: str = ""


def parse_time_ms(text: str) -> int:
    """A time bound: Unix milliseconds, or an ISO-8601/RFC 3339 time (UTC when it has no zone)."""
    if text.isdigit():
        return int(text)
    moment = datetime.fromisoformat(text)  # raises ValueError; accepts a trailing "Z" (Python 3.11+)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


async def select_dead_letters(redis: Redis, keys: Keys, which: DlqFilter) -> list[tuple[str, DeadLetterEntry]]:
    """The DLQ records matching the filter, oldest first (newest first if asked), at most max_count."""
    start = f"{which.since_ms}-0" if which.since_ms is not None else "-"
    end = f"{which.until_ms}-99999999" if which.until_ms is not None else "+"
    rows = await redis.xrange(keys.dead_letter_stream, start, end)
    if which.newest_first:
        rows = list(reversed(rows))
    out: list[tuple[str, DeadLetterEntry]] = []
    for dlq_id, fields in rows:
        entry = DeadLetterEntry.from_fields(fields)
        if which.failure_class and entry.failure_class != which.failure_class:
            continue
        if which.job_id and entry.job_id != which.job_id:
            continue
        out.append((dlq_id, entry))
        if len(out) >= which.max_count:
            break
    return out


OnOutcome = Callable[[int, DlqOutcome], Awaitable[None] | None]


async def process_dead_letters(
    functions: Functions,
    selected: list[tuple[str, DeadLetterEntry]],
    action: Action,
    *,
    dry_run: bool = False,
    rate_per_s: float = 0.0,
    on_outcome: OnOutcome | None = None,
) -> dict[str, int]:
    """Replay (or purge) each selected record in order, at most ``rate_per_s`` a second (0: no limit).

    ``on_outcome(index, outcome)`` (sync or async) is called after each record, so callers can print or
    record progress. Returns the count per outcome.
    """
    counts: dict[str, int] = {}
    interval_s = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
    for i, (dlq_id, entry) in enumerate(selected):
        if dry_run:
            outcome, detail = f"would_{action}", ""
        elif action == "replay":
            outcome, detail = await functions.replay_dead_letter(dlq_id, entry.job_id, entry.request_hash)
        else:
            outcome, detail = ("purged" if await functions.purge_dead_letter(dlq_id) else "missing"), ""
        counts[outcome] = counts.get(outcome, 0) + 1
        if on_outcome is not None:
            result = on_outcome(i, DlqOutcome(dlq_id, entry, outcome, detail))
            if inspect.isawaitable(result):
                await result
        if interval_s and i + 1 < len(selected):
            await asyncio.sleep(interval_s)
    return counts
