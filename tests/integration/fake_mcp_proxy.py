"""fake_mcp_proxy: a real NATS responder on `cmd.mcp_proxy.*` that answers with the contract's
replies from memory, for gateway tests that must not depend on the real mcp_proxy.

It runs on the kit's CommandServer (the same request/reply code the real services use), so
the gateway talks to it exactly as it talks to mcp_proxy. Its upstream servers are imaginary:
every registered server offers the tools in `TOOLS`, whose behaviour is scripted below.
"""

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from contracts.commands import mcp as cmd
from contracts.commands.common import Empty
from services.kit.bus import Bus
from services.kit.rpc import CommandServer, refuse

LONG_TOOL = "a_tool_whose_name_is_far_too_long_to_fit_with_any_server_prefix_in_64_characters"
TOOLS = [
    cmd.Tool(
        name="echo",
        description="Echoes its arguments back",
        inputSchema=msgspec.Raw(b'{"type":"object","properties":{"text":{"type":"string"}}}'),
    ),
    cmd.Tool(name="fail", description="Always fails as a tool (isError)"),
    cmd.Tool(name="slow", description="Sleeps `seconds` (cancellable)"),
    cmd.Tool(name="timeout", description="The upstream never answers in time"),
    cmd.Tool(name="needs_secret", description="Uses a secret that is not set"),
    cmd.Tool(name="quota", description="The caller is over quota"),
    cmd.Tool(name="dotted.name", description="A name MCP clients would reject as it is"),
    cmd.Tool(name=LONG_TOOL, description="A name too long for the merged endpoint"),
]


@dataclass
class Registered:
    spec: cmd.ServerSpec
    scope: str
    owner: str  # user id ("user" scope) or org id ("org" scope)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _text_result(text: str, is_error: bool = False) -> msgspec.Raw:
    body: dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    if is_error:
        body["isError"] = True
    return msgspec.Raw(msgspec.json.encode(body))


class FakeMcpProxy:
    def __init__(self, bus: Bus) -> None:
        self.server = CommandServer(bus, "mcp_proxy")
        self.registered: dict[tuple[str, str], Registered] = {}  # (owner, name)
        self.calls: list[cmd.CallTool] = []
        self.lists: list[cmd.ListTools] = []
        self.cancels: list[cmd.CancelCall] = []
        self.history_items: list[tuple[str, cmd.HistoryItem]] = []  # (user id, item), newest first
        self._running: dict[str, asyncio.Event] = {}
        for verb, kind, handler in (
            ("register_server", cmd.RegisterServer, self.register_server),
            ("list_servers", cmd.ListServers, self.list_servers),
            ("remove_server", cmd.RemoveServer, self.remove_server),
            ("test_server", cmd.TestServer, self.test_server),
            ("list_tools", cmd.ListTools, self.list_tools),
            ("call", cmd.CallTool, self.call),
            ("cancel", cmd.CancelCall, self.cancel),
            ("history", cmd.History, self.history),
        ):
            self.server.route(verb, kind, handler)  # type: ignore[arg-type]

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    # -- registry ---------------------------------------------------------------------------
    def visible(self, caller: cmd.Caller) -> dict[str, Registered]:
        out = {name: r for (owner, name), r in self.registered.items() if owner == caller.org_id}
        out.update({name: r for (owner, name), r in self.registered.items() if owner == caller.user_id})
        return out

    def _find(self, caller: cmd.Caller, name: str) -> Registered:
        found = self.visible(caller).get(name)
        if found is None:
            raise refuse(404, "Not found", f"No MCP server named {name!r} is registered for you.")
        return found

    @staticmethod
    def _view(r: Registered) -> cmd.ServerView:
        secrets = [
            v.secret for v in [*r.spec.env.values(), *r.spec.headers.values()] if isinstance(v, cmd.SecretRef)
        ]
        return cmd.ServerView(
            name=r.spec.name,
            transport=r.spec.transport,
            scope=r.scope,  # type: ignore[arg-type]
            status="ok",
            tools_count=len(TOOLS),
            requires_auth=bool(secrets),
            secrets=secrets,
            created_at=r.created_at,
        )

    async def register_server(self, request: cmd.RegisterServer) -> cmd.ServerView:
        owner = request.caller.org_id if request.scope == "org" else request.caller.user_id
        if request.scope == "org" and not request.caller.is_admin:
            raise refuse(403, "Forbidden", "Only org admins register org servers.")
        if (owner, request.spec.name) in self.registered:
            raise refuse(409, "Conflict", f"A server named {request.spec.name!r} already exists.")
        registered = Registered(request.spec, request.scope, owner)
        self.registered[(owner, request.spec.name)] = registered
        return self._view(registered)

    async def list_servers(self, request: cmd.ListServers) -> cmd.ServerList:
        return cmd.ServerList(servers=[self._view(r) for r in self.visible(request.caller).values()])

    async def remove_server(self, request: cmd.RemoveServer) -> Empty:
        owner = request.caller.org_id if request.scope == "org" else request.caller.user_id
        if request.scope == "org" and not request.caller.is_admin:
            raise refuse(403, "Forbidden", "Only org admins remove org servers.")
        if self.registered.pop((owner, request.name), None) is None:
            raise refuse(404, "Not found", f"No MCP server named {request.name!r} is registered for you.")
        return Empty()

    async def test_server(self, request: cmd.TestServer) -> cmd.ServerView:
        return self._view(self._find(request.caller, request.name))

    async def list_tools(self, request: cmd.ListTools) -> cmd.ToolCatalog:
        self.lists.append(request)
        names = [request.server] if request.server is not None else sorted(self.visible(request.caller))
        for name in names:
            self._find(request.caller, name)
        return cmd.ToolCatalog(servers=[cmd.ServerTools(server=name, tools=list(TOOLS)) for name in names])

    # -- calls ------------------------------------------------------------------------------
    async def call(self, request: cmd.CallTool) -> cmd.CallOutcome:
        self.calls.append(request)
        self._find(request.caller, request.server)
        started = datetime.now(UTC)
        arguments = msgspec.json.decode(request.arguments)

        def outcome(status: str, **fields: Any) -> cmd.CallOutcome:
            done = cmd.CallOutcome(
                request_id=request.request_id,
                server=request.server,
                tool_name=request.tool,
                status=status,  # type: ignore[arg-type]
                duration_ms=(datetime.now(UTC) - started).total_seconds() * 1000,
                timestamp=started,
                **fields,
            )
            self.history_items.insert(
                0,
                (
                    request.caller.user_id,
                    cmd.HistoryItem(
                        request_id=request.request_id,
                        server=request.server,
                        tool_name=request.tool,
                        status=status,
                        duration_ms=done.duration_ms,
                        arguments_sha256="0" * 64,
                        arguments_bytes=len(request.arguments),
                        result_bytes=len(done.result or b""),
                        timestamp=started,
                        error=done.error,
                    ),
                ),
            )
            return done

        tool = request.tool
        if tool in ("echo", "dotted.name", LONG_TOOL):
            text = msgspec.json.encode({"tool": tool, "arguments": arguments}).decode()
            return outcome("success", result=_text_result(text))
        if tool == "fail":
            return outcome(
                "error", result=_text_result("the tool failed", is_error=True), error="the tool failed"
            )
        if tool == "slow":
            cancelled = self._running[request.request_id] = asyncio.Event()
            try:
                await asyncio.wait_for(cancelled.wait(), timeout=float(arguments.get("seconds", 5)))
                return outcome("error", error="canceled by the client")
            except TimeoutError:
                return outcome("success", result=_text_result("slept"))
            finally:
                self._running.pop(request.request_id, None)
        if tool == "timeout":
            return outcome("timeout", error="The upstream did not answer within 30 s (timed out).")
        if tool == "needs_secret":
            return outcome(
                "error",
                error="The secret 'github_token' is not set: PUT /v1/secrets/github_token to set it.",
                error_code=-32002,
            )
        if tool == "quota":
            raise refuse(429, "Too many requests", "Monthly quota exceeded (50 calls). Upgrade to Pro.")
        return outcome("error", error=f"Unknown tool {tool!r} on {request.server!r}.", error_code=-32602)

    async def cancel(self, request: cmd.CancelCall) -> Empty:
        self.cancels.append(request)
        event = self._running.get(request.request_id)
        if event is not None:
            event.set()
        return Empty()

    async def history(self, request: cmd.History) -> cmd.HistoryPage:
        items = [
            i
            for user, i in self.history_items
            if user == request.caller.user_id and request.server in (None, i.server)
        ]
        return cmd.HistoryPage(items=items[: request.limit], next_cursor=None)
