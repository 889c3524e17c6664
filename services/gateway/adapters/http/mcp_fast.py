"""The fast lane: `POST /mcp` and `POST /servers/{name}/mcp` straight to the MCP handler.

A tool call is the gateway's hot path, and Litestar's layers (routing, two exception
middlewares, the middleware wrapper, the OpenTelemetry plugin's path check) cost about as
much CPU as the rest of the gateway's hop. This lane takes the POSTs it is sure about past
them: it authenticates as `AuthMiddleware` does and calls the same handler
(`mcp_endpoint.serve`). Everything else, and every request the lane would refuse (no or bad
key, key view still loading, odd host header), goes through Litestar as before, so refusals
are answered, audited and logged by the one code that always did.
"""

import re
from collections.abc import Awaitable, Callable
from inspect import getmro
from typing import Any, Final

from litestar import Litestar, Request
from litestar.exceptions import NotAuthorizedException
from litestar.types import Message, Receive, Scope, Send

from services.gateway.adapters.http import mcp_endpoint
from services.gateway.adapters.http.auth import presented_key
from services.gateway.adapters.http.problems import HANDLERS
from services.gateway.application import Gateway
from services.gateway.domain import Principal

_SERVERS: Final = "/servers/"
_MCP: Final = "/mcp"
# Litestar's router answers 400 to a Host header outside this set (litestar/_asgi/utils.py).
_VALID_HOST: Final = re.compile(rb"\A[0-9A-Za-z!$&'()*+,;=\-._~:\[\]@%]*\Z")

Slow = Callable[[Scope, Receive, Send], Awaitable[None]]


def endpoint_of(scope: Scope) -> tuple[bool, str | None]:
    """(True, server) for a POST the lane serves: server None for `/mcp`, else the name in
    `/servers/{name}/mcp`. Only paths Litestar would route there unchanged qualify."""
    if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("root_path"):
        return False, None
    path: str = scope["path"]
    if path == _MCP:
        return True, None
    if path.startswith(_SERVERS) and path.endswith(_MCP):
        name = path[len(_SERVERS) : -len(_MCP)]
        if name and "/" not in name:
            return True, name
    return False, None


def _host_is_valid(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"host":
            return _VALID_HOST.match(value) is not None
    return True


class McpFastLane:
    def __init__(self, app: Litestar, gateway: Gateway) -> None:
        self.app, self.gateway = app, gateway

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, server: str | None, slow: Slow
    ) -> None:
        gateway = self.gateway
        if not gateway.view_ready.is_set() or not _host_is_valid(scope):
            return await slow(scope, receive, send)
        try:
            key = presented_key(scope)
        except NotAuthorizedException:
            return await slow(scope, receive, send)
        principal = gateway.authenticate(key)
        if not isinstance(principal, Principal):
            return await slow(scope, receive, send)  # refused there, and reported
        scope["app"] = scope["litestar_app"] = self.app  # what Litestar puts in every scope
        scope.setdefault("state", {})
        scope["user"] = principal
        await gateway.note_use(principal)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await mcp_endpoint.serve(scope, receive, tracked, server)
        except Exception as exc:
            if started:
                raise
            await self._problem(scope, receive, send, exc)

    async def _problem(self, scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
        """The answer Litestar's exception middleware would give (problems.HANDLERS)."""
        handler: Any = next((HANDLERS[c] for c in getmro(type(exc)) if c in HANDLERS), None)
        if handler is None:
            raise exc
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        response = handler(request, exc)
        asgi_response = response.to_asgi_response(
            app=None, request=request, type_encoders=self.app.type_encoders
        )
        await asgi_response(scope, receive, send)
