"""Executing a tool call: the hot path.

    find the server (cached) -> reserve quota, and meanwhile resolve secrets (cached), get the
    pooled process or session, check the tool exists -> reservation granted -> call -> reply
    -> record (batched); commit/release go out after the reply

Nothing here parses the arguments or the result: both travel as raw JSON. Failures come
back as a CallOutcome the caller can show (status "error" or "timeout", a sentence, and a
JSON-RPC code, domain/calls.py), except three refusals the gateway answers with an HTTP
status: an unknown server (404), a bad request (400), and an exhausted quota (429, code
"quota_exceeded").
"""

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from contracts.commands.mcp import ABSENT, Caller, CallOutcome, CallStatus, CallTool, CancelCall
from services.kit.rpc import CommandFailed, refuse
from services.mcp_proxy.application.ports import (
    NoNotices,
    Notices,
    QuotaExceeded,
    QuotaGate,
    Reservation,
    SecretResolver,
    ServerStatus,
    StatusBoard,
    Target,
    Upstream,
    UpstreamError,
    Upstreams,
)
from services.mcp_proxy.application.recent import Recent
from services.mcp_proxy.application.recorder import Recorder, event_meta
from services.mcp_proxy.application.registry import Registry
from services.mcp_proxy.config import ProxySettings
from services.mcp_proxy.domain import calls as codes
from services.mcp_proxy.domain.calls import CallRecord, arguments_digest
from services.mcp_proxy.domain.catalog import Entry
from services.mcp_proxy.domain.errors import MissingSecret
from services.mcp_proxy.domain.pooling import pool_key
from services.mcp_proxy.domain.specs import resolve_values

log = logging.getLogger(__name__)
_WHITESPACE = b" \t\r\n"


class Calls:
    def __init__(
        self,
        registry: Registry,
        secrets: SecretResolver,
        upstreams: Upstreams,
        quota: QuotaGate,
        recorder: Recorder,
        status: StatusBoard,
        settings: ProxySettings,
        notices: Notices | None = None,
    ) -> None:
        self.registry, self.secrets, self.upstreams = registry, secrets, upstreams
        self.quota, self.recorder, self.status, self.settings = quota, recorder, status, settings
        self.notices: Notices = notices or NoNotices()  # progress and logs to the caller
        self.recent = Recent(settings.idempotency_ttl_s)
        self._in_flight: dict[tuple[str, str], Upstream] = {}
        self._targets: dict[tuple[str, str, tuple[str, ...]], Target] = {}
        self._seen: dict[tuple[str, str], str] = {}  # (user, server_id) -> last status noted

    # -- the call --------------------------------------------------------------------------
    async def call(self, c: CallTool) -> CallOutcome:
        key = (c.caller.user_id, c.request_id)
        earlier = self.recent.get(key)
        if earlier is not None:
            return await asyncio.shield(earlier)
        fut: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
        self.recent.begin(key, fut)
        try:
            outcome = await self._execute(c)
        except BaseException as err:
            self.recent.forget(key)  # a refusal is decided again on a retry
            fut.set_exception(err)
            fut.exception()
            raise
        fut.set_result(outcome)
        self.recent.done(key, outcome)
        return outcome

    def cancel(self, c: CancelCall) -> bool:
        upstream = self._in_flight.get((c.caller.user_id, c.request_id))
        return upstream is not None and upstream.cancel(c.request_id)

    async def _execute(self, c: CallTool) -> CallOutcome:
        started_at = datetime.now(UTC)
        t0 = time.perf_counter()
        caller = c.caller
        entry = await self.registry.lookup(caller, c.server)
        if entry is None:
            raise refuse(
                404,
                "Not found",
                f"You have no MCP server named {c.server!r}; list yours with GET /v1/mcp/servers.",
                code="unknown_server",
            )
        arguments = bytes(c.arguments)
        timeout = c.timeout_s if c.timeout_s is not None else entry.spec.timeout_s
        if not 0 < timeout <= self.settings.max_timeout_s:
            raise refuse(
                400, "Invalid request", f"timeout_s must be within (0, {self.settings.max_timeout_s:g}]"
            )
        if c.meta.deadline is not None:  # answer before the caller stops waiting
            timeout = max(min(timeout, c.meta.deadline - time.time() - 0.05), 0.001)
        call = _Call(self, c, entry, arguments, started_at, t0)
        if arguments.lstrip(_WHITESPACE)[:1] != b"{":
            return call.finish(
                "error", "The arguments of a tool call must be a JSON object.", codes.INVALID_PARAMS
            )
        # The reservation travels while the call is prepared (secrets, process, tool list:
        # usually cache hits, a spawn on a cold start); nothing is sent upstream before it is
        # granted, and a refusal outranks whatever the preparation found. An unmetered user's
        # grant needs no round trip (and no task).
        granted = self.quota.granted(caller, c.request_id)
        reserving: asyncio.Future[Reservation]
        if granted is None:
            reserving = asyncio.ensure_future(self.quota.reserve(caller, c.request_id, c.server, c.tool))
        else:
            reserving = asyncio.get_running_loop().create_future()
            reserving.set_result(granted)
        try:
            ready = await call.prepare()
        except BaseException:
            if reserving.done() and not reserving.cancelled() and reserving.exception() is None:
                await self.quota.release(reserving.result())  # a lease's unit goes back
            reserving.cancel()  # an unsettled reservation expires on its own
            raise
        try:
            reservation = await reserving
        except QuotaExceeded as over:
            call.finish("error", over.detail, None)
            raise CommandFailed(over.problem()) from None
        try:
            return await call.send(ready, timeout) if isinstance(ready, _Ready) else call.finish(*ready)
        finally:
            if call.reached:
                await self.quota.commit(reservation)
            else:
                await self.quota.release(reservation)

    # -- shared with the listing and probing use cases ---------------------------------------
    async def target(self, caller: Caller, entry: Entry, request_id: str, correlation_id: str) -> Target:
        """Where to send the caller's calls for this server, their secrets injected."""
        values = (
            await self.secrets.resolve(caller, entry.name, entry.secrets, request_id, correlation_id)
            if entry.secrets
            else {}
        )
        memo = (caller.user_id, entry.server_id, tuple(values[n] for n in entry.secrets))
        known = self._targets.get(memo)
        if known is not None:
            return known
        spec = entry.spec
        if spec.transport == "stdio":
            env = resolve_values(spec.env, values)
            target = Target(
                key=pool_key(caller.user_id, entry.server_id, env),
                server=entry.name,
                user_id=caller.user_id,
                org_id=caller.org_id,
                transport="stdio",
                command=spec.command,
                args=tuple(spec.args),
                env=env,
            )
        else:
            headers = resolve_values(spec.headers, values)
            target = Target(
                key=pool_key(caller.user_id, entry.server_id, headers),
                server=entry.name,
                user_id=caller.user_id,
                org_id=caller.org_id,
                transport=spec.transport,
                url=spec.url,
                headers=headers,
            )
        if len(self._targets) > 10_000:
            self._targets.clear()
        self._targets[memo] = target
        return target

    async def note(self, user_id: str, entry: Entry, status: ServerStatus, wait: bool = False) -> None:
        """Remembers how a server last behaved for a user; writes when that changes (or `wait`)."""
        key = (user_id, entry.server_id)
        summary = f"{status.status}:{status.tools_count}:{status.error}"
        if self._seen.get(key) == summary and not wait:
            return
        self._seen[key] = summary
        if wait:
            await self.status.note(user_id, entry.server_id, status)
            return
        task = asyncio.get_running_loop().create_task(self.status.note(user_id, entry.server_id, status))
        task.add_done_callback(_quiet)


class _Ready(NamedTuple):
    upstream: Upstream
    tools_count: int


class _Call:
    """One execution, and the record it leaves."""

    def __init__(
        self, calls: Calls, c: CallTool, entry: Entry, arguments: bytes, started_at: datetime, t0: float
    ) -> None:
        self.calls, self.c, self.entry, self.arguments = calls, c, entry, arguments
        self.started_at, self.t0 = started_at, t0
        self.reached = False

    async def prepare(self) -> "_Ready | tuple[CallStatus, str, int | None]":
        """The process or session and its tools, or why the call cannot be made (not reached)."""
        calls, c = self.calls, self.c
        try:
            target = await calls.target(c.caller, self.entry, c.request_id, c.meta.correlation_id)
            upstream = await calls.upstreams.open(target)
            tools = await upstream.tools()
        except MissingSecret as missing:
            return "error", str(missing), codes.MISSING_SECRET
        except UpstreamError as err:
            self.reached = err.reached
            if not err.reached:
                await calls.note(c.caller.user_id, self.entry, ServerStatus("error", 0, str(err)))
            return ("timeout" if err.status == "timeout" else "error"), str(err), err.code
        except Exception:  # a bug here must still answer, and leave its record
            log.exception("preparing tool call %s on %s failed inside mcp_proxy", c.request_id, c.server)
            self.reached = True  # unknown: counted as reached, never silently free
            return "error", "The call failed inside the gateway; it may be retried.", codes.UPSTREAM_FAILED
        if not any(t.name == c.tool for t in tools):
            names = ", ".join(t.name for t in tools[:50]) or "none"
            message = f"The server '{c.server}' has no tool named {c.tool!r}. Its tools: {names}."
            return "error", message, codes.INVALID_PARAMS
        return _Ready(upstream, len(tools))

    async def send(self, ready: "_Ready", timeout: float) -> CallOutcome:
        calls, c = self.calls, self.c
        key = (c.caller.user_id, c.request_id)
        upstream = ready.upstream
        try:
            calls._in_flight[key] = upstream
            try:
                listener = calls.notices.listener(c)
                reply = await upstream.call(c.tool, self.arguments, timeout, c.request_id, listener)
            finally:
                calls._in_flight.pop(key, None)
        except UpstreamError as err:
            self.reached = err.reached
            if not err.reached:
                await calls.note(c.caller.user_id, self.entry, ServerStatus("error", 0, str(err)))
            status: CallStatus = "timeout" if err.status == "timeout" else "error"
            return self.finish(status, str(err), err.code)
        except Exception:  # a bug here must still answer, and leave its record
            log.exception("tool call %s on %s failed inside mcp_proxy", c.request_id, c.server)
            self.reached = True  # unknown: counted as reached, never silently free
            return self.finish(
                "error", "The call failed inside the gateway; it may be retried.", codes.UPSTREAM_FAILED
            )
        self.reached = True
        await calls.note(c.caller.user_id, self.entry, ServerStatus("ok", ready.tools_count))
        if reply.result is None:
            return self.finish(
                "error", reply.error or "The upstream answered with an error.", reply.error_code
            )
        if reply.is_error:
            return self.finish("error", reply.error, reply.error_code, reply.result, reply.size)
        return self.finish("success", None, None, reply.result, reply.size)

    def finish(
        self,
        status: CallStatus,
        error: str | None,
        code: int | None,
        result: msgspec.Raw = ABSENT,
        result_bytes: int = 0,
    ) -> CallOutcome:
        c = self.c
        duration_ms = round((time.perf_counter() - self.t0) * 1000, 3)
        self.calls.recorder.call(
            CallRecord(
                request_id=c.request_id,
                user_id=c.caller.user_id,
                org_id=c.caller.org_id,
                server=c.server,
                tool_name=c.tool,
                status=status,
                duration_ms=duration_ms,
                arguments_sha256=arguments_digest(self.arguments),
                arguments_bytes=len(self.arguments),
                result_bytes=result_bytes,
                reached_upstream=self.reached,
                started_at=self.started_at,
                error=error,
                meta=event_meta(c.meta),
            )
        )
        return CallOutcome(
            request_id=c.request_id,
            server=c.server,
            tool_name=c.tool,
            status=status,
            result=result,
            error=error,
            error_code=code,
            duration_ms=duration_ms,
            timestamp=self.started_at,
        )


def _quiet(task: "asyncio.Task[Any]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("noting a server's status failed: %s", task.exception())
