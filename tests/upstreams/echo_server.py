"""A test upstream written with the official MCP SDK (`MCPServer`).

    python tests/upstreams/echo_server.py                 # stdio
    python tests/upstreams/echo_server.py --http --port N # Streamable HTTP at /mcp
    python tests/upstreams/echo_server.py --sse --port N  # legacy HTTP+SSE at /sse

`whoami` answers with the sha256 of the credential it received: the environment variable
TEST_UPSTREAM_TOKEN on stdio, the `X-Upstream-Token` header over HTTP. The misbehaving tools
(`crash`, `flood`, `malformed`, `spawn_grandchild`) exercise the gateway's supervision.
"""

import argparse
import asyncio
import hashlib
import os
import subprocess
import sys

from mcp.server import MCPServer
from mcp.server.mcpserver import Context

# The SDK points fd 1 at stderr while it serves, so stray prints cannot corrupt the wire.
# The misbehaving tools need the real wire: keep a duplicate of it before the SDK claims it.
WIRE = os.dup(1)

server = MCPServer("gatehouse-test-echo")
_transport = "stdio"


def _digest(value: str | None) -> str:
    return hashlib.sha256((value or "").encode()).hexdigest() if value else "none"


@server.tool()
def echo(text: str) -> str:
    """Returns the text it was given."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@server.tool()
def whoami(ctx: Context) -> str:
    """The sha256 of the credential this upstream received ("none" without one)."""
    if _transport == "stdio":
        return _digest(os.environ.get("TEST_UPSTREAM_TOKEN"))
    headers = ctx.headers or {}
    return _digest(headers.get("x-upstream-token"))


@server.tool()
def headers(ctx: Context) -> dict[str, str]:
    """The HTTP headers of this request (HTTP transports only)."""
    return dict(ctx.headers or {})


@server.tool()
def pid() -> int:
    """This process's id."""
    return os.getpid()


@server.tool()
def environment() -> list[str]:
    """The names of this process's environment variables."""
    return sorted(os.environ)


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleeps, then answers."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
async def progress(ctx: Context, steps: int = 3) -> str:
    """Reports progress `steps` times, logging a debug and an info line at each step."""
    for step in range(1, steps + 1):
        await ctx.report_progress(progress=step, total=steps, message=f"step {step}")
        await ctx.debug(f"detail of step {step}")
        await ctx.info(f"step {step} done")
    return "done"


@server.tool()
def crash() -> str:
    """Exits the process in the middle of the call."""
    sys.stderr.write("echo_server: crashing on purpose\n")
    sys.stderr.flush()
    os._exit(1)


@server.tool()
def spawn_grandchild(escape: bool = False) -> int:
    """Starts `sleep 600` (in a new session when `escape`) and returns its pid."""
    child = subprocess.Popen(
        ["sleep", "600"],
        start_new_session=escape,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return child.pid


@server.tool()
def flood(size: int) -> str:
    """Writes one line of `size` bytes onto the wire (stdout), then answers."""
    chunk = b"x" * 65536
    left = size
    while left > 0:
        os.write(WIRE, chunk[: min(left, len(chunk))])
        left -= len(chunk)
    os.write(WIRE, b"\n")
    return "flooded"


@server.tool()
def malformed(ctx: Context) -> str:
    """Answers its own request with a JSON-RPC response that has neither result nor error."""
    os.write(WIRE, b'{"jsonrpc":"2.0","id":' + _json_id(ctx.request_id) + b',"oops":true}\n')
    os.write(WIRE, b"this line is not JSON at all\n")
    return "the real answer, after the malformed one"


def _json_id(request_id: object) -> bytes:
    text = str(request_id)  # the SDK hands it over as text; numeric ids were numbers on the wire
    return text.encode() if text.isdigit() else f'"{text}"'.encode()


def main() -> None:
    global _transport
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--sse", action="store_true")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if args.http:
        _transport = "http"
        server.run("streamable-http", host="127.0.0.1", port=args.port)
    elif args.sse:
        _transport = "sse"
        server.run("sse", host="127.0.0.1", port=args.port)
    else:
        server.run()


if __name__ == "__main__":
    main()
