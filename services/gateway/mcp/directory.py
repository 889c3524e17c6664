"""The tools a caller can see: their servers' catalogs from mcp_proxy, cached for a few seconds.

A catalog holds each tool already encoded as JSON (pages are joined from those bytes) and the
route from each exposed name back to (server, upstream tool name).
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import msgspec

from contracts.commands.common import CommandMeta
from contracts.commands.mcp import Caller, ListTools, ToolCatalog, UpstreamFeatures, present
from services.gateway.mcp import naming
from services.gateway.mcp.protocol import INVALID_PARAMS, ProtocolError
from services.kit.rpc import CommandClient

CATALOG_TTL_S: Final = 5.0
LIST_TIMEOUT_S: Final = 30.0
_MAX_ENTRIES: Final = 20_000


class ExposedTool(msgspec.Struct, omit_defaults=True):
    name: str
    inputSchema: msgspec.Raw
    description: str | None = None
    title: str | None = None
    annotations: msgspec.Raw | None = None


@dataclass(slots=True)
class Catalog:
    tools: list[bytes] = field(default_factory=list)  # each tool's JSON, in listing order
    routes: dict[str, tuple[str, str]] = field(default_factory=dict)  # exposed -> (server, tool)
    errors: dict[str, str] = field(default_factory=dict)  # server -> why it could not be listed
    features: dict[str, UpstreamFeatures] = field(default_factory=dict)  # server -> besides tools
    fetched_at: float = 0.0


_encoder = msgspec.json.Encoder()
MetaSource = Callable[[], CommandMeta]  # the command meta, made only if a fetch needs it


def build_catalog(reply: ToolCatalog, scope: str | None, now: float) -> Catalog:
    """`scope` None: every server, names prefixed; a server name: that server, names as they are."""
    catalog = Catalog(fetched_at=now)
    for entry in sorted(reply.servers, key=lambda s: s.server):
        if entry.error is not None:
            catalog.errors[entry.server] = entry.error
            continue
        catalog.features[entry.server] = entry.features
        for tool in entry.tools:
            name = tool.name if scope is not None else naming.exposed_name(entry.server, tool.name)
            if name in catalog.routes:
                continue
            catalog.routes[name] = (entry.server, tool.name)
            annotations = tool.annotations if present(tool.annotations) else None
            exposed = ExposedTool(name, tool.inputSchema, tool.description, tool.title, annotations)
            catalog.tools.append(_encoder.encode(exposed))
    return catalog


def _retrieve(task: "asyncio.Task[Catalog]") -> None:
    if not task.cancelled():
        task.exception()  # seen: the callers that still wait get it from `await`


class ToolDirectory:
    def __init__(self, client: CommandClient, ttl_s: float = CATALOG_TTL_S) -> None:
        self.client, self.ttl_s = client, ttl_s
        self._cache: dict[tuple[str, str | None], Catalog] = {}
        self._pending: dict[tuple[str, str | None], asyncio.Task[Catalog]] = {}

    async def catalog(
        self, caller: Caller, meta: MetaSource, scope: str | None, fresh: bool = False
    ) -> Catalog:
        key = (caller.user_id, scope)
        cached = self._cache.get(key)
        if cached is not None and not fresh and time.monotonic() - cached.fetched_at < self.ttl_s:
            return cached
        fetch = self._pending.get(key)
        if fetch is None:  # else someone is fetching it already: share their answer
            fetch = asyncio.create_task(self._fetch(key, ListTools(meta=meta(), caller=caller, server=scope)))
            self._pending[key] = fetch
            fetch.add_done_callback(_retrieve)
        return await asyncio.shield(fetch)  # a caller that goes away does not cancel the others

    async def _fetch(self, key: tuple[str, str | None], request: ListTools) -> Catalog:
        try:
            reply = await self.client.call(
                "mcp_proxy", "list_tools", request, ToolCatalog, timeout=LIST_TIMEOUT_S
            )
        finally:
            del self._pending[key]
        now = time.monotonic()
        catalog = build_catalog(reply, request.server, now)
        if len(self._cache) >= _MAX_ENTRIES:
            self._cache = {k: c for k, c in self._cache.items() if now - c.fetched_at < self.ttl_s}
        self._cache[key] = catalog
        return catalog

    async def resolve(
        self, caller: Caller, meta: MetaSource, scope: str | None, name: str
    ) -> tuple[str, str]:
        """(server, upstream tool) for a name a client called; INVALID_PARAMS if there is none."""
        if scope is not None:
            return scope, name
        if not naming.may_be_shortened(name):
            parts = naming.split(name)
            if parts is not None:
                return parts
        for fresh in (False, True):
            route = (await self.catalog(caller, meta, scope, fresh=fresh)).routes.get(name)
            if route is not None:
                return route
        parts = naming.split(name)
        if parts is None:
            raise ProtocolError(
                INVALID_PARAMS,
                f"Unknown tool {name!r}: tools here are named `<server>__<tool>` (see tools/list).",
            )
        return parts

    def forget(self, user_id: str) -> None:
        """Drops a user's cached catalogs (after they registered or removed a server)."""
        self.forget_where(lambda cached_for: cached_for == user_id)

    def forget_where(self, stale: Callable[[str], bool]) -> None:
        """Drops the cached catalogs of every user for whom `stale(user_id)` holds."""
        for key in [k for k in self._cache if stale(k[0])]:
            del self._cache[key]
