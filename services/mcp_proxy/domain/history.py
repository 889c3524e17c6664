"""The caller's call history: who may page through what, and a digest that survives rebuilds.

A cursor names the stream sequence of the last item of a page, the user and the server
filter it belongs to, sealed with an HMAC: a garbled or forged cursor, or one reused by
another user or with another filter, is refused (400) instead of paging through something
else. The digest folds every row in stream order, so a rebuild from the stream gives the
same digest as the live projection.
"""

import base64
import binascii
import hashlib
import hmac

import msgspec

from services.mcp_proxy.domain.errors import Invalid

MAX_LIMIT = 500
MAX_CURSOR = 512


class _Position(msgspec.Struct, array_like=True, frozen=True):
    user_id: str
    server: str | None
    seq: int


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise Invalid(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def encode_cursor(user_id: str, server: str | None, seq: int, key: bytes) -> str:
    body = _b64(msgspec.json.encode(_Position(user_id, server, seq)))
    return f"{body}.{_b64(_mac(key, body))}"


def decode_cursor(cursor: str, user_id: str, server: str | None, key: bytes) -> int:
    """The stream sequence to continue below; Invalid for a cursor this service did not issue."""
    body, _, mac = cursor.partition(".")
    try:
        if len(cursor) > MAX_CURSOR or not hmac.compare_digest(_unb64(mac), _mac(key, body)):
            raise ValueError("bad seal")
        position = msgspec.json.decode(_unb64(body), type=_Position)
    except (ValueError, binascii.Error, msgspec.DecodeError, msgspec.ValidationError):
        raise Invalid("the cursor is not valid; start again without one") from None
    if position.user_id != user_id or position.server != server:
        raise Invalid("the cursor belongs to another query; start again without one")
    return position.seq


class Digest:
    """sha256 over the history rows in stream order (each row as a JSON array)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.rows = 0
        self.users: set[str] = set()
        self.orgs: set[str] = set()

    def add(self, row: tuple[object, ...], user_id: str, org_id: str | None) -> None:
        self._hash.update(msgspec.json.encode(row) + b"\n")
        self.rows += 1
        self.users.add(user_id)
        if org_id:
            self.orgs.add(org_id)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _mac(key: bytes, body: str) -> bytes:
    return hmac.new(key, body.encode(), hashlib.sha256).digest()[:16]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
