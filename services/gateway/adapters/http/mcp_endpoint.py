"""`/mcp` and `/servers/{name}/mcp`: the Streamable HTTP transport, both protocol eras.

A POST is routed by what it carries:
- `initialize` starts a handshake-era session (2025-11-25, 2025-06-18, 2025-03-26, 2024-11-05):
  the answer carries `Mcp-Session-Id`, which every later request must send back;
- `MCP-Protocol-Version: 2026-07-28` (or an `Mcp-Method` header without a session) is the
  stateless era: no session, the routing headers must match the body;
- anything else needs a live session of this caller on this endpoint (else 404, or 400
  when no session id was sent at all).
`DELETE` ends a session; `GET` with a session opens its standalone SSE stream, where
`notifications/tools/list_changed` arrives (mcp_listen.py).

A request answers `application/json`, except a `tools/call` from a client that accepts
`text/event-stream` during which the upstream sends notifications (progress for the call's
progress token; log messages for a session that sent `logging/setLevel`, or in the stateless
era a request that opts in): from the first one on, the answer is an SSE stream of those
notifications, then the response. During such a call the upstream's sampling and elicitation
requests reach a client that declared them in its `initialize` on the same stream, and the
client POSTs its JSON-RPC response in the session (202; a response id the gateway did not
make for this session is refused).
"""

import asyncio
from typing import Any

from litestar import asgi
from litestar.types import Receive, Scope, Send

from services.gateway.adapters.http import mcp_asgi as io
from services.gateway.adapters.http.auth import client_ip
from services.gateway.adapters.http.mcp_listen import ALLOW, listen
from services.gateway.adapters.mcp_face import McpFace
from services.gateway.adapters.mcp_sessions import McpSession, SessionStoreDown, belongs
from services.gateway.domain import Principal
from services.gateway.mcp import protocol as p
from services.gateway.mcp.exchange import Context
from services.kit import telemetry

_SESSION_NOT_FOUND = "Session not found: it expired or was ended. Send initialize to start a new one."


@asgi("/mcp", copy_scope=False)
async def mcp_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    await serve(scope, receive, send, None)


# A mount, not "/servers/{name}/mcp": Litestar 2.25 cannot route path parameters to ASGI
# handlers (KeyError on the HTTP method), so the rest of the path is parsed here.
@asgi("/servers", is_mount=True, copy_scope=False)
async def server_mcp_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    parts = scope["path"].strip("/").split("/")
    if len(parts) != 2 or parts[1] != "mcp" or not parts[0]:
        return await io.reject(send, 404, p.INVALID_REQUEST, "No such endpoint: use /servers/{name}/mcp.")
    await serve(scope, receive, send, parts[0])


async def serve(scope: Scope, receive: Receive, send: Send, server: str | None) -> None:
    face = io.face_of(scope)
    headers = io.header_map(scope)
    if await io.forbidden_origin(face, headers, send):
        return
    method = io.method_of(scope)
    token = io.continue_trace(headers)
    try:
        if method == "POST":
            await _post(face, scope, receive, send, headers, server)
        elif method == "DELETE":
            await _delete(face, scope, send, headers, server)
        elif method == "GET":
            await listen(face, scope, receive, send, headers, server)
        else:
            await io.not_allowed(send, ALLOW)
    except io.ClientGone:
        return
    except SessionStoreDown:
        text = "MCP sessions are unavailable for a moment (message bus unreachable); try again shortly."
        await io.reject(send, 503, p.INTERNAL_ERROR, text)
    finally:
        if token is not None:
            telemetry.detach(token)


async def _post(
    face: McpFace, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], server: str | None
) -> None:
    version = io.text(headers.get(b"mcp-protocol-version"))
    if version is not None and version not in p.SUPPORTED_VERSIONS:
        err = p.unsupported_version(version)
        return await io.reject(send, 400, err.code, err.message, data=err.data)
    body = await io.read_body(receive, face.max_body_bytes)
    if body is None:
        return await io.reject(
            send, 413, p.INVALID_REQUEST, "The request body is larger than this server accepts."
        )
    try:
        message = p.decode_message(body)
    except p.ProtocolError as err:
        return await io.reject(send, 400, err.code, err.message)
    id_json = p.encode_id(message.id)
    method_header = io.text(headers.get(b"mcp-method"))
    if method_header is not None and message.method is not None and method_header != message.method:
        text = f"Header mismatch: Mcp-Method {method_header!r} is not the body's method {message.method!r}."
        return await io.reject(send, 400, p.HEADER_MISMATCH, text, id_json)
    await face.ready()
    principal: Principal = scope["user"]
    session_id = io.text(headers.get(b"mcp-session-id"))
    if message.method == "initialize":
        return await _initialize(face, scope, send, message, principal, server)
    if version in p.MODERN_VERSIONS or (version is None and method_header is not None and session_id is None):
        return await _stateless(face, scope, receive, send, headers, message, principal, server, version)
    if session_id is None:
        text = "Missing Mcp-Session-Id: send initialize first (or use the stateless protocol, 2026-07-28)."
        return await io.reject(send, 400, p.INVALID_REQUEST, text, id_json)
    session = await face.sessions.get(session_id)
    if not belongs(session, principal.user_id, server, "streamable"):
        return await io.reject(send, 404, p.INVALID_REQUEST, _SESSION_NOT_FOUND, id_json)
    ctx = _context(scope, headers, principal, server, modern=False, version=version)
    ctx.session_id = session_id
    assert session is not None
    if message.is_request:
        answer_to = _answer_to(send, headers, message, ctx)
        ctx.log_level = session.log_level  # set by logging/setLevel
        ctx.client_features = tuple(session.client_features)  # declared in its initialize
        status, answer = await face.exchange.request(ctx, message)
        return await answer_to.finish(status, answer)
    if message.is_notification:
        await face.exchange.notification(ctx, message)
        return await io.respond(send, 202)  # accepted, no body
    status, answer = await face.exchange.response(ctx, message)  # to a relayed sampling/elicitation
    await io.respond(send, status, answer)


async def _stateless(
    face: McpFace,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: dict[bytes, bytes],
    message: p.Message,
    principal: Principal,
    server: str | None,
    version: str | None,
) -> None:
    id_json = p.encode_id(message.id)
    if message.is_notification:
        return await io.respond(send, 202)  # no client notifications in this era: accepted, dropped
    if not message.is_request:
        return await io.reject(
            send, 400, p.INVALID_REQUEST, "Clients must not send JSON-RPC responses.", id_json
        )
    if version is None:
        text = "Header mismatch: the stateless protocol needs an MCP-Protocol-Version header (2026-07-28)."
        return await io.reject(send, 400, p.HEADER_MISMATCH, text, id_json)
    if headers.get(b"mcp-method") is None:
        text = f"Header mismatch: the Mcp-Method header is required (here {message.method!r})."
        return await io.reject(send, 400, p.HEADER_MISMATCH, text, id_json)
    ctx = _context(scope, headers, principal, server, modern=True, version=version)
    if message.method != "tools/call":
        status, answer = await face.exchange.request(ctx, message)
        return await io.respond(send, status, answer)
    answer_to = _answer_to(send, headers, message, ctx)
    # Closing the response is how a 2026-07-28 client cancels a call.
    watcher = asyncio.ensure_future(io.disconnected(receive))
    watcher.add_done_callback(lambda task: _abandon(face, ctx, task))
    try:
        status, answer = await face.exchange.request(ctx, message)
    finally:
        watcher.cancel()
    await answer_to.finish(status, answer)


def _answer_to(
    send: Send, headers: dict[bytes, bytes], message: p.Message, ctx: Context
) -> io.StreamedAnswer:
    """JSON, or SSE once a tool call's first notification arrives (if the client accepts it)."""
    answer_to = io.StreamedAnswer(send)
    if message.method == "tools/call" and io.accepts_events(headers):
        ctx.listener = answer_to
    return answer_to


def _abandon(face: McpFace, ctx: Context, watcher: "asyncio.Future[None]") -> None:
    if not watcher.cancelled() and ctx.started is not None:
        face.spawn(face.exchange.abandon(ctx.started))


async def _initialize(
    face: McpFace, scope: Scope, send: Send, message: p.Message, principal: Principal, server: str | None
) -> None:
    id_json = p.encode_id(message.id)
    if not message.is_request:
        return await io.reject(send, 400, p.INVALID_REQUEST, "initialize must be a request (with an id).")
    features = None
    try:
        params: p.InitializeParams = p.decode_params(message.params, p.InitializeParams)
        if server is not None:  # only a server the caller has; its upstream's features declared
            ctx = _context(scope, {}, principal, server, modern=False, version=None)
            features = await face.exchange.features(ctx)
    except p.ProtocolError as err:
        status = 404 if err.code == p.INVALID_PARAMS and server is not None else 400
        return await io.reject(send, status, err.code, err.message, id_json)
    version = p.negotiate(params.protocolVersion)
    session = McpSession(
        user_id=principal.user_id,
        key_id=principal.key_id,
        protocol_version=version,
        server=server,
        client_features=p.client_features(params.capabilities),
    )
    session_id = await face.sessions.create(session)
    answer = p.result(id_json, p.initialize_result(version, server, features))
    await io.respond(send, 200, answer, [(b"mcp-session-id", session_id.encode())])


async def _delete(
    face: McpFace, scope: Scope, send: Send, headers: dict[bytes, bytes], server: str | None
) -> None:
    session_id = io.text(headers.get(b"mcp-session-id"))
    if session_id is None:
        return await io.reject(
            send, 400, p.INVALID_REQUEST, "DELETE needs the Mcp-Session-Id header of a session."
        )
    await face.ready()
    session = await face.sessions.get(session_id)
    if not belongs(session, scope["user"].user_id, server, "streamable"):
        return await io.reject(send, 404, p.INVALID_REQUEST, _SESSION_NOT_FOUND)
    await face.sessions.end(session_id)
    await io.respond(send, 204)


def _context(
    scope: Scope,
    headers: dict[bytes, bytes],
    principal: Principal,
    server: str | None,
    modern: bool,
    version: str | None,
) -> Context:
    user_agent: Any = headers.get(b"user-agent")
    return Context(
        principal=principal,
        scope=server,
        modern=modern,
        version=version,
        name_header=io.text(headers.get(b"mcp-name")),
        ip=client_ip(scope),
        user_agent=user_agent.decode("latin-1") if user_agent is not None else None,
    )


HANDLERS = [mcp_endpoint, server_mcp_endpoint]
