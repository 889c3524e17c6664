"""`GET /mcp` and `GET /servers/{name}/mcp`: the standalone SSE stream of a handshake-era session.

The client sends its session id and `Accept: text/event-stream`; the answer is an open
`text/event-stream` on which `notifications/tools/list_changed` arrives whenever a server of
the caller (or of their org) is registered or removed, through any replica (mcp_listeners.py).
A comment every `KEEPALIVE_S` keeps proxies from closing it; it also renews the session and
checks that the key that opened it still works. The stream ends when the client goes away,
the session ends, a newer GET of the same session replaces it, or the replica shuts down.
"""

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

from litestar.types import Receive, Scope, Send

from services.gateway.adapters.http import mcp_asgi as io
from services.gateway.adapters.mcp_face import McpFace
from services.gateway.adapters.mcp_listeners import Listener, StreamsUnavailable
from services.gateway.adapters.mcp_sessions import SessionStoreDown, belongs
from services.gateway.domain import Principal
from services.gateway.mcp import protocol as p
from services.gateway.mcp.listening import Audience

ALLOW: Final = b"GET, POST, DELETE"
KEEPALIVE_S: Final = 15.0
_OPENED: Final = b": stream open\r\n\r\n"
_KEEPALIVE: Final = b": keepalive\r\n\r\n"
_NOT_FOUND: Final = "Session not found: it expired or was ended. Send initialize to start a new one."


async def listen(
    face: McpFace, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], server: str | None
) -> None:
    if not io.accepts_events(headers):
        text = "GET opens this endpoint's event stream: it needs Accept: text/event-stream."
        return await io.respond(send, 405, p.error(b"null", p.INVALID_REQUEST, text), [(b"allow", ALLOW)])
    version = io.text(headers.get(b"mcp-protocol-version"))
    if version is not None and version not in p.SUPPORTED_VERSIONS:
        err = p.unsupported_version(version)
        return await io.reject(send, 400, err.code, err.message, data=err.data)
    if version in p.MODERN_VERSIONS:
        text = "The stateless protocol (2026-07-28) has no GET stream (subscriptions/listen is not offered)."
        return await io.respond(send, 405, p.error(b"null", p.INVALID_REQUEST, text), [(b"allow", ALLOW)])
    session_id = io.text(headers.get(b"mcp-session-id"))
    if session_id is None:
        text = "Missing Mcp-Session-Id: GET opens the event stream of a session; send initialize first."
        return await io.reject(send, 400, p.INVALID_REQUEST, text)
    await face.ready()
    principal: Principal = scope["user"]
    if not belongs(await face.sessions.get(session_id), principal.user_id, server, "streamable"):
        return await io.reject(send, 404, p.INVALID_REQUEST, _NOT_FOUND)

    async def still_open() -> bool:
        if not isinstance(face.gateway.view.principal_of_key(principal.key_id, datetime.now(UTC)), Principal):
            return False  # the key was revoked or expired
        try:
            return await face.sessions.get(session_id) is not None  # also renews its TTL
        except SessionStoreDown:
            return True  # cannot tell now; asked again at the next keep-alive

    audience = Audience(principal.user_id, principal.org_id, server)
    try:
        async with face.listeners.standalone(session_id, audience) as listener:
            start: Any = {"type": "http.response.start", "status": 200, "headers": io.SSE_HEADERS}
            await send(start)
            await send({"type": "http.response.body", "body": _OPENED, "more_body": True})
            await pump(listener, receive, send, still_open, KEEPALIVE_S)
    except StreamsUnavailable:
        text = "This server holds as many event streams as it may; try again shortly."
        return await io.reject(send, 503, p.INTERNAL_ERROR, text)
    except OSError:  # the client went away mid-write
        return
    try:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass


async def pump(
    listener: Listener,
    receive: Receive,
    send: Send,
    still_open: Callable[[], Awaitable[bool]],
    keepalive_s: float,
) -> None:
    """Writes the stream's messages as `message` events until the client goes away or the stream
    is closed; a keep-alive comment when nothing was written for `keepalive_s`."""
    gone = asyncio.ensure_future(io.disconnected(receive))
    closed = asyncio.ensure_future(listener.closed.wait())
    try:
        while True:
            item = asyncio.ensure_future(listener.queue.get())
            done, _ = await asyncio.wait(
                {item, gone, closed}, timeout=keepalive_s, return_when=asyncio.FIRST_COMPLETED
            )
            if item in done:
                chunk = io.event(b"message", item.result())
            else:
                item.cancel()
                if gone in done or closed in done or not await still_open():
                    return
                chunk = _KEEPALIVE
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        gone.cancel()
        closed.cancel()
