"""Removes secret-looking values from text before it reaches a log line or an audit entry."""

import re
import threading

API_KEY_PATTERN = re.compile(r"mcp_[A-Za-z0-9_\-]{16,}")
REDACTED = "[REDACTED]"

_registered: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Values registered here are replaced wherever they appear (min 6 characters)."""
    if len(value) >= 6:
        with _lock:
            _registered.add(value)


def redact(text: str) -> str:
    text = API_KEY_PATTERN.sub(lambda m: m.group(0)[:12] + "…" + REDACTED, text)
    if _registered:
        for value in tuple(_registered):
            if value in text:
                text = text.replace(value, REDACTED)
    return text
