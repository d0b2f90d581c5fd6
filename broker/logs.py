"""Structured (JSON lines) logging, so operators can ship and query the audit trail."""

from __future__ import annotations

import json
import logging
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            entry.update(audit)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info") -> None:
    # The formatter writes none of these, and looking them up is most of the cost of a
    # log call on the hot path (one audit line per request); see "Optimization" in the
    # logging HOWTO.
    logging._srcfile = None  # skip the caller's stack frame
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Request lines from werkzeug/urllib3 can carry tokens in query strings
    # (tokeninfo?access_token=...): keep them at WARNING.
    for noisy in ("urllib3", "werkzeug", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
