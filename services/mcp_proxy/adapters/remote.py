"""HTTP (Streamable HTTP) and legacy SSE upstreams, through the official SDK's `mcp.Client`.

Sessions are pooled per (user, server registration, resolved headers): opened on first
use, reused, pinged every `health_interval_s` while idle (a failed ping closes the
session), closed after `idle_timeout_s` without calls. Each session lives in a task of its
own, because the SDK's anyio task groups must be entered and left by the same task.

Retries: only opening a session is retried (exponential backoff with jitter, on connection
errors: nothing was sent). A tools/call is never retried, since it may have reached the
upstream. Every new session checks the URL's addresses again (DNS may have changed since
registration). Only the registered headers are sent: the gateway's own clients' headers
(their Authorization above all) never reach mcp_proxy, let alone an upstream.

Notifications: a call whose listener wants progress passes a progress callback (the SDK
sends its own token upstream and routes the upstream's progress to it); log messages reach
the session's logging callback, which cannot tell which request they belong to, so each
goes to every call of this (one user's) session that asked for logs. A 2026-07-28 upstream
sends logs only to requests that opt in (`io.modelcontextprotocol/logLevel`): such calls do.

Sampling and elicitation: the SDK's callbacks are set, so the session declares both to the
upstream (the SDK declares elicitation's form and URL modes). A request goes to the oldest
call in flight on this session whose client declared the capability (the callbacks cannot
say which call it belongs to; every call of a session is the same user's), through its
listener (adapters/asks.py); with none, it is answered -32601. Validated into the SDK's
result type on the way back. A 2026-07-28 upstream's `InputRequiredResult` goes the same way
(the SDK drives those rounds through the same callbacks).

Forwarded requests (resources, prompts, completions) are validated into the SDK's own
request type and sent with `send_request`, which stamps what the session's era needs
(`Mcp-Name` included); the result is returned with every field the upstream sent.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx2
import msgspec
from mcp import Client
from mcp.client import ClientRequestContext
from mcp.client.session import IncomingMessage
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import (
    LOG_LEVEL_META_KEY,
    CompleteRequest,
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequestParams,
    ElicitResult,
    ErrorData,
    GetPromptRequest,
    Implementation,
    ListPromptsRequest,
    ListResourcesRequest,
    ListResourceTemplatesRequest,
    LoggingMessageNotificationParams,
    ReadResourceRequest,
    Request,
    Result,
    ServerCapabilities,
    SubscribeRequest,
    ToolListChangedNotification,
    UnsubscribeRequest,
)
from pydantic import ConfigDict, ValidationError

from contracts.commands.mcp import Tool, UpstreamFeatures
from services.kit.tasks import stop_task
from services.mcp_proxy.adapters.asks import INTERNAL_ERROR
from services.mcp_proxy.adapters.listing import contract_tools, decode_tool_page
from services.mcp_proxy.application.ports import (
    CallCanceled,
    CallListener,
    Reply,
    Target,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from services.mcp_proxy.config import ProxySettings
from services.mcp_proxy.domain.addresses import check_url
from services.mcp_proxy.domain.calls import INVALID_PARAMS, METHOD_NOT_FOUND
from services.mcp_proxy.domain.errors import Invalid
from services.mcp_proxy.domain.pooling import PoolKey

log = logging.getLogger(__name__)
_AnswerT = TypeVar("_AnswerT", CreateMessageResult, ElicitResult)
_CLIENT_INFO = Implementation(name="gatehouse", version="0.1.0")


def _leaves(err: BaseException) -> list[BaseException]:
    if isinstance(err, BaseExceptionGroup):
        return [leaf for sub in err.exceptions for leaf in _leaves(sub)]
    return [err]


def _connect_error(err: BaseException) -> bool:
    return any(
        isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout, ConnectionError)) for e in _leaves(err)
    )


def _describe(err: BaseException) -> str:
    for leaf in _leaves(err):
        if isinstance(leaf, httpx2.HTTPStatusError):
            return f"it answered HTTP {leaf.response.status_code}"
        if isinstance(leaf, (httpx2.ConnectError, httpx2.ConnectTimeout, ConnectionError)):
            return "the connection was refused or timed out"
        if isinstance(leaf, MCPError):
            return f"it refused the handshake ({leaf.code}: {leaf.message})"
    leaf = _leaves(err)[0]
    return f"{type(leaf).__name__}: {leaf}"


class RemoteSession:
    def __init__(
        self,
        target: Target,
        settings: ProxySettings,
        on_tools_changed: Callable[[Target], None] | None = None,
    ) -> None:
        self.target, self.settings = target, settings
        self._on_tools_changed = on_tools_changed  # adapters/tool_changes.py
        self.last_used = time.monotonic()
        self.in_flight = 0
        self.broken: str | None = None
        self._client: Client | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tools: list[Tool] | None = None
        self._calls: dict[str, asyncio.Task[Any]] = {}
        self._canceled: set[str] = set()
        self._listeners: dict[str, CallListener] = {}
        self.features = UpstreamFeatures()  # from its initialize (or discover) result

    @property
    def usable(self) -> bool:
        return self.broken is None and not self._closing.is_set()

    def _transport(self) -> Any:
        t = self.target
        assert t.url is not None
        if t.transport == "sse":
            return sse_client(
                t.url, headers=t.headers, timeout=10.0, sse_read_timeout=self.settings.max_timeout_s
            )
        client = httpx2.AsyncClient(
            headers=t.headers, timeout=httpx2.Timeout(30.0, read=self.settings.max_timeout_s)
        )
        return streamable_http_client(t.url, http_client=client)

    async def open(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mcp-session-{self.target.server}")
        await asyncio.shield(self._ready)

    async def _run(self) -> None:
        try:
            async with Client(
                self._transport(),
                cache=None,
                client_info=_CLIENT_INFO,
                logging_callback=self._logged,
                sampling_callback=self._sampling,
                elicitation_callback=self._elicitation,
                message_handler=self._message,
            ) as client:
                self._client = client
                self.features = _features(client.server_capabilities)
                self._ready.set_result(None)
                await self._closing.wait()
        except BaseException as err:
            if not self._ready.done():
                self._ready.set_exception(err)
            elif not isinstance(err, asyncio.CancelledError):
                self.broken = _describe(err)
                log.info("session to %s ended: %s", self.target.server, self.broken)
        finally:
            self._client = None
            if not self._ready.done():
                self._ready.set_exception(UpstreamFailed("the session ended before it was ready"))

    async def close(self) -> None:
        self._closing.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(5):
                    await asyncio.shield(self._task)
            except (TimeoutError, Exception):
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task

    def _live(self) -> Client:
        if self._client is None or not self.usable:
            raise UpstreamFailed(
                f"The session to '{self.target.server}' has ended ({self.broken or 'closed'})."
            )
        return self._client

    async def tools(self, refresh: bool = False) -> list[Tool]:
        if self._tools is not None and not refresh:
            return self._tools
        client = self._live()
        tools: list[Tool] = []
        cursor: str | None = None
        for _ in range(50):
            async with asyncio.timeout(self.settings.start_timeout_s):
                page = await client.list_tools(cursor=cursor)
            listed = decode_tool_page(page.model_dump_json(by_alias=True, exclude_none=True))
            tools += contract_tools(listed)
            cursor = page.next_cursor
            if not cursor:
                break
        self._tools = tools
        return tools

    async def _message(self, message: IncomingMessage) -> None:
        """The upstream's own `notifications/tools/list_changed` (handshake era: on its GET or SSE
        stream): the cached list goes, and the user's MCP clients are told."""
        if isinstance(message, ToolListChangedNotification):
            self._tools = None
            if self._on_tools_changed is not None:
                self._on_tools_changed(self.target)

    async def _logged(self, params: LoggingMessageNotificationParams) -> None:
        if self._listeners:
            raw = params.model_dump_json(by_alias=True, exclude_none=True).encode()
            for listener in list(self._listeners.values()):
                if listener.wants_logs:
                    listener.log(raw)

    async def _sampling(
        self, context: ClientRequestContext, params: CreateMessageRequestParams
    ) -> CreateMessageResult | ErrorData:
        return await self._ask(
            "sampling/createMessage",
            params.model_dump_json(by_alias=True, exclude_none=True),
            CreateMessageResult,
        )

    async def _elicitation(
        self, context: ClientRequestContext, params: ElicitRequestParams
    ) -> ElicitResult | ErrorData:
        return await self._ask(
            "elicitation/create", params.model_dump_json(by_alias=True, exclude_none=True), ElicitResult
        )

    async def _ask(self, method: str, params: str, kind: type[_AnswerT]) -> _AnswerT | ErrorData:
        raw = params.encode()
        listener = next((lis for lis in list(self._listeners.values()) if lis.accepts(method, raw)), None)
        if listener is None:
            return ErrorData(
                code=METHOD_NOT_FOUND, message=f"Gatehouse does not serve {method} to upstream servers"
            )
        asked = await listener.ask(method, raw)
        if asked.result is None:
            data = msgspec.json.decode(asked.data) if asked.data else None
            return ErrorData(code=asked.code, message=asked.message, data=data)
        try:
            return kind.model_validate_json(asked.result)
        except ValidationError as err:
            return ErrorData(
                code=INTERNAL_ERROR,
                message=f"The client's answer to {method} is not valid: {_first_problem(err)}",
            )

    async def call(
        self, tool: str, arguments: bytes, timeout: float, call_id: str, listener: CallListener | None = None
    ) -> Reply:
        client = self._live()
        self.in_flight += 1
        self.last_used = time.monotonic()
        progress, meta = None, None
        if listener is not None:
            self._listeners[call_id] = listener
            progress = _progress_to(listener) if listener.wants_progress else None
            meta = {LOG_LEVEL_META_KEY: "debug"} if listener.wants_logs else None  # the listener filters
        task = asyncio.create_task(
            client.call_tool(
                tool,
                msgspec.json.decode(arguments),
                progress_callback=progress,
                meta=meta,  # type: ignore[arg-type]  # a TypedDict with extra items
            )
        )
        self._calls[call_id] = task
        try:
            async with asyncio.timeout(timeout):
                result = await task
        except TimeoutError:
            server = self.target.server
            raise UpstreamTimeout(
                f"The server '{server}' did not answer within {timeout:g} s; the call was canceled."
            ) from None
        except MCPError as err:
            return Reply(None, error=err.message, error_code=err.code)
        except asyncio.CancelledError:
            if call_id in self._canceled and not _current_cancelling():
                raise CallCanceled() from None
            raise
        except Exception as err:
            self.broken = _describe(err)
            raise UpstreamFailed(
                f"The server '{self.target.server}' failed during the call: {self.broken}."
            ) from None
        finally:
            self._calls.pop(call_id, None)
            self._canceled.discard(call_id)
            if listener is not None:
                self._listeners.pop(call_id, None)
                await listener.flush()  # every notification is out before the outcome
            self.in_flight -= 1
            self.last_used = time.monotonic()
        raw = result.model_dump_json(by_alias=True, exclude_none=True).encode()
        if result.is_error:
            texts = [getattr(c, "text", "") for c in result.content if getattr(c, "type", "") == "text"]
            text = " ".join(texts).strip() or "The tool reported an error."
            return Reply(msgspec.Raw(raw), is_error=True, error=text[:1000], size=len(raw))
        return Reply(msgspec.Raw(raw), size=len(raw))

    async def request(self, method: str, params: bytes, timeout: float) -> Reply:
        """Any other request (FORWARDED_METHODS): validated into the SDK's request type, and its
        result passed back as the upstream sent it (fields the SDK does not model included)."""
        client = self._live()
        kind = _REQUESTS.get(method)
        if kind is None:
            return Reply(None, error=f"{method} is not forwarded.", error_code=METHOD_NOT_FOUND)
        try:
            request = kind.model_validate_json(
                b'{"method":' + msgspec.json.encode(method) + b',"params":' + params + b"}"
            )
        except ValidationError as err:
            return Reply(
                None, error=f"Invalid params for {method}: {_first_problem(err)}", error_code=INVALID_PARAMS
            )
        self.in_flight += 1
        self.last_used = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                answer = await client.session.send_request(request, _Passed)
        except TimeoutError:
            raise UpstreamTimeout(
                f"The server '{self.target.server}' did not answer {method} within {timeout:g} s."
            ) from None
        except MCPError as err:
            data = msgspec.json.encode(err.data) if err.data is not None else None
            return Reply(None, error=err.message, error_code=err.code, error_data=data)
        except ValidationError as err:  # the upstream's result is not what the method returns
            raise UpstreamFailed(
                f"The server '{self.target.server}' answered {method} with an invalid result: "
                + _first_problem(err)
            ) from None
        except Exception as err:
            self.broken = _describe(err)
            raise UpstreamFailed(
                f"The server '{self.target.server}' failed during {method}: {self.broken}."
            ) from None
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()
        raw = answer.model_dump_json(by_alias=True, exclude_none=True).encode()
        return Reply(msgspec.Raw(raw), size=len(raw))

    def cancel(self, call_id: str) -> bool:
        task = self._calls.get(call_id)
        if task is None:
            return False
        self._canceled.add(call_id)
        task.cancel()
        return True

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(10):
                await self._live().send_ping()
            return True
        except Exception as err:
            self.broken = _describe(err)
            return False


class _Passed(Result):
    """Any result, every field kept (the SDK has already checked it against the method)."""

    model_config = ConfigDict(extra="allow")


_REQUESTS: dict[str, type[Request[Any, Any]]] = {
    "resources/list": ListResourcesRequest,
    "resources/templates/list": ListResourceTemplatesRequest,
    "resources/read": ReadResourceRequest,
    "resources/subscribe": SubscribeRequest,
    "resources/unsubscribe": UnsubscribeRequest,
    "prompts/list": ListPromptsRequest,
    "prompts/get": GetPromptRequest,
    "completion/complete": CompleteRequest,
}


def _features(caps: ServerCapabilities) -> UpstreamFeatures:
    return UpstreamFeatures(
        resources=caps.resources is not None,
        subscribe=caps.resources is not None and bool(caps.resources.subscribe),
        prompts=caps.prompts is not None,
        completions=caps.completions is not None,
    )


def _first_problem(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def _progress_to(listener: CallListener) -> Any:
    async def progressed(progress: float, total: float | None, message: str | None) -> None:
        params: dict[str, Any] = {"progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        listener.progress(msgspec.json.encode(params))

    return progressed


def _current_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class RemotePool:
    def __init__(
        self, settings: ProxySettings, on_tools_changed: Callable[[Target], None] | None = None
    ) -> None:
        self.settings = settings
        self._on_tools_changed = on_tools_changed
        self.sessions: dict[PoolKey, RemoteSession] = {}
        self._opening: dict[PoolKey, asyncio.Task[RemoteSession]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._policy = settings.spec_policy().addresses

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="remote-pool-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            await stop_task(self._sweeper)
        for opening in list(self._opening.values()):
            opening.cancel()
        await asyncio.gather(*self._opening.values(), return_exceptions=True)
        sessions, self.sessions = list(self.sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    async def open(self, target: Target) -> RemoteSession:
        key = target.key
        session = self.sessions.get(key)
        if session is not None:
            if session.usable:
                return session
            del self.sessions[key]
            asyncio.create_task(session.close())  # noqa: RUF006 - close quietly in the background
        opening = self._opening.get(key)
        if opening is None:  # a task of its own: a caller giving up does not abort it for others
            opening = asyncio.get_running_loop().create_task(self._connect(target))
            self._opening[key] = opening
            opening.add_done_callback(lambda t: self._opened(key, t))
        return await asyncio.shield(opening)

    def _opened(self, key: PoolKey, task: "asyncio.Task[RemoteSession]") -> None:
        if self._opening.get(key) is task:
            del self._opening[key]
        if task.cancelled():
            return
        if task.exception() is None:
            self.sessions[key] = task.result()

    async def _connect(self, target: Target) -> RemoteSession:
        assert target.url is not None
        try:
            await asyncio.to_thread(check_url, target.url, self._policy)
        except Invalid as err:
            raise UpstreamUnavailable(f"The server '{target.server}' cannot be reached: {err}.") from None
        attempts = max(1, self.settings.http_retries + 1)
        for attempt in range(attempts):
            session = RemoteSession(target, self.settings, self._on_tools_changed)
            try:
                async with asyncio.timeout(self.settings.start_timeout_s):
                    await session.open()
                await session.tools()
                return session
            except BaseException as err:
                await session.close()
                if isinstance(err, asyncio.CancelledError):
                    raise
                retry = _connect_error(err) and attempt + 1 < attempts
                if not retry:
                    what = "did not answer in time" if isinstance(err, TimeoutError) else _describe(err)
                    raise UpstreamUnavailable(
                        f"The server '{target.server}' at {target.url} could not be reached: {what}."
                    ) from None
                delay = min(0.1 * 2**attempt, 2.0) * (0.5 + random.random())
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def retire_server(self, prefix: str, reason: str) -> None:
        for key, session in list(self.sessions.items()):
            if key.server_id.startswith(prefix):
                del self.sessions[key]
                await session.close()

    async def _sweep(self) -> None:
        interval = min(max(self.settings.idle_timeout_s / 4, 0.1), 10.0)
        last_health = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            check = now - last_health >= self.settings.health_interval_s
            if check:
                last_health = now
            for key, session in list(self.sessions.items()):
                idle = session.in_flight == 0
                expired = idle and now - session.last_used > self.settings.idle_timeout_s
                if expired or not session.usable or (check and idle and not await session.ping()):
                    if self.sessions.get(key) is session:
                        del self.sessions[key]
                    await session.close()
