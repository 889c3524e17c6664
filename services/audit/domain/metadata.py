"""Makes an event payload safe and stable to keep in the trail.

Secret-looking fields are dropped, strings pass through the kit's redaction, and values
are bounded. Values are also normalised so that they come back from PostgreSQL `jsonb`
exactly as they went in: entry hashes are recomputed from stored rows, and NUL characters
(which PostgreSQL refuses) must never stall the projection.
"""

import functools
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


@functools.lru_cache(maxsize=4096)  # pure, and called for every field of every event
def is_secret_field(name: str) -> bool:
    lowered = name.lower()
    return lowered in DROPPED_FIELDS or any(word in lowered for word in SECRET_WORDS)


def clean_text(text: str, limit: int = MAX_TEXT) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    text = redact(text)
    return text if len(text) <= limit else text[:limit] + TRUNCATED


def clean_id(text: str | None) -> str | None:
    """An identifier fit for an indexed column: an over-long one is replaced by its digest."""
    if text is None:
        return None
    text = clean_text(text, limit=10 * MAX_ID)
    if len(text) > MAX_ID:
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text


def plain_id(text: str | None) -> str | None:
    """`clean_id` of a string `redact` leaves unchanged (see `scrub_plain`)."""
    return text if text is None or len(text) <= MAX_ID else clean_id(text)


def scrub(data: dict[str, Any]) -> dict[str, Any]:
    """The payload as audit metadata, with secrets removed."""
    cleaned = _value(data, 0)
    return cleaned if isinstance(cleaned, dict) else {"payload": cleaned}


def scrub_plain(data: dict[str, Any]) -> dict[str, Any]:
    """`scrub(data)` for a payload none of whose strings `redact` would change (the caller
    checked its JSON with `leaves_unchanged`): the same walk, with no redaction to ask for.
    Secret-looking fields are dropped and values bounded exactly as by `scrub`."""
    cleaned = _plain(data, 0)
    assert isinstance(cleaned, dict)
    return cleaned


def _value(value: Any, depth: int) -> Any:
    kind = type(value)  # exact-type fast paths first: a replay scrubs millions of values
    if kind is str:
        return clean_text(value)
    if kind is int or kind is bool or value is None:
        return value
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
        items = value.items() if len(value) <= MAX_ITEMS else list(value.items())[:MAX_ITEMS]
        for key, item in items:
            name = key if type(key) is str else str(key)
            if not is_secret_field(name):
                out[clean_text(name, MAX_ID)] = _value(item, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_value(item, depth + 1) for item in value[:MAX_ITEMS]]
    return clean_text(str(value))


def _plain(value: Any, depth: int) -> Any:
    """`_value` for JSON values whose strings hold no NUL and nothing `redact` replaces."""
    kind = type(value)
    if kind is str:
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + TRUNCATED
    if kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return _number(value)
    if kind is not dict and kind is not list:
        return _value(value, depth)  # not from a JSON decoder: the general walk
    if depth >= MAX_DEPTH:
        return REDACTED + TRUNCATED
    if kind is list:
        return [_plain(item, depth + 1) for item in value[:MAX_ITEMS]]
    out: dict[str, Any] = {}
    items = value.items() if len(value) <= MAX_ITEMS else list(value.items())[:MAX_ITEMS]
    for key, item in items:
        if type(key) is not str:
            return _value(value, depth)
        if is_secret_field(key):
            continue
        kind = type(item)  # scalars inline: this loop runs for every field of every event
        if kind is str:
            if len(item) > MAX_TEXT:
                item = item[:MAX_TEXT] + TRUNCATED
        elif not (kind is int or kind is bool or item is None):
            item = _plain(item, depth + 1)
        out[key if len(key) <= MAX_ID else key[:MAX_ID] + TRUNCATED] = item
    return out


def _number(value: float) -> float | int | None:
    """jsonb keeps decimal text: 1e16 comes back as an int, -0.0 as 0.0, NaN is refused."""
    if not math.isfinite(value):
        return None
    if value == 0:
        return 0.0
    if value.is_integer() and abs(value) >= 1e16:
        return int(Decimal(repr(value)))
    return value
