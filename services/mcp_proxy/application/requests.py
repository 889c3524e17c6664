"""Forwarding one MCP request other than a tool call (`cmd.mcp_proxy.request`).

    find the server (404 unless it is the caller's own or their org's, as for a tool call)
    -> the caller's pooled process or session, their secrets injected (the tool calls' own)
    -> offered by the upstream? -> request -> record (reads and subscriptions only)

Params and results stay raw. Never metered: no quota reservation, no ToolCall record, so
nothing is charged. Every failure is an `RpcError` the gateway passes on as a JSON-RPC
error: the upstream's own code and message, or one of mcp_proxy's (domain/calls.py).
"""

import time
import uuid
from datetime import UTC, datetime

import msgspec

from contracts.commands.mcp import ABSENT, ForwardOutcome, ForwardRequest, RpcError
from services.kit.rpc import refuse
from services.mcp_proxy.application.calls import Calls
from services.mcp_proxy.application.ports import Reply, ServerStatus, UpstreamError
from services.mcp_proxy.application.recorder import Recorder, event_meta
from services.mcp_proxy.domain import calls as codes
from services.mcp_proxy.domain.calls import arguments_digest
from services.mcp_proxy.domain.errors import MissingSecret
from services.mcp_proxy.domain.requests import EMPTY_LISTS, NEEDS, RECORDED, RequestRecord, offered

_WHITESPACE = b" \t\r\n"


def _failed(code: int, message: str, data: bytes | None = None) -> ForwardOutcome:
    return ForwardOutcome(
        error=RpcError(code=code, message=message, data=msgspec.Raw(data) if data else ABSENT)
    )


class Forwarding:
    def __init__(self, calls: Calls, recorder: Recorder) -> None:
        self.calls, self.recorder = calls, recorder

    async def forward(self, c: ForwardRequest) -> ForwardOutcome:
        started_at, t0 = datetime.now(UTC), time.perf_counter()
        entry = await self.calls.registry.lookup(c.caller, c.server)
        if entry is None:
            raise refuse(
                404,
                "Not found",
                f"You have no MCP server named {c.server!r}; list yours with GET /v1/mcp/servers.",
                code="unknown_server",
            )
        if c.method not in NEEDS:
            return _failed(codes.METHOD_NOT_FOUND, f"{c.method!r} is not forwarded to upstream servers.")
        params = bytes(c.params)
        if params.lstrip(_WHITESPACE)[:1] != b"{":
            return _failed(codes.INVALID_PARAMS, f"The params of {c.method} must be a JSON object.")
        timeout = entry.spec.timeout_s
        if c.meta.deadline is not None:  # answer before the caller stops waiting
            timeout = max(min(timeout, c.meta.deadline - time.time() - 0.05), 0.001)
        request_id = str(uuid.uuid4())
        try:
            target = await self.calls.target(c.caller, entry, request_id, c.meta.correlation_id)
            upstream = await self.calls.upstreams.open(target)
        except MissingSecret as missing:
            return _failed(codes.MISSING_SECRET, str(missing))
        except UpstreamError as err:
            if not err.reached:
                await self.calls.note(c.caller.user_id, entry, ServerStatus("error", 0, str(err)))
            return _failed(err.code, str(err))
        if not offered(upstream.features, c.method):
            empty = EMPTY_LISTS.get(c.method)
            if empty is not None:  # as for a server that has none
                return ForwardOutcome(result=msgspec.Raw(empty))
            return _failed(
                codes.METHOD_NOT_FOUND,
                f"The server '{c.server}' does not offer {NEEDS[c.method]} ({c.method} is not available).",
            )
        recorded = _Record(self, c, request_id, params, started_at, t0)
        try:
            reply = await upstream.request(c.method, params, timeout)
        except UpstreamError as err:
            recorded.done("timeout" if err.status == "timeout" else "error", str(err))
            return _failed(err.code, str(err))
        if reply.result is None:
            code = reply.error_code if reply.error_code is not None else codes.UPSTREAM_FAILED
            recorded.done(
                "error", f"The upstream answered with JSON-RPC error {code}."
            )  # its text may echo params
            message = reply.error or f"The server '{c.server}' answered {c.method} with an error."
            return _failed(code, message, reply.error_data)
        recorded.done("success", None, reply)
        return ForwardOutcome(result=reply.result)


class _Record:
    """What a recorded method leaves behind (RECORDED); nothing for the others."""

    def __init__(
        self,
        forwarding: Forwarding,
        c: ForwardRequest,
        request_id: str,
        params: bytes,
        started_at: datetime,
        t0: float,
    ) -> None:
        self.forwarding, self.c, self.request_id = forwarding, c, request_id
        self.params, self.started_at, self.t0 = params, started_at, t0

    def done(self, status: str, error: str | None, reply: Reply | None = None) -> None:
        c = self.c
        if c.method not in RECORDED:
            return
        self.forwarding.recorder.request(
            RequestRecord(
                request_id=self.request_id,
                user_id=c.caller.user_id,
                org_id=c.caller.org_id,
                server=c.server,
                method=c.method,
                status=status,
                duration_ms=round((time.perf_counter() - self.t0) * 1000, 3),
                params_sha256=arguments_digest(self.params),
                params_bytes=len(self.params),
                result_bytes=reply.size if reply is not None else 0,
                started_at=self.started_at,
                error=error,
                meta=event_meta(c.meta),
            )
        )
