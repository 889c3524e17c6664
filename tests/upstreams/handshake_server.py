"""The conformance fixture over Streamable HTTP, advertising only the handshake era.

    python tests/upstreams/handshake_server.py --port N

Its `server/discover` lists handshake versions only, so a client in `auto` mode (mcp_proxy's)
falls back to `initialize`: the era in which the fixture's tools can ask the client for
sampling and elicitation over the session's back-channel (in 2026-07-28 a server would answer
an `InputRequiredResult` instead, which the fixture does not do).
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import mcp_types as types
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conformance_server import server


async def _discover(ctx: Any, params: types.RequestParams) -> types.DiscoverResult:
    return types.DiscoverResult(
        supported_versions=list(HANDSHAKE_PROTOCOL_VERSIONS),
        capabilities=server._lowlevel_server.get_capabilities(protocol_version=ctx.protocol_version),
    )


server._lowlevel_server.add_request_handler("server/discover", types.RequestParams, _discover)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    server.run("streamable-http", host="127.0.0.1", port=parser.parse_args().port)
