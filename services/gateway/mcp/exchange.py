"""Answers one JSON-RPC message from an MCP client, on behalf of the authenticated caller.

Shared by every transport (Streamable HTTP in both protocol eras, legacy HTTP+SSE). Tool
calls go to mcp_proxy (`cmd.mcp_proxy.call`) and its answer is mapped onto MCP:

| mcp_proxy says                          | the MCP client gets                                  |
|-----------------------------------------|------------------------------------------------------|
| outcome with `result`                   | that CallToolResult, byte for byte (`isError` too)   |
| outcome `timeout`                       | a result with `isError: true` saying it timed out    |
| outcome with `error_code`               | a JSON-RPC error with that code and message          |
| outcome `error`, no code, no result     | a result with `isError: true` carrying the sentence  |
| refusal 429 (quota)                     | a result with `isError: true` carrying the sentence  |
| refusal 400/403/404/409                 | JSON-RPC error -32602 with the sentence              |
| refusal 5xx / not answering             | JSON-RPC error -32603 with the sentence              |

A call whose transport can deliver notifications (`Context.listener`) and whose client asks
for some (a progress token; logs at the session's `logging/setLevel` level, or in the
stateless era the request's `io.modelcontextprotocol/logLevel`) hears `mcp.notify.<request_id>`
while it runs: each upstream notification goes to the listener, all before the response.
Any other call takes the plain path (no subscription).

A handshake-era call whose client declared `sampling` or `elicitation` (kept in the session)
hears the same subject for the upstream's requests to the client: each is written on the
call's stream under an id of the gateway's (mcp/asks.py), and the client's JSON-RPC response,
POSTed in the same session to any replica, is checked against that id and sent to the
mcp_proxy instance running the call (`response`).

On one server's endpoint, resources, prompts and completions go to mcp_proxy as
`cmd.mcp_proxy.request` and the upstream's result or JSON-RPC error is passed on as sent
(`_forward`); on `/mcp` their listings are empty and the rest is -32601.
"""

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec

from contracts.commands.common import CommandMeta, Problem
from contracts.commands.mcp import (
    FORWARDED_METHODS,
    AnswerError,
    AnswerReceipt,
    Caller,
    CallOutcome,
    CallTool,
    CancelCall,
    ClientAnswer,
    ForwardOutcome,
    ForwardRequest,
    UpstreamFeatures,
    present,
)
from services.gateway.application import Gateway
from services.gateway.domain import Principal
from services.gateway.mcp import naming
from services.gateway.mcp import protocol as p
from services.gateway.mcp.asks import AskIds
from services.gateway.mcp.directory import ToolDirectory
from services.kit.rpc import CommandFailed

PAGE_SIZE: Final = 100
# What `/mcp` answers for listings of things only one server's endpoint forwards.
_EMPTY_LISTINGS: Final = {
    "resources/list": b"resources",
    "resources/templates/list": b"resourceTemplates",
    "prompts/list": b"prompts",
}
# mcp_proxy enforces each server's own `timeout_s` (at most 300 s, see the REST schema) and
# answers "timeout"; this bound only guards against a reply lost with a crashed proxy.
CALL_TIMEOUT_S: Final = 330.0
_EMPTY_OBJECT: Final = msgspec.Raw(b"{}")
_NO_FEATURES: Final = UpstreamFeatures()


class CancelNotice(msgspec.Struct):
    """A client cancelled a call: which session, whose, and the call's JSON-RPC id as JSON."""

    session_id: str
    user_id: str
    request: str  # `7` and `"7"` are different ids


class Listener(Protocol):
    """Where a transport puts the notifications of a call (before the call's response)."""

    async def notice(self, message: bytes) -> None: ...


class Inbox(Protocol):
    async def next(self) -> bytes: ...
    def drain(self) -> list[bytes]: ...


Listen = Callable[[str], AbstractAsyncContextManager[Inbox]]
# Sends a client's answer to the call waiting for it (request id, counter, ClientAnswer JSON);
# None: nobody confirmed it in time.
Answer = Callable[[str, int, bytes], Awaitable[AnswerReceipt | None]]


def caller_of(principal: Principal) -> Caller:
    return Caller(
        user_id=principal.user_id, org_id=principal.org_id, tier=principal.tier, is_admin=principal.is_admin
    )


@dataclass(slots=True)
class Context:
    """Who asks, where (`scope`: one server or all), in which era, with which routing headers."""

    principal: Principal
    scope: str | None = None
    modern: bool = False
    session_id: str | None = None  # the MCP session (Streamable HTTP) or SSE stream
    version: str | None = None  # MCP-Protocol-Version header
    name_header: str | None = None  # Mcp-Name header, as sent
    ip: str | None = None
    user_agent: str | None = None
    started: tuple[str, Caller] | None = None  # the tool call under way (request id, caller)
    listener: Listener | None = None  # None: this transport cannot deliver notifications
    log_level: str | None = None  # handshake era: the session's logging/setLevel, if any
    client_features: tuple[str, ...] = ()  # handshake era: what the client's initialize declared

    def meta(self) -> CommandMeta:
        return Gateway.meta(self.principal, self.ip, self.user_agent, None)


Method = Callable[[Context, p.Message], Awaitable[bytes]]


class Exchange:
    def __init__(
        self,
        gateway: Gateway,
        directory: ToolDirectory,
        broadcast_cancel: Callable[[CancelNotice], Awaitable[None]],
        listen: Listen | None = None,
        set_log_level: Callable[[str, str], Awaitable[None]] | None = None,
        ask_ids: AskIds | None = None,
        answer: Answer | None = None,
    ) -> None:
        self.gateway, self.directory, self.broadcast_cancel = gateway, directory, broadcast_cancel
        self.listen, self.set_log_level = listen, set_log_level
        self.ask_ids, self.answer = ask_ids, answer
        self._calls: dict[tuple[str, bytes], tuple[str, Caller]] = {}  # (session, JSON-RPC id)
        self._methods: dict[str, Method] = {
            "tools/call": self._call,
            "tools/list": self._list,
            "ping": self._empty,
            "server/discover": self._discover,
            "logging/setLevel": self._set_level,
            **dict.fromkeys(FORWARDED_METHODS, self._forward),
        }

    async def request(self, ctx: Context, message: p.Message) -> tuple[int, bytes]:
        """(HTTP status, JSON-RPC response) for a request."""
        id_json = p.encode_id(message.id)
        method = self._methods.get(message.method or "")
        try:
            if method is None:
                raise p.ProtocolError(
                    p.METHOD_NOT_FOUND,
                    f"Method {message.method!r} is not offered here (Gatehouse serves tools).",
                )
            body = await method(ctx, message)
        except p.ProtocolError as err:
            return p.error_status(err.code, ctx.modern), p.error(id_json, err.code, err.message, err.data)
        return 200, p.result(id_json, body)

    async def notification(self, ctx: Context, message: p.Message) -> None:
        if message.method == "notifications/cancelled" and ctx.session_id is not None:
            try:
                params = p.decode_params(message.params, p.CancelParams)
            except p.ProtocolError:
                return
            if params.requestId is None:
                return
            request = p.encode_id(params.requestId).decode()
            notice = CancelNotice(ctx.session_id, ctx.principal.user_id, request)
            if not await self.cancel_here(notice):
                await self.broadcast_cancel(notice)  # the call may run on another replica

    async def cancel_here(self, notice: CancelNotice) -> bool:
        """Forwards a cancellation to mcp_proxy if the call runs on this replica."""
        found = self._calls.get((notice.session_id, notice.request.encode()))
        if found is None or found[1].user_id != notice.user_id:
            return False
        await self.abandon(found)
        return True

    async def abandon(self, call: tuple[str, Caller] | None) -> None:
        if call is not None:
            await self.gateway.client.send(
                "mcp_proxy", "cancel", CancelCall(caller=call[1], request_id=call[0])
            )

    # -- methods ---------------------------------------------------------------------------------
    async def _call(self, ctx: Context, message: p.Message) -> bytes:
        params: p.CallParams = p.decode_params(message.params, p.CallParams)
        _check_envelope(ctx, params.meta)
        _check_name(ctx, params.name, "tool name")
        arguments = params.arguments if params.arguments and params.arguments != b"null" else _EMPTY_OBJECT
        if memoryview(arguments)[:1] != b"{":
            raise p.ProtocolError(p.INVALID_PARAMS, "`arguments` must be a JSON object.")
        caller = caller_of(ctx.principal)
        server, tool = await self.directory.resolve(caller, ctx.meta, ctx.scope, params.name)
        request_id = str(uuid.uuid4())
        listener = ctx.listener if self.listen is not None else None
        token = level = None
        features: list[str] = []
        if listener is not None:
            token = params.meta.progressToken if params.meta is not None else None
            level = (
                (params.meta.logLevel if params.meta is not None else None) if ctx.modern else ctx.log_level
            )
            if self._can_ask(ctx):
                features = list(ctx.client_features)
        command = CallTool(
            meta=ctx.meta(),  # the RPC client stamps the command's deadline on a copy
            caller=caller,
            request_id=request_id,
            server=server,
            tool=tool,
            arguments=arguments,
            progress_token=token,
            log_level=level,
            client_features=features,
        )
        ctx.started = (request_id, caller)
        key = (ctx.session_id, p.encode_id(message.id)) if ctx.session_id is not None else None
        if key is not None:
            self._calls[key] = ctx.started
        try:
            call = self.gateway.client.call("mcp_proxy", "call", command, CallOutcome, CALL_TIMEOUT_S)
            if listener is not None and (token is not None or level is not None or features):
                outcome = await self._relayed(request_id, call, listener, ctx if features else None)
            else:
                outcome = await call
        except CommandFailed as refused:
            if refused.problem.status == 429:  # over quota: a sentence the agent can act on
                return p.tool_error_result(refused.problem.detail, ctx.modern)
            raise _protocol_error(refused.problem) from None
        finally:
            ctx.started = None
            if key is not None:
                self._calls.pop(key, None)
        return _answer(outcome, server, tool, ctx.modern)

    def _can_ask(self, ctx: Context) -> bool:
        """Upstream requests reach this client: a handshake-era session that declared some.
        (The 2026-07-28 era has no server-to-client requests on a call's stream: see
        docs/mcp-endpoint.md.)"""
        return (
            bool(ctx.client_features)
            and not ctx.modern
            and ctx.session_id is not None
            and self.ask_ids is not None
            and self.answer is not None
        )

    async def _relayed(
        self,
        request_id: str,
        call: Coroutine[Any, Any, CallOutcome],
        listener: Listener,
        asking: Context | None = None,
    ) -> CallOutcome:
        """The call's outcome, its notifications (and, for `asking`, the upstream's requests to
        the client, under the gateway's ids) handed to `listener` first, in order."""
        assert self.listen is not None
        listener = _Asking(listener, self, asking, request_id) if asking is not None else listener
        try:
            inbox_cm = self.listen(request_id)
            inbox = await inbox_cm.__aenter__()  # subscribed before the command goes out
        except BaseException:
            call.close()  # never sent
            raise
        answer = asyncio.ensure_future(call)
        arrived: asyncio.Future[bytes] | None = None
        try:
            while not answer.done():
                arrived = asyncio.ensure_future(inbox.next())
                await asyncio.wait({answer, arrived}, return_when=asyncio.FIRST_COMPLETED)
                if arrived.done():
                    await listener.notice(arrived.result())
                arrived.cancel()
            for message in inbox.drain():  # published before the outcome: already here
                await listener.notice(message)
            return answer.result()
        finally:
            answer.cancel()
            if arrived is not None:
                arrived.cancel()
            await inbox_cm.__aexit__(None, None, None)

    async def response(self, ctx: Context, message: p.Message) -> tuple[int, bytes]:
        """A client's JSON-RPC response to a request relayed during a call: (202, b"") once the
        call running upstream has taken it; else an HTTP error with a JSON-RPC error (no id)."""
        route = None
        if self.ask_ids is not None and self.answer is not None and ctx.session_id is not None:
            route = self.ask_ids.open(ctx.principal.user_id, ctx.session_id, message.id)
        if route is None:
            shown = p.encode_id(message.id).decode()[:100]
            return _refused(
                f"Unknown response id {shown}: this session has no request from the server with it."
            )
        answer = ClientAnswer(user_id=ctx.principal.user_id)
        if message.error and message.result:
            return _refused("A response has a `result` or an `error`, not both.")
        if message.error:
            try:
                err: p.ResponseError = p.decode_params(message.error, p.ResponseError)
            except p.ProtocolError:
                return _refused("A response's `error` needs a `code` and a `message`.")
            answer.error = AnswerError(code=err.code, message=err.message)
            if (
                err.data
            ):  # else the default instance, which omit_defaults leaves out (an empty Raw is not JSON)
                answer.error.data = err.data
        elif memoryview(message.result)[:1] == b"{":
            answer.result = message.result
        else:
            return _refused("A response's `result` must be an object.")
        assert self.answer is not None
        receipt = await self.answer(route.request_id, route.seq, msgspec.json.encode(answer))
        if receipt is None:
            return _refused("The call waiting for this response did not confirm it in time.", 503)
        if not receipt.accepted:
            return _refused(receipt.detail or "The response was not taken.", 409)
        return 202, b""

    async def _list(self, ctx: Context, message: p.Message) -> bytes:
        params: p.ListParams = p.decode_params(message.params, p.ListParams)
        _check_envelope(ctx, params.meta)
        offset = 0
        if params.cursor is not None:
            decoded = naming.decode_cursor(params.cursor)
            if decoded is None:
                raise p.ProtocolError(
                    p.INVALID_PARAMS, "Invalid cursor: use the nextCursor of the last page."
                )
            offset = decoded
        try:
            catalog = await self.directory.catalog(caller_of(ctx.principal), ctx.meta, ctx.scope)
        except CommandFailed as refused:
            raise _protocol_error(refused.problem) from None
        if ctx.scope is not None and ctx.scope in catalog.errors:
            raise p.ProtocolError(
                p.INTERNAL_ERROR,
                f"The server {ctx.scope!r} could not list its tools: {catalog.errors[ctx.scope]}",
            )
        end = offset + PAGE_SIZE
        more = naming.encode_cursor(end) if end < len(catalog.tools) else None
        return p.tools_page(catalog.tools[offset:end], more, ctx.modern)

    async def _discover(self, ctx: Context, message: p.Message) -> bytes:
        _check_envelope(ctx, p.decode_params(message.params, p.ListParams).meta)
        if ctx.scope is None:
            return p.DISCOVER_RESULT
        return p.discover_result(ctx.scope, await self.features(ctx))

    async def features(self, ctx: Context) -> UpstreamFeatures:
        """What one server's upstream offers besides tools, from its catalog (fetched, or cached
        for a few seconds, which also warms tools/list). -32602 for a server the caller lacks."""
        assert ctx.scope is not None
        try:
            catalog = await self.directory.catalog(caller_of(ctx.principal), ctx.meta, ctx.scope)
        except CommandFailed as refused:
            raise _protocol_error(refused.problem) from None
        return catalog.features.get(ctx.scope, _NO_FEATURES)  # none while it cannot be listed

    async def _set_level(self, ctx: Context, message: p.Message) -> bytes:
        """Handshake era: the session's upstream log lines are relayed from this level up."""
        params: p.SetLevelParams = p.decode_params(message.params, p.SetLevelParams)
        _check_envelope(ctx, params.meta)
        if params.level not in p.LOG_LEVELS:
            raise p.ProtocolError(p.INVALID_PARAMS, f"Unknown log level {params.level!r}.")
        if ctx.session_id is not None and self.set_log_level is not None:
            await self.set_log_level(ctx.session_id, params.level)
        return p.empty_result(ctx.modern)

    async def _empty(self, ctx: Context, message: p.Message) -> bytes:
        _check_envelope(ctx, p.decode_params(message.params, p.ListParams).meta)
        return p.empty_result(ctx.modern)

    async def _forward(self, ctx: Context, message: p.Message) -> bytes:
        """Resources, prompts, completions: answered by one server's upstream, through mcp_proxy.

        On `/mcp` (many servers, no namespacing of URIs and prompt names) listings are empty
        and the rest is not offered.
        """
        method = message.method or ""
        if ctx.scope is None and method not in _EMPTY_LISTINGS:
            raise p.ProtocolError(
                p.METHOD_NOT_FOUND,
                f"Method {method!r} is not offered on /mcp; a server's resources, prompts and "
                "completions are served on /servers/{name}/mcp.",
            )
        params = p.decode_params(message.params, p.FORWARDED_PARAMS[method])
        _check_envelope(ctx, params.meta)
        if ctx.scope is None:
            return p.empty_list(_EMPTY_LISTINGS[method], ctx.modern)
        if method == "prompts/get":
            _check_name(ctx, params.name, "prompt name")
        elif method == "resources/read":
            _check_name(ctx, params.uri, "resource URI")
        command = ForwardRequest(
            meta=ctx.meta(),
            caller=caller_of(ctx.principal),
            server=ctx.scope,
            method=method,
            params=msgspec.Raw(p.without_meta(message.params)),
        )
        try:
            outcome = await self.gateway.client.call(
                "mcp_proxy", "request", command, ForwardOutcome, CALL_TIMEOUT_S
            )
        except CommandFailed as refused:
            raise _protocol_error(refused.problem) from None
        if outcome.error is not None:  # the upstream's own error, or mcp_proxy's
            data = outcome.error.data if present(outcome.error.data) else None
            raise p.ProtocolError(outcome.error.code, outcome.error.message, data)
        if not present(outcome.result):
            raise p.ProtocolError(p.INTERNAL_ERROR, f"The server {ctx.scope!r} sent no result for {method}.")
        result = bytes(outcome.result)
        return p.as_modern_result(result, method in p.LISTINGS) if ctx.modern else result


class _Asking:
    """A listener that shows the upstream's requests to the client under the gateway's ids."""

    def __init__(self, inner: Listener, exchange: Exchange, ctx: Context, request_id: str) -> None:
        assert exchange.ask_ids is not None and ctx.session_id is not None
        self.inner, self.ids, self.request_id = inner, exchange.ask_ids, request_id
        self.user_id, self.session_id = ctx.principal.user_id, ctx.session_id

    async def notice(self, message: bytes) -> None:
        shown = self.ids.outgoing(message, self.user_id, self.session_id, self.request_id)
        if shown:
            await self.inner.notice(shown)


def _refused(text: str, status: int = 400) -> tuple[int, bytes]:
    """A client response that was not taken: an HTTP error whose JSON-RPC error has no id."""
    return status, p.error(b"null", p.INTERNAL_ERROR if status >= 500 else p.INVALID_REQUEST, text)


def _check_name(ctx: Context, value: str, what: str) -> None:
    """`Mcp-Name`, when sent (always in the stateless era), must equal the body's name or URI."""
    if ctx.name_header is not None or ctx.modern:
        named = p.decode_header_value(ctx.name_header)
        if named != value:
            raise p.ProtocolError(
                p.HEADER_MISMATCH, f"Header mismatch: Mcp-Name {named!r} is not the body's {what} {value!r}."
            )


def _check_envelope(ctx: Context, meta: p.RequestMeta | None) -> None:
    """Stateless era: the body's protocol version must be the header's."""
    if (
        ctx.modern
        and meta is not None
        and meta.protocolVersion is not None
        and meta.protocolVersion != ctx.version
    ):
        raise p.ProtocolError(
            p.HEADER_MISMATCH,
            f"Header mismatch: MCP-Protocol-Version {ctx.version!r} does not match the body's "
            f"_meta protocol version {meta.protocolVersion!r}.",
        )


def _answer(outcome: CallOutcome, server: str, tool: str, modern: bool) -> bytes:
    if present(outcome.result) and outcome.status != "timeout":
        return p.as_modern_result(bytes(outcome.result)) if modern else outcome.result  # type: ignore[return-value]
    if outcome.status == "timeout":
        detail = outcome.error or ""
        text = (
            detail if "timed out" in detail else f"The call to {tool} on {server} timed out. {detail}".strip()
        )
        return p.tool_error_result(text, modern)
    if outcome.error_code is not None:
        raise p.ProtocolError(outcome.error_code, outcome.error or f"The call to {tool} on {server} failed.")
    return p.tool_error_result(outcome.error or f"The call to {tool} on {server} failed.", modern)


def _protocol_error(problem: Problem) -> p.ProtocolError:
    if problem.status in (400, 403, 404, 409, 422):
        return p.ProtocolError(p.INVALID_PARAMS, problem.detail)
    return p.ProtocolError(p.INTERNAL_ERROR, problem.detail)
