"""Makes an event payload safe and stable to keep in the trail.

Secret-looking fields are dropped, strings pass through the kit's redaction, and values
are bounded. Values are also normalised so that they come back from PostgreSQL `jsonb`
exactly as they went in: entry hashes are recomputed from stored rows, and NUL characters
(which PostgreSQL refuses) must never stall the projection.
"""

import hashlib
import math
from decimal import Decimal
from typing import Any

from services.kit.redaction import REDACTED, redact

DROPPED_FIELDS = frozenset({"key_hash", "api_key", "authorization", "private_key"})
SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "value")
MAX_TEXT = 4096
MAX_ID = 200
MAX_ITEMS = 100
MAX_DEPTH = 12
TRUNCATED = "…[TRUNCATED]"


def is_secret_field(name: str) -> bool:
    lowered = name.lower()
    return lowered in DROPPED_FIELDS or any(word in lowered for word in SECRET_WORDS)


def clean_text(text: str, limit: int = MAX_TEXT) -> str:
    text = redact(text.replace("\x00", "\ufffd"))
    return text if len(text) <= limit else text[:limit] + TRUNCATED


def clean_id(text: str | None) -> str | None:
    """An identifier fit for an indexed column: an over-long one is replaced by its digest."""
    if text is None:
        return None
    text = clean_text(text, limit=10 * MAX_ID)
    if len(text) > MAX_ID:
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text


def scrub(data: dict[str, Any]) -> dict[str, Any]:
    """The payload as audit metadata, with secrets removed."""
    cleaned = _value(data, 0)
    return cleaned if isinstance(cleaned, dict) else {"payload": cleaned}


def _value(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return _number(value)
    if depth >= MAX_DEPTH:
        return REDACTED + TRUNCATED
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in list(value.items())[:MAX_ITEMS]:
            if not is_secret_field(str(key)):
                out[clean_text(str(key), MAX_ID)] = _value(item, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_value(item, depth + 1) for item in value[:MAX_ITEMS]]
    return clean_text(str(value))


def _number(value: float) -> float | int | None:
    """jsonb keeps decimal text: 1e16 comes back as an int, -0.0 as 0.0, NaN is refused."""
    if not math.isfinite(value):
        return None
    if value == 0:
        return 0.0
    if value.is_integer() and abs(value) >= 1e16:
        return int(Decimal(repr(value)))
    return value
