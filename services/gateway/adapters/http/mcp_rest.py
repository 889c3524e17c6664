"""`/v1/mcp/...`: the caller's upstream MCP servers, their tools, calls and call history.

Each route forwards to mcp_proxy (`cmd.mcp_proxy.<verb>`) on behalf of the authenticated
caller; who the caller is comes from their key, never from the body.
"""

import uuid
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.exceptions import (
    HTTPException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.params import Parameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from contracts.commands import mcp as cmd
from contracts.commands.common import Empty
from services.gateway.adapters.http.context import caller, gateway_of, meta
from services.gateway.adapters.http.mcp_schemas import (
    Execute,
    Execution,
    HistoryEntry,
    HistoryPage,
    NewServer,
    SecretRef,
    ServerInfo,
    ToolInfo,
    Value,
)
from services.gateway.mcp.exchange import CALL_TIMEOUT_S, caller_of

SERVICE = "mcp_proxy"
LONG_TIMEOUT_S = 60.0  # registering or probing a server may start it


def _caller(request: Request[Any, Any, Any]) -> cmd.Caller:
    return caller_of(caller(request))


def _forget_catalog(request: Request[Any, Any, Any]) -> None:
    face = getattr(request.app.state, "mcp", None)
    if face is not None:
        face.directory.forget(caller(request).user_id)


def _values(values: dict[str, Value]) -> dict[str, cmd.EnvValue]:
    return {k: cmd.SecretRef(secret=v.secret) if isinstance(v, SecretRef) else v for k, v in values.items()}


def _info(view: cmd.ServerView) -> ServerInfo:
    return ServerInfo(
        name=view.name,
        transport=view.transport,
        status=view.status,
        tools_count=view.tools_count,
        requires_auth=view.requires_auth,
        scope=view.scope,
        error=view.error,
    )


class McpController(Controller):
    path = "/v1/mcp"
    tags = ["mcp"]

    @post("/servers", status_code=HTTP_201_CREATED, summary="Register an upstream MCP server")
    async def register(self, request: Request[Any, Any, Any], data: NewServer) -> ServerInfo:
        principal = caller(request)
        if data.scope == "org" and not principal.is_admin:
            raise PermissionDeniedException("Only org admins can register a server for the whole org.")
        spec = cmd.ServerSpec(
            name=data.name,
            transport=data.transport,
            command=data.command,
            args=list(data.args),
            env=_values(data.env),
            url=data.url,
            headers=_values(data.headers),
            timeout_s=data.timeout_s,
        )
        command = cmd.RegisterServer(meta=meta(request), caller=_caller(request), scope=data.scope, spec=spec)
        view = await gateway_of(request).client.call(
            SERVICE, "register_server", command, cmd.ServerView, LONG_TIMEOUT_S
        )
        _forget_catalog(request)
        return _info(view)

    @get("/servers", summary="My servers (and my org's)")
    async def list_servers(self, request: Request[Any, Any, Any]) -> list[ServerInfo]:
        command = cmd.ListServers(meta=meta(request), caller=_caller(request))
        listed = await gateway_of(request).client.call(SERVICE, "list_servers", command, cmd.ServerList)
        return [_info(view) for view in listed.servers]

    @delete("/servers/{name:str}", status_code=HTTP_204_NO_CONTENT, summary="Remove a server")
    async def remove(
        self,
        request: Request[Any, Any, Any],
        name: str,
        of: Annotated[Literal["user", "org"] | None, Parameter(query="scope")] = None,
    ) -> None:
        """`?scope=org` (admins): the org's server of that name rather than the caller's own."""
        if of == "org" and not caller(request).is_admin:
            raise PermissionDeniedException("Only org admins can remove the org's servers.")
        command = cmd.RemoveServer(meta=meta(request), caller=_caller(request), name=name, scope=of)
        await gateway_of(request).client.call(SERVICE, "remove_server", command, Empty)
        _forget_catalog(request)

    @post("/servers/{name:str}/test", status_code=200, summary="Probe a server: start it and list its tools")
    async def test(self, request: Request[Any, Any, Any], name: str) -> ServerInfo:
        command = cmd.TestServer(meta=meta(request), caller=_caller(request), name=name)
        view = await gateway_of(request).client.call(
            SERVICE, "test_server", command, cmd.ServerView, LONG_TIMEOUT_S
        )
        return _info(view)

    @get("/requests/history", summary="My tool calls, newest first")
    async def history(
        self,
        request: Request[Any, Any, Any],
        limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
        server: str | None = None,
        cursor: str | None = None,
    ) -> HistoryPage:
        command = cmd.History(
            meta=meta(request), caller=_caller(request), limit=limit, server=server, cursor=cursor
        )
        page = await gateway_of(request).client.call(SERVICE, "history", command, cmd.HistoryPage)
        items = [
            HistoryEntry(
                request_id=i.request_id,
                server=i.server,
                tool_name=i.tool_name,
                status=i.status,
                duration_ms=i.duration_ms,
                arguments_sha256=i.arguments_sha256,
                arguments_bytes=i.arguments_bytes,
                result_bytes=i.result_bytes,
                timestamp=i.timestamp,
                error=i.error,
            )
            for i in page.items
        ]
        return HistoryPage(items=items, next_cursor=page.next_cursor)

    @get("/{server:str}/tools", summary="A server's tools")
    async def tools(self, request: Request[Any, Any, Any], server: str) -> list[ToolInfo]:
        command = cmd.ListTools(meta=meta(request), caller=_caller(request), server=server)
        catalog = await gateway_of(request).client.call(
            SERVICE, "list_tools", command, cmd.ToolCatalog, LONG_TIMEOUT_S
        )
        entry = next((s for s in catalog.servers if s.server == server), None)
        if entry is None:
            raise NotFoundException(f"No MCP server named {server!r} is registered for you.")
        if entry.error is not None:
            raise HTTPException(
                status_code=502, detail=f"The server {server!r} could not list its tools: {entry.error}"
            )
        return [
            ToolInfo(name=t.name, description=t.description, inputSchema=msgspec.json.decode(t.inputSchema))
            for t in entry.tools
        ]

    @post("/{server:str}/execute", status_code=200, summary="Call a tool (X-Request-Id: idempotency key)")
    async def execute(self, request: Request[Any, Any, Any], server: str, data: Execute) -> Execution:
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        if len(request_id) > 128:
            raise ValidationException("X-Request-Id is longer than 128 characters.")
        command = cmd.CallTool(
            meta=meta(request),
            caller=_caller(request),
            request_id=request_id,
            server=server,
            tool=data.tool_name,
            arguments=msgspec.Raw(msgspec.json.encode(data.arguments)),
        )
        outcome = await gateway_of(request).client.call(
            SERVICE, "call", command, cmd.CallOutcome, CALL_TIMEOUT_S
        )
        return Execution(
            request_id=outcome.request_id,
            server=outcome.server,
            tool_name=outcome.tool_name,
            status=outcome.status,
            result=outcome.result if cmd.present(outcome.result) else None,
            error=outcome.error,
            duration_ms=outcome.duration_ms,
            timestamp=outcome.timestamp,
        )


HANDLERS = [McpController]
