"""Everything the MCP transports of one gateway replica share, started on first use."""

import asyncio
import logging
import os
import re
from collections.abc import Coroutine, Mapping
from typing import Any, Final

from services.gateway.adapters.catalog_feed import CatalogFeed
from services.gateway.adapters.mcp_listeners import Listeners, max_streams_from_env
from services.gateway.adapters.mcp_relay import Relay
from services.gateway.adapters.mcp_sessions import SessionStore
from services.gateway.adapters.upstream_changes import UpstreamChanges
from services.gateway.application import Gateway
from services.gateway.mcp.asks import AskIds
from services.gateway.mcp.directory import ToolDirectory
from services.gateway.mcp.exchange import CancelNotice, Exchange
from services.gateway.mcp.listening import CatalogChange, UpstreamChange

log = logging.getLogger(__name__)

ORIGINS_ENV: Final = "GATEHOUSE_ALLOWED_ORIGINS"
_LOCAL_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?$")


class OriginPolicy:
    """Which browser origins may talk to the MCP endpoints (DNS-rebinding protection).

    A request without `Origin` (every non-browser client) is allowed. By default only
    http(s)://localhost, 127.0.0.1 and [::1] on any port are; `GATEHOUSE_ALLOWED_ORIGINS`
    (comma-separated exact origins, or `*`) replaces that list.
    """

    def __init__(self, allowed: frozenset[str] | None = None, any_origin: bool = False) -> None:
        self.allowed, self.any_origin = allowed, any_origin

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OriginPolicy":
        raw = (os.environ if env is None else env).get(ORIGINS_ENV, "").strip()
        if not raw:
            return cls()
        origins = frozenset(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())
        return cls(origins, any_origin="*" in origins)

    def allows(self, origin: str | None) -> bool:
        if origin is None or self.any_origin:
            return True
        if self.allowed is None:
            return _LOCAL_ORIGIN.match(origin.lower()) is not None
        return origin.rstrip("/").lower() in self.allowed


class McpFace:
    def __init__(self, gateway: Gateway, origins: OriginPolicy | None = None) -> None:
        self.gateway = gateway
        self.max_body_bytes = gateway.settings.max_body_bytes
        self.origins = origins or OriginPolicy.from_env()
        self.directory = ToolDirectory(gateway.client)
        self.sessions = SessionStore(gateway.bus)
        self.relay = Relay(gateway.bus)
        self.listeners = Listeners(gateway.bus, max_streams_from_env())
        self.catalog_feed = CatalogFeed(gateway.bus, self._catalog_changed)
        self.upstream_changes = UpstreamChanges(gateway.bus, self._upstream_changed)
        self.exchange = Exchange(
            gateway,
            self.directory,
            self.relay.broadcast_cancel,
            self.relay.listen,
            self.sessions.set_log_level,
            AskIds(gateway.pepper),
            self.relay.answer,
        )
        self._started = False
        self._starting = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def ready(self) -> None:
        if self._started:
            return
        async with self._starting:
            if not self._started:
                await self.sessions.start()
                await self.relay.start(self._cancel_from_elsewhere)
                await self.listeners.start()
                await self.catalog_feed.start()
                await self.upstream_changes.start()
                self._started = True

    def _catalog_changed(self, change: CatalogChange) -> None:
        """A server was registered or removed (through any replica): the cached catalogs it
        touches go first, so a client told to list again gets the new list from this replica."""
        if change.scope == "user" and change.owner_user_id is not None:
            self.directory.forget(change.owner_user_id)
        elif change.scope == "org" and change.org_id is not None:
            users = self.gateway.view.users

            def in_org(user_id: str) -> bool:
                user = users.get(user_id)
                return user is None or user.org_id == change.org_id

            self.directory.forget_where(in_org)
        self.listeners.changed(change)

    def _upstream_changed(self, change: UpstreamChange) -> None:
        """One user's upstream changed its own tools: their cached catalogs go, then their
        streams are told (never another user's: mcp_proxy runs upstreams per user)."""
        self.directory.forget(change.user_id)
        self.listeners.upstream_changed(change)

    async def stop(self) -> None:
        """Ends every server-to-client stream (uvicorn waits for open responses before it stops)."""
        self.listeners.close_all()
        await self.catalog_feed.stop()
        await self.upstream_changes.stop()

    async def _cancel_from_elsewhere(self, notice: CancelNotice) -> None:
        await self.exchange.cancel_here(notice)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs `work` after the HTTP exchange that asked for it has been answered."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("MCP background work failed", exc_info=task.exception())
