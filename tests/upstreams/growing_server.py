"""A test upstream whose tool list changes at runtime (the official SDK's `MCPServer`).

    python tests/upstreams/growing_server.py                 # stdio
    python tests/upstreams/growing_server.py --http --port N # Streamable HTTP at /mcp

Over HTTP its `server/discover` lists the handshake versions only (as handshake_server.py), so a
client in `auto` mode (mcp_proxy's) does the handshake: the era in which a server can send
notifications outside a request (2026-07-28 would need `subscriptions/listen`).

`grow(name)` adds a tool `name` to this process (so to this user only: the gateway runs one
process per user) and sends `notifications/tools/list_changed` on the session, before it
answers. `flap(times)` sends that notification `times` times without changing anything.
"""

import argparse
from typing import Any

import mcp_types as types
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

server = MCPServer("gatehouse-test-growing")


@server.tool()
async def grow(name: str, ctx: Context) -> str:
    """Adds a tool called `name` and tells the client the tool list changed."""

    def grown() -> str:
        return f"{name} grew here"

    server.add_tool(grown, name=name, description=f"Grown at runtime: {name}.")
    await ctx.session.send_tool_list_changed()
    return f"grew {name}"


@server.tool()
async def flap(times: int, ctx: Context) -> str:
    """Sends `notifications/tools/list_changed` `times` times (nothing changes)."""
    for _ in range(times):
        await ctx.session.send_tool_list_changed()
    return f"flapped {times}"


async def _discover(ctx: Any, params: types.RequestParams) -> types.DiscoverResult:
    return types.DiscoverResult(
        supported_versions=list(HANDSHAKE_PROTOCOL_VERSIONS),
        capabilities=server._lowlevel_server.get_capabilities(protocol_version=ctx.protocol_version),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if args.http:
        server._lowlevel_server.add_request_handler("server/discover", types.RequestParams, _discover)
        server.run("streamable-http", host="127.0.0.1", port=args.port)
    else:
        server.run()


if __name__ == "__main__":
    main()
