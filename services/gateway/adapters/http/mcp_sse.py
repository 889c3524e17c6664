"""`GET /sse` + `POST /messages`: the legacy HTTP+SSE transport (protocol 2024-11-05) for
older clients.

`GET /sse` (key in a header, or `?api_key=`) opens a stream whose first event is `endpoint`
with `/messages?session_id=<id>`. Each POST there is answered `202 Accepted`; its JSON-RPC
response arrives as a `message` event on the stream. The stream is held by one replica; a
POST that lands on another is answered there and relayed over NATS (`mcp.sse.<id>`). The
progress and log notifications of a tool call go the same way, as `message` events before
its response, and so do the upstream's sampling and elicitation requests when the client's
`initialize` declared them; the client POSTs its response to `/messages` (202, or an error
for an id the gateway did not make for this session). `notifications/tools/list_changed`
arrives on the stream too, as on the standalone stream of Streamable HTTP (mcp_listen.py).

A POST may carry the key again; if it does not (clients that put `?api_key=` on the SSE
URL cannot), the unguessable session id stands in for it, and the key that opened the
stream must still be valid (a revoked key ends the session's use at once).
"""

import contextlib
from datetime import UTC, datetime
from typing import Final
from urllib.parse import parse_qs

from litestar import asgi
from litestar.exceptions import NotAuthorizedException
from litestar.types import Receive, Scope, Send

from services.gateway.adapters.http import mcp_asgi as io
from services.gateway.adapters.http.auth import OWN_AUTH, client_ip, presented_key
from services.gateway.adapters.http.mcp_listen import pump
from services.gateway.adapters.mcp_face import McpFace
from services.gateway.adapters.mcp_sessions import McpSession, SessionStoreDown
from services.gateway.domain import Principal
from services.gateway.mcp import protocol as p
from services.gateway.mcp.exchange import Context
from services.gateway.mcp.listening import Audience

KEEPALIVE_S: Final = 15.0
_SSE_HEADERS: Final = io.SSE_HEADERS
event = io.event


@asgi("/sse", copy_scope=False)
async def sse_stream(scope: Scope, receive: Receive, send: Send) -> None:
    face = io.face_of(scope)
    if await io.forbidden_origin(face, io.header_map(scope), send):
        return
    if io.method_of(scope) != "GET":
        return await io.not_allowed(send, b"GET")
    await face.ready()
    principal: Principal = scope["user"]
    session = McpSession(
        user_id=principal.user_id,
        key_id=principal.key_id,
        protocol_version=p.LATEST_HANDSHAKE,
        server=None,
        transport="sse",
    )
    session_id = await face.sessions.create(session)

    async def renew() -> bool:
        with contextlib.suppress(SessionStoreDown):
            await face.sessions.get(session_id)  # renews the session's TTL while the stream is open
        return True

    audience = Audience(principal.user_id, principal.org_id, None)
    try:
        async with (
            face.relay.stream(session_id) as queue,
            face.listeners.legacy(session_id, audience, queue) as listener,
        ):
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            endpoint = b"/messages?session_id=" + session_id.encode()
            await send(
                {"type": "http.response.body", "body": event(b"endpoint", endpoint), "more_body": True}
            )
            await pump(listener, receive, send, renew, KEEPALIVE_S)
    except OSError:  # the client went away mid-write
        pass
    finally:
        await face.sessions.end(session_id)
    try:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass


@asgi("/messages", copy_scope=False, opt={OWN_AUTH: True})
async def sse_message(scope: Scope, receive: Receive, send: Send) -> None:
    face = io.face_of(scope)
    headers = io.header_map(scope)
    if await io.forbidden_origin(face, headers, send):
        return
    if io.method_of(scope) != "POST":
        return await io.not_allowed(send, b"POST")
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    session_id = next(iter(query.get("session_id") or query.get("sessionId") or ()), None)
    if not session_id:
        return await io.reject(send, 400, p.INVALID_REQUEST, "The session_id query parameter is missing.")
    await face.ready()
    try:
        session = await face.sessions.get(session_id)
    except SessionStoreDown:
        text = "MCP sessions are unavailable for a moment (message bus unreachable); try again shortly."
        return await io.reject(send, 503, p.INTERNAL_ERROR, text)
    if session is None or session.transport != "sse":
        return await io.reject(
            send, 404, p.INVALID_REQUEST, "Unknown or ended SSE session: open GET /sse again."
        )
    principal = _principal(face, scope, headers, session)
    if principal.user_id != session.user_id:
        return await io.reject(
            send, 404, p.INVALID_REQUEST, "Unknown or ended SSE session: open GET /sse again."
        )
    await face.gateway.note_use(principal)
    try:
        body = await io.read_body(receive, face.max_body_bytes)
    except io.ClientGone:
        return
    if body is None:
        return await io.reject(
            send, 413, p.INVALID_REQUEST, "The request body is larger than this server accepts."
        )
    try:
        message = p.decode_message(body)
    except p.ProtocolError as err:
        return await io.reject(send, 400, err.code, err.message)
    user_agent = headers.get(b"user-agent")
    ctx = Context(
        principal=principal,
        session_id=session_id,
        ip=client_ip(scope),
        user_agent=user_agent.decode("latin-1") if user_agent is not None else None,
        listener=_OnTheStream(face, session_id),
        log_level=session.log_level,  # set by logging/setLevel
        client_features=tuple(session.client_features),  # declared in its initialize
    )
    if not message.is_request and not message.is_notification:  # a response to a relayed request
        status, answer = await face.exchange.response(ctx, message)
        return await io.respond(send, status, answer)
    await io.respond(send, 202)
    if message.is_request:
        face.spawn(_answer(face, ctx, message))
    elif message.is_notification:
        face.spawn(face.exchange.notification(ctx, message))


async def _answer(face: McpFace, ctx: Context, message: p.Message) -> None:
    assert ctx.session_id is not None
    if message.method == "initialize":
        try:
            params: p.InitializeParams = p.decode_params(message.params, p.InitializeParams)
        except p.ProtocolError as err:
            answer = p.error(p.encode_id(message.id), err.code, err.message)
        else:
            await face.sessions.set_client_features(ctx.session_id, p.client_features(params.capabilities))
            answer = p.result(
                p.encode_id(message.id), p.initialize_result(p.negotiate(params.protocolVersion))
            )
    else:
        _, answer = await face.exchange.request(ctx, message)
    await face.relay.deliver(ctx.session_id, answer)


class _OnTheStream:
    """A call's notifications, on the session's stream (wherever it is held) before its response."""

    def __init__(self, face: McpFace, session_id: str) -> None:
        self.face, self.session_id = face, session_id

    async def notice(self, message: bytes) -> None:
        await self.face.relay.deliver(self.session_id, message)


def _principal(face: McpFace, scope: Scope, headers: dict[bytes, bytes], session: McpSession) -> Principal:
    gateway = face.gateway
    if (
        b"authorization" in headers
        or b"x-mcp-api-key" in headers
        or b"api_key=" in scope.get("query_string", b"")
    ):
        result = gateway.authenticate(presented_key(scope))
    else:
        result = gateway.view.principal_of_key(session.key_id, datetime.now(UTC))
    if not isinstance(result, Principal):
        raise NotAuthorizedException(result.value)
    scope["user"] = result
    return result


HANDLERS = [sse_stream, sse_message]
