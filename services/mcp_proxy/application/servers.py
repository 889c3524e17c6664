"""The registry as a user sees it: register, list, remove, probe, and list tools."""

import asyncio
import time
from typing import Any

import msgspec

from contracts.commands.common import CommandMeta
from contracts.commands.mcp import (
    Caller,
    ListTools,
    RegisterServer,
    RemoveServer,
    ServerList,
    ServerTools,
    ServerView,
    TestServer,
    ToolCatalog,
)
from services.kit.rpc import CommandFailed, refuse
from services.mcp_proxy.application.calls import Calls
from services.mcp_proxy.application.ports import QuotaExceeded, ServerStatus, UpstreamError
from services.mcp_proxy.application.registry import Registry
from services.mcp_proxy.domain.catalog import Entry
from services.mcp_proxy.domain.errors import MissingSecret


def meta_dict(meta: Any) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(meta)
    return out


def view(entry: Entry, status: ServerStatus | None) -> ServerView:
    return ServerView(
        name=entry.name,
        transport=entry.spec.transport,
        scope=entry.scope,
        status=status.status if status else "unknown",
        tools_count=status.tools_count if status else 0,
        requires_auth=bool(entry.secrets),
        secrets=list(entry.secrets),
        error=status.error if status else None,
        created_at=entry.created_at,
    )


class Servers:
    def __init__(self, registry: Registry, calls: Calls) -> None:
        self.registry, self.calls = registry, calls

    async def register(self, c: RegisterServer) -> ServerView:
        try:
            entry = await self.registry.register(c.caller, c.scope, c.spec, meta_dict(c.meta))
        except QuotaExceeded as over:  # the server limit: 429 with the quota service's sentence
            raise CommandFailed(over.problem()) from None
        return view(entry, None)

    async def list_servers(self, caller: Caller) -> ServerList:
        entries = await self.registry.visible(caller)
        seen = await self.calls.status.read(caller.user_id)
        return ServerList([view(e, seen.get(e.server_id)) for _, e in sorted(entries.items())])

    async def remove(self, c: RemoveServer) -> None:
        await self.registry.remove(c.caller, c.name, c.scope, meta_dict(c.meta))

    async def entry(self, caller: Caller, name: str) -> Entry:
        entry = await self.registry.lookup(caller, name)
        if entry is None:
            raise refuse(
                404,
                "Not found",
                f"You have no MCP server named {name!r}; list yours with GET /v1/mcp/servers.",
                code="unknown_server",
            )
        return entry

    async def test(self, c: TestServer) -> ServerView:
        """Starts or reaches the server with the caller's secrets and lists its tools afresh."""
        entry = await self.entry(c.caller, c.name)
        status = await self._probe(c.caller, entry, c.meta, refresh=True)
        await self.calls.note(c.caller.user_id, entry, status, wait=True)
        return view(entry, status)

    async def tools(self, c: ListTools) -> ToolCatalog:
        """Every server's tools; one that fails or is too slow is listed with its error."""
        if c.server is not None:
            entries = [await self.entry(c.caller, c.server)]
        else:
            entries = [e for _, e in sorted((await self.registry.visible(c.caller)).items())]
        listed = await asyncio.gather(*(self._listing(c.caller, e, c.meta) for e in entries))
        return ToolCatalog(list(listed))

    async def _listing(self, caller: Caller, entry: Entry, meta: CommandMeta) -> ServerTools:
        found = ServerTools(server=entry.name)
        status = await self._probe(caller, entry, meta, refresh=False, listed=found)
        await self.calls.note(caller.user_id, entry, status)
        found.error = status.error
        return found

    async def _probe(
        self,
        caller: Caller,
        entry: Entry,
        meta: CommandMeta,
        refresh: bool,
        listed: ServerTools | None = None,
    ) -> ServerStatus:
        """Opens (starting it if need be) and lists, within what the caller will wait for;
        `listed` receives the tools and the upstream's other features."""
        budget = self.calls.settings.start_timeout_s + 5
        if meta.deadline is not None:  # answer in time, with an error for what is still starting
            budget = max(min(budget, meta.deadline - time.time() - 0.1), 0.01)
        try:
            async with asyncio.timeout(budget):
                target = await self.calls.target(
                    caller, entry, f"list-{meta.correlation_id}", meta.correlation_id
                )
                upstream = await self.calls.upstreams.open(target)
                tools = await upstream.tools(refresh=refresh)
        except (MissingSecret, UpstreamError) as err:
            return ServerStatus("error", 0, str(err))
        except TimeoutError:
            return ServerStatus(
                "error",
                0,
                f"The server '{entry.name}' did not answer in time (it may still be starting); try again.",
            )
        if listed is not None:
            listed.tools, listed.features = tools, upstream.features
        return ServerStatus("ok", len(tools))
