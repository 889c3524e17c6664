"""The server-to-client streams this replica holds, and which registry changes reach them.

Two kinds: the standalone stream of Streamable HTTP (`GET /mcp`, `GET /servers/{name}/mcp`
with a session) and the legacy `GET /sse` stream. A registry change heard by the catalog feed
(`catalog_feed.py`) becomes `notifications/tools/list_changed` on every stream whose audience
it affects (`mcp/listening.py`), and so does an upstream's own change (`upstream_changes.py`),
on that user's streams only.

Limits. One standalone stream per session: a newer GET replaces the older one, on whichever
replica each is held. The replica that opens a stream announces `<session id> <token>` on
`mcp.stream.opened` (core NATS, every replica listens); a stream is *armed* once its own
announcement has come back, and an armed stream that hears another token for its session
ends (NATS delivers one server's messages in the same order to every subscriber, so of two
streams opened at once exactly the later one stays). At most `GATEHOUSE_MCP_MAX_STREAMS`
standalone streams per replica (legacy streams are not counted: each is its own session).
Ended sessions (`mcp.session.ended`) and shutdown end their streams at once.
"""

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

from nats.aio.msg import Msg

from services.gateway.adapters.mcp_sessions import ENDED_SUBJECT
from services.gateway.mcp.listening import (
    LIST_CHANGED,
    Audience,
    CatalogChange,
    UpstreamChange,
    affects,
    hears,
)
from services.kit.bus import Bus
from services.kit.config import ConfigError

log = logging.getLogger(__name__)

OPENED_SUBJECT: Final = "mcp.stream.opened"
MAX_STREAMS_ENV: Final = "GATEHOUSE_MCP_MAX_STREAMS"
DEFAULT_MAX_STREAMS: Final = 10_000
_BACKLOG: Final = 4  # a standalone stream's unsent messages; one pending list_changed says it all


def max_streams_from_env(env: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if env is None else env).get(MAX_STREAMS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_STREAMS
    if not raw.isdigit():
        raise ConfigError(f"{MAX_STREAMS_ENV} must be a whole number of streams (0: none), not {raw!r}")
    return int(raw)


class StreamsUnavailable(Exception):
    """This replica holds as many streams as it may, or is shutting down."""


@dataclass(eq=False)
class Listener:
    session_id: str
    audience: Audience
    queue: "asyncio.Queue[bytes]"
    token: str | None = None  # standalone: its announcement; None: a legacy SSE stream
    armed: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self, message: bytes) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            pass  # a slow reader: what is still queued already tells it to list again


class Listeners:
    def __init__(self, bus: Bus, max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        self.bus, self.max_streams = bus, max_streams
        self._sessions: dict[str, Listener] = {}
        self._by_user: dict[str, set[Listener]] = {}
        self._by_org: dict[str, set[Listener]] = {}
        self._standalone = 0
        self._closing = False

    async def start(self) -> None:
        await self.bus.nc.subscribe(OPENED_SUBJECT, cb=self._on_opened)
        await self.bus.nc.subscribe(ENDED_SUBJECT, cb=self._on_ended)

    @property
    def standalone_count(self) -> int:
        return self._standalone

    def changed(self, change: CatalogChange) -> int:
        """Tells every affected stream on this replica; returns how many were told."""
        if change.scope == "user" and change.owner_user_id is not None:
            candidates = self._by_user.get(change.owner_user_id, set())
        elif change.scope == "org" and change.org_id is not None:
            candidates = self._by_org.get(change.org_id, set())
        else:
            return 0
        told = 0
        for listener in list(candidates):
            if affects(change, listener.audience):
                listener.notify(LIST_CHANGED)
                told += 1
        return told

    def upstream_changed(self, change: UpstreamChange) -> int:
        """An upstream's own tools change: that user's streams on this replica (`hears`)."""
        told = 0
        for listener in list(self._by_user.get(change.user_id, set())):
            if hears(change, listener.audience):
                listener.notify(LIST_CHANGED)
                told += 1
        return told

    @asynccontextmanager
    async def standalone(self, session_id: str, audience: Audience) -> AsyncIterator[Listener]:
        if self._closing or self._standalone >= self.max_streams:
            raise StreamsUnavailable
        token = secrets.token_urlsafe(12)
        listener = Listener(session_id, audience, asyncio.Queue(maxsize=_BACKLOG), token)
        older = self._sessions.get(session_id)
        if older is not None:  # replaced on this replica; other replicas hear the announcement
            older.closed.set()
            self._drop(older)
        self._add(listener)
        self._standalone += 1
        try:
            try:
                await self.bus.nc.publish(OPENED_SUBJECT, f"{session_id} {token}".encode())
            except Exception as err:  # without it the stream still works, it just replaces nothing
                log.warning("could not announce an MCP stream: %s", type(err).__name__)
            yield listener
        finally:
            self._standalone -= 1
            self._drop(listener)

    @asynccontextmanager
    async def legacy(
        self, session_id: str, audience: Audience, queue: "asyncio.Queue[bytes]"
    ) -> AsyncIterator[Listener]:
        """A legacy SSE stream: it gets the same notifications, in its own queue."""
        listener = Listener(session_id, audience, queue)
        if self._closing:
            listener.closed.set()
        self._add(listener)
        try:
            yield listener
        finally:
            self._drop(listener)

    def close_all(self) -> None:
        """Shutdown: every stream ends (uvicorn waits for open responses), no new one opens."""
        self._closing = True
        for listener in list(self._sessions.values()):
            listener.closed.set()

    def _add(self, listener: Listener) -> None:
        self._sessions[listener.session_id] = listener
        self._by_user.setdefault(listener.audience.user_id, set()).add(listener)
        self._by_org.setdefault(listener.audience.org_id, set()).add(listener)

    def _drop(self, listener: Listener) -> None:
        if self._sessions.get(listener.session_id) is listener:
            del self._sessions[listener.session_id]
        audience = listener.audience
        for index, key in ((self._by_user, audience.user_id), (self._by_org, audience.org_id)):
            held = index.get(key)
            if held is not None:
                held.discard(listener)
                if not held:
                    del index[key]

    async def _on_opened(self, msg: Msg) -> None:
        session_id, _, token = msg.data.decode(errors="replace").partition(" ")
        listener = self._sessions.get(session_id)
        if listener is None or listener.token is None:
            return
        if token == listener.token:
            listener.armed = True
        elif listener.armed:  # announced after ours: a newer stream of this session
            listener.closed.set()

    async def _on_ended(self, msg: Msg) -> None:
        listener = self._sessions.get(msg.data.decode(errors="replace"))
        if listener is not None:
            listener.closed.set()
