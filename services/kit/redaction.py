"""Removes secret-looking values from text before it reaches a log line or an audit entry."""

import re
import threading

API_KEY_PATTERN = re.compile(r"mcp_[A-Za-z0-9_\-]{16,}")
_API_KEY_BYTES = re.compile(API_KEY_PATTERN.pattern.encode())
REDACTED = "[REDACTED]"

_registered: set[str] = set()
# Longest first: a registered value that is part of a longer one must not cut the longer one
# into pieces that then go out unredacted ("sup3r-[REDACTED]-value").
_by_length: tuple[str, ...] = ()
_registered_bytes: tuple[bytes, ...] = ()  # the same values, UTF-8, for `leaves_unchanged`
_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Values registered here are replaced wherever they appear (min 6 characters)."""
    global _registered_bytes, _by_length
    if len(value) >= 6:
        with _lock:
            _registered.add(value)
            _by_length = tuple(sorted(_registered, key=len, reverse=True))
            _registered_bytes = tuple(v.encode() for v in _registered)


def registered() -> tuple[str, ...]:
    """Every registered value: for a worker process that must redact alike (never logged)."""
    return _by_length


def secrets_version() -> int:
    """Changes whenever a secret is registered (values are never removed): for caches of `redact`."""
    return len(_registered)


def leaves_unchanged(raw: bytes) -> bool:
    """True when `redact` returns unchanged every string decoded from the JSON document `raw`.

    Without escapes (no backslash) each decoded string is a slice of `raw`, so a key or a
    registered secret found in one of them would be found in `raw`. False means: ask `redact`
    string by string.
    """
    if b"\\" in raw or b"\x00" in raw or (b"mcp_" in raw and _API_KEY_BYTES.search(raw)):
        return False
    return not any(value in raw for value in _registered_bytes)


def redact(text: str) -> str:
    if "mcp_" in text:  # the pattern needs it; skipping the regex halves the cost of clean text
        text = API_KEY_PATTERN.sub(lambda m: m.group(0)[:12] + "…" + REDACTED, text)
    if _by_length:
        for value in _by_length:
            if value in text:
                text = text.replace(value, REDACTED)
    return text
