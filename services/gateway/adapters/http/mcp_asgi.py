"""Raw ASGI plumbing for the MCP transports: they bypass Litestar's request parsing on purpose
(the hot path), but still sit behind its routing and the AuthMiddleware.
"""

from collections.abc import Iterable
from typing import Any, Final

from litestar.types import Receive, Scope, Send

from services.gateway.adapters.mcp_face import McpFace
from services.gateway.mcp import protocol as p
from services.kit import telemetry

# No OpenTelemetry HTTP span on the MCP transports: its ASGI middleware costs more CPU than
# the rest of a tool call's gateway hop. They continue the caller's trace from `traceparent`
# instead (see `continue_trace`), and the legacy SSE URL, which may carry `?api_key=`, stays
# out of span attributes. (Path patterns: the plugin wraps the app before routing, so route
# options cannot exclude it.)
NO_HTTP_SPAN_PATHS: Final = ["^/mcp$", "^/servers/[^/]+/mcp/?$", "^/sse$", "^/messages$"]

JSON: Final = (b"content-type", b"application/json")
SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def face_of(scope: Scope) -> McpFace:
    face: McpFace = scope["app"].state.mcp
    return face


def method_of(scope: Scope) -> str:
    method: str = scope["method"]  # type: ignore[typeddict-item]  # HTTP scopes only
    return method


def header_map(scope: Scope) -> dict[bytes, bytes]:
    return dict(scope["headers"])


def text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def continue_trace(headers: dict[bytes, bytes]) -> object | None:
    """Joins the caller's W3C trace, if it sent one (detach the token when done)."""
    traceparent = headers.get(b"traceparent")
    if traceparent is None:
        return None
    carrier = {"traceparent": traceparent.decode("latin-1")}
    if (tracestate := headers.get(b"tracestate")) is not None:
        carrier["tracestate"] = tracestate.decode("latin-1")
    return telemetry.attach(telemetry.extract(carrier))


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None when it is larger than `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Any = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def disconnected(receive: Receive) -> None:
    """Returns when the client goes away (call once the body has been read)."""
    while True:
        message: Any = await receive()
        if message["type"] == "http.disconnect":
            return


async def respond(
    send: Send, status: int, body: bytes = b"", headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    head = [(b"content-length", str(len(body)).encode())] if status != 204 else []
    head.extend(headers)
    if body:
        head.append(JSON)
    start: Any = {"type": "http.response.start", "status": status, "headers": head}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


def event(kind: bytes, data: bytes) -> bytes:
    """One server-sent event."""
    if b"\n" in data or b"\r" in data:  # JSON whitespace only (newlines in strings are escaped)
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return b"event: " + kind + b"\r\n" + b"".join(b"data: " + line + b"\r\n" for line in lines) + b"\r\n"
    return b"event: " + kind + b"\r\ndata: " + data + b"\r\n\r\n"


def accepts_events(headers: dict[bytes, bytes]) -> bool:
    """The client listed `text/event-stream` in Accept (Streamable HTTP clients must)."""
    return b"text/event-stream" in headers.get(b"accept", b"").lower()


class StreamedAnswer:
    """A POST's answer: plain JSON, unless notifications come first; then an SSE stream that
    carries them as `message` events, ends with the response and closes (Streamable HTTP)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.streaming = False
        self.gone = False

    async def notice(self, message: bytes) -> None:
        if not self.streaming:
            self.streaming = True
            start: Any = {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}
            await self._write(start)
        await self._write(
            {"type": "http.response.body", "body": event(b"message", message), "more_body": True}
        )

    async def finish(self, status: int, answer: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        if not self.streaming:
            return await respond(self.send, status, answer, headers)
        await self._write(
            {"type": "http.response.body", "body": event(b"message", answer), "more_body": False}
        )

    async def _write(self, message: Any) -> None:
        if self.gone:
            return
        try:
            await self.send(message)
        except OSError:  # the client went away: the call goes on (or is abandoned by its owner)
            self.gone = True


async def reject(
    send: Send, status: int, code: int, message: str, id_json: bytes = b"null", data: Any = None
) -> None:
    """An HTTP error whose body is a JSON-RPC error (what MCP clients know how to show)."""
    await respond(send, status, p.error(id_json, code, message, data))


async def forbidden_origin(face: McpFace, headers: dict[bytes, bytes], send: Send) -> bool:
    origin = text(headers.get(b"origin"))
    if face.origins.allows(origin):
        return False
    await reject(
        send,
        403,
        p.INVALID_REQUEST,
        f"Origin {origin!r} is not allowed to use this MCP endpoint (see GATEHOUSE_ALLOWED_ORIGINS).",
    )
    return True


async def not_allowed(send: Send, allow: bytes) -> None:
    await respond(
        send,
        405,
        p.error(b"null", p.INVALID_REQUEST, "This method is not allowed on this MCP endpoint."),
        [(b"allow", allow)],
    )
