"""Who may read which entries, and the cursor that pages through them, newest first.

A cursor names (org, seq) of the last entry of a page plus a fingerprint of the query it
belongs to, sealed with an HMAC: a garbled or forged cursor, or one reused with another
user, org or filter, is refused instead of paging through something else.
"""

import base64
import binascii
import hashlib
import hmac
from datetime import datetime
from typing import Any

import msgspec

MAX_LIMIT = 500
MAX_CURSOR = 512


class InvalidQuery(ValueError):
    """The query cannot be answered; the message is for a human."""


class Scope(msgspec.Struct, frozen=True):
    """An org's entries; with `user_id`, only those the user did or that are about them."""

    org_id: str
    user_id: str | None


def scope_for(org_id: str, user_id: str, is_admin: bool) -> Scope:
    return Scope(org_id, None if is_admin else user_id)


def check_page(limit: int, since: datetime | None, until: datetime | None) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if since is not None and until is not None and since > until:
        raise InvalidQuery("since must not be after until")


class _Position(msgspec.Struct, array_like=True, frozen=True):
    org_id: str
    seq: int
    query: str


def fingerprint(scope: Scope, filters: dict[str, Any]) -> str:
    body = msgspec.json.encode([scope.org_id, scope.user_id, filters], order="sorted")
    return hashlib.sha256(body).hexdigest()[:16]


def encode_cursor(scope: Scope, filters: dict[str, Any], seq: int, key: bytes) -> str:
    body = _b64(msgspec.json.encode(_Position(scope.org_id, seq, fingerprint(scope, filters))))
    return f"{body}.{_b64(_mac(key, body))}"


def decode_cursor(cursor: str, scope: Scope, filters: dict[str, Any], key: bytes) -> int:
    """The seq to continue below; InvalidQuery for anything this service did not issue."""
    body, _, mac = cursor.partition(".")
    try:
        if len(cursor) > MAX_CURSOR or not hmac.compare_digest(_unb64(mac), _mac(key, body)):
            raise ValueError("bad seal")
        position = msgspec.json.decode(_unb64(body), type=_Position)
    except (ValueError, binascii.Error, msgspec.DecodeError, msgspec.ValidationError):
        raise InvalidQuery("the cursor is not valid; start again without one") from None
    if position.org_id != scope.org_id or position.query != fingerprint(scope, filters):
        raise InvalidQuery("the cursor belongs to another query; start again without one")
    return position.seq


def _mac(key: bytes, body: str) -> bytes:
    return hmac.new(key, body.encode(), hashlib.sha256).digest()[:16]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
