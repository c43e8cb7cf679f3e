"""A handler for fault tests, loaded into real consumer processes through
EVENTFLOW_CONSUMER__HANDLERS='{"ndvi": "tests.chaos:handler"}'. The farm id picks the behaviour."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from eventflow_consumer.handlers import JobContext

from eventflow.contract import StreamEntry


def handler(entry: StreamEntry, ctx: JobContext) -> dict[str, Any]:
    """poison-raise-*: raises; poison-crash-*: dies by SIGSEGV; poison-hang-*: never returns;
    poison-mem-*: allocates past the memory limit; anything else succeeds at once."""
    farm = str(entry.payload.get("farm_id", ""))
    if farm.startswith("poison-raise"):
        raise RuntimeError("chaos: raising handler")
    if farm.startswith("poison-crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if farm.startswith("poison-hang"):
        while True:
            time.sleep(1)
    if farm.startswith("poison-mem"):
        hog = bytearray(8 * 1024**3)  # more than any limit the tests set
        return {"size": len(hog)}
    ctx.progress(1.0)
    return {"outputs": {}, "stats": {"farm": farm}}
