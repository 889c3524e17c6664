"""MCP sessions (`Mcp-Session-Id`, and the legacy SSE transport's `session_id`) in NATS KV.

Any gateway replica can serve any session: the record lives in the KV bucket
`gatehouse_mcp_sessions` (TTL one hour, renewed while the session is used), with a small
in-memory cache in front. A cached record is re-read from the bucket every `RECHECK_S`, and
an ended session is dropped from every replica's cache at once by a broadcast on
`mcp.session.ended`, a changed one (`logging/setLevel`, a legacy SSE client's `initialize`) by
one on `mcp.session.changed`.
"""

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from services.kit.bus import Bus

log = logging.getLogger(__name__)

BUCKET: Final = "gatehouse_mcp_sessions"
ENDED_SUBJECT: Final = "mcp.session.ended"
CHANGED_SUBJECT: Final = "mcp.session.changed"
TTL_S: Final = 3600.0
RECHECK_S: Final = 15.0  # a cached record is trusted this long before the bucket is asked again
RENEW_S: Final = 300.0  # a used session's TTL is renewed at most this often (per replica)
_MAX_CACHED: Final = 50_000


class SessionStoreDown(Exception):
    """The KV bucket could not be reached (NATS down or reconnecting)."""


class McpSession(msgspec.Struct, kw_only=True):
    user_id: str
    key_id: str
    protocol_version: str
    server: str | None  # None: `/mcp` (every server); a name: `/servers/{name}/mcp`
    transport: Literal["streamable", "sse"] = "streamable"
    created_at: float = 0.0
    log_level: str | None = None  # set by logging/setLevel: the upstreams' logs are relayed from it up
    # What the client's initialize declared it answers (sampling, elicitation.form|url): the
    # upstreams' requests of that kind during a call are relayed to it (mcp/exchange.py).
    client_features: list[str] = msgspec.field(default_factory=list)


def belongs(session: McpSession | None, user_id: str, server: str | None, transport: str) -> bool:
    """Another user's session, or one of another endpoint or transport, is reported as not found."""
    return (
        session is not None
        and session.user_id == user_id
        and session.server == server
        and session.transport == transport
    )


@dataclass(slots=True)
class _Cached:
    session: McpSession
    checked_at: float
    renewed_at: float


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(McpSession)


def new_session_id() -> str:
    """256 random bits, URL-safe (valid as a KV key and as a visible-ASCII header value)."""
    return secrets.token_urlsafe(32)


class SessionStore:
    def __init__(self, bus: Bus, ttl_s: float = TTL_S) -> None:
        self.bus, self.ttl_s = bus, ttl_s
        self._kv: KeyValue | None = None
        self._cache: dict[str, _Cached] = {}

    async def start(self) -> None:
        self._kv = await self._bucket()
        await self.bus.nc.subscribe(ENDED_SUBJECT, cb=self._on_ended)
        await self.bus.nc.subscribe(CHANGED_SUBJECT, cb=self._on_ended)

    async def _bucket(self) -> KeyValue:
        try:
            return await self.bus.js.key_value(BUCKET)
        except BucketNotFoundError:
            pass
        try:
            return await self.bus.js.create_key_value(
                KeyValueConfig(bucket=BUCKET, ttl=self.ttl_s, history=1)
            )
        except BadRequestError:  # another replica created it first
            return await self.bus.js.key_value(BUCKET)

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "SessionStore.start() first"
        return self._kv

    async def create(self, session: McpSession) -> str:
        session_id = new_session_id()
        session.created_at = time.time()
        await self.kv.put(session_id, _encoder.encode(session))
        now = time.monotonic()
        self._remember(session_id, _Cached(session, now, now))
        return session_id

    async def get(self, session_id: str) -> McpSession | None:
        """The live session, or None (never existed, expired or ended)."""
        now = time.monotonic()
        cached = self._cache.get(session_id)
        if cached is not None and now - cached.checked_at < RECHECK_S:
            if now - cached.renewed_at >= RENEW_S:
                cached.renewed_at = now
                await self._renew(session_id, _encoder.encode(cached.session))
            return cached.session
        if not _valid_key(session_id):
            return None
        try:
            entry = await self.kv.get(session_id)
        except KeyNotFoundError:  # also KeyDeletedError
            self._cache.pop(session_id, None)
            return None
        except Exception as err:
            if cached is not None:  # the bucket is out of reach: trust what we knew a moment ago
                log.warning("session store unreachable (%s); using the cached session", type(err).__name__)
                return cached.session
            raise SessionStoreDown(type(err).__name__) from err
        if entry.value is None:
            return None
        session = _decoder.decode(entry.value)
        renewed = cached.renewed_at if cached is not None else 0.0
        if now - renewed >= RENEW_S:
            await self._renew(session_id, entry.value)
            renewed = now
        self._remember(session_id, _Cached(session, now, renewed))
        return session

    async def _renew(self, session_id: str, value: bytes) -> None:
        """Puts the record again, which restarts its TTL; a failure only shortens its life."""
        try:
            await self.kv.put(session_id, value)
        except Exception as err:
            log.warning("could not renew an MCP session's TTL: %s", type(err).__name__)

    async def set_log_level(self, session_id: str, level: str) -> None:
        await self._change(session_id, log_level=level)

    async def set_client_features(self, session_id: str, features: list[str]) -> None:
        """Legacy SSE: the client's initialize comes after the session was made."""
        await self._change(session_id, client_features=features)

    async def _change(self, session_id: str, **fields: Any) -> None:
        session = await self.get(session_id)
        if session is None or all(getattr(session, k) == v for k, v in fields.items()):
            return
        changed = msgspec.structs.replace(session, **fields)
        value = _encoder.encode(changed)
        try:
            await self.kv.put(session_id, value)
        except Exception as err:
            raise SessionStoreDown(type(err).__name__) from err
        now = time.monotonic()
        self._remember(session_id, _Cached(changed, now, now))
        await self.bus.nc.publish(CHANGED_SUBJECT, session_id.encode())  # other replicas re-read it

    async def end(self, session_id: str) -> None:
        self._cache.pop(session_id, None)
        try:
            await self.kv.delete(session_id)
            await self.bus.nc.publish(ENDED_SUBJECT, session_id.encode())
        except KeyNotFoundError:
            pass
        except Exception as err:  # unreachable bucket: the record expires with its TTL
            log.warning("could not end an MCP session now (%s); it expires by itself", type(err).__name__)

    def _remember(self, session_id: str, cached: _Cached) -> None:
        if len(self._cache) >= _MAX_CACHED:
            now = time.monotonic()
            self._cache = {k: c for k, c in self._cache.items() if now - c.checked_at < RECHECK_S}
        self._cache[session_id] = cached

    async def _on_ended(self, msg: Msg) -> None:
        self._cache.pop(msg.data.decode(errors="replace"), None)


def _valid_key(session_id: str) -> bool:
    return 0 < len(session_id) <= 128 and all((c.isascii() and c.isalnum()) or c in "-_" for c in session_id)
