"""JSON-lines logging with job context (job_id, entry_id, attempt, trace_id) on every record."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: Extra attributes copied into each JSON line when a log call passes them via ``extra=``.
CONTEXT_FIELDS = ("job_id", "request_hash", "entry_id", "attempt", "trace_id", "consumer", "component",
                  "event", "child", "pid")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context fields, exception."""

    # The formatted second, reused while it lasts: a busy consumer logs two lines per job, and strftime
    # was a fifth of the formatting cost.
    _second = -1
    _second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as JSON."""
        second = int(record.created)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        data: dict[str, Any] = {
            "ts": f"{self._second_text}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str = "INFO", json_format: bool = True, component: str | None = None) -> None:
    """Send logs to stderr as JSON lines (or plain text), tagging each with the component."""
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if component:
        def _tag(record: logging.LogRecord) -> bool:
            if not hasattr(record, "component"):
                record.component = component
            return True
        handler.addFilter(_tag)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "rasterio", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
