"""Structured JSON logs, one object a line, with secrets redacted before they are written."""

import logging
import sys
import traceback
from datetime import UTC, datetime

import msgspec

from services.kit.redaction import redact

_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update({k: redact(str(v)) for k, v in extra.items()})
        if record.exc_info and record.exc_info[0] is not None:
            # Redact first, then shorten: a cut through a key would leave a fragment that no
            # longer looks like a key (no `mcp_`) and would be written out as it is.
            entry["error"] = redact("".join(traceback.format_exception(*record.exc_info)))[-4000:]
        return _encoder.encode(entry).decode()


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Per-message framework chatter would dominate the hot path; keep warnings only.
    for noisy in ("faststream", "nats", "uvicorn.access", "eventsourcing", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
