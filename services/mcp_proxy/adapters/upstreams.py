"""Routes each target to the stdio process pool or the HTTP/SSE session pool."""

from services.mcp_proxy.adapters.remote import RemotePool
from services.mcp_proxy.adapters.stdio.pool import StdioPool
from services.mcp_proxy.application.ports import Target, Upstream


class UpstreamRouter:
    def __init__(self, stdio: StdioPool, remote: RemotePool) -> None:
        self.stdio, self.remote = stdio, remote

    async def open(self, target: Target) -> Upstream:
        if target.transport == "stdio":
            return await self.stdio.open(target)
        return await self.remote.open(target)

    async def retire_server(self, prefix: str, reason: str) -> None:
        await self.stdio.retire_server(prefix, reason)
        await self.remote.retire_server(prefix, reason)

    async def start(self) -> None:
        await self.stdio.start()
        await self.remote.start()

    async def stop(self) -> None:
        await self.stdio.stop()
        await self.remote.stop()
