"""Facts observed by the gateway (subjects `events.gateway.<name>`).

The gateway keeps no store of its own, so it publishes these straight to the stream (the
stream is their record). A presented key never travels: only its public prefix (`mcp_` + 8),
and the key and user ids when the key is known (revoked or expired).
"""

from datetime import datetime

import msgspec


class AuthFailed(msgspec.Struct, kw_only=True):
    """One refused authentication, or (`suppressed`) a summary of `attempts` refusals.

    The gateway reports the first few failures per (IP, key prefix) and window one by one, and
    folds the rest of the window into one summary, so a flood cannot fill the trail.
    """

    reason: str  # "unknown" | "revoked" | "expired" | "malformed"
    key_prefix: str | None = None  # the key's first 12 characters, only when it looks like a key
    key_id: str | None = None  # a revoked or expired key identity knows
    user_id: str | None = None  # that key's owner: the entry is about them
    method: str = ""
    path: str = ""
    attempts: int = 1
    suppressed: bool = False  # a summary of `attempts` failures not reported one by one
    sources: int = 1  # (IP, key prefix) pairs a summary covers
    first_at: datetime | None = None
    last_at: datetime | None = None
    summary: str | None = None  # a sentence, e.g. "41 further failures ... suppressed"
    outcome: str = "failure"


EVENTS: dict[str, type[msgspec.Struct]] = {
    "gateway.auth_failed": AuthFailed,
}
