"""What the application needs from the outside, as protocols; adapters/ implements them.

`QuotaGate` is the seam for issue 5 (quota): `reserve` runs before anything reaches an
upstream and may raise `QuotaExceeded` (the gateway answers 429 over HTTP and an
`isError` tool result over MCP); `commit` runs after a call that reached the upstream,
`release` after one that did not. The default lets everything through; adapters/quota.py
asks the quota service, which keeps the ledger (docs/quota.md).
"""

from collections.abc import Mapping
from typing import Protocol

import msgspec

from contracts.commands.common import Problem
from contracts.commands.mcp import Caller, CallTool, Tool, UpstreamFeatures
from services.mcp_proxy.domain.pooling import PoolKey


# -- secrets --------------------------------------------------------------------------------
class SecretResolver(Protocol):
    async def resolve(
        self, caller: Caller, server: str, names: tuple[str, ...], request_id: str, correlation_id: str
    ) -> Mapping[str, str]:
        """Each named secret's value (the caller's own, else their org's).

        Raises MissingSecret for one that is not set or was deleted, and UpstreamUnavailable
        when the secrets service cannot answer.
        """
        ...


# -- what each user last saw of each server -------------------------------------------------
class ServerStatus(msgspec.Struct, frozen=True):
    status: str  # "ok" | "error"
    tools_count: int
    error: str | None = None


class StatusBoard(Protocol):
    async def note(self, user_id: str, server_id: str, status: ServerStatus) -> None: ...
    async def read(self, user_id: str) -> dict[str, ServerStatus]: ...


# -- quota ----------------------------------------------------------------------------------
class QuotaExceeded(Exception):
    def __init__(self, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.detail, self.retry_after_s = detail, retry_after_s

    def problem(self) -> Problem:
        """The refusal as the gateway shows it: 429 with the quota service's sentence."""
        return Problem(
            status=429,
            title="Quota exceeded",
            detail=self.detail,
            code="quota_exceeded",
            retry_after_s=self.retry_after_s,
        )


class Reservation(msgspec.Struct, frozen=True):
    request_id: str
    user_id: str
    org_id: str = ""
    held: bool = True  # False: an unmetered user's call, charged after it reached the upstream
    lease: str | None = None  # not held: the lease (key) whose unit it spends


class QuotaGate(Protocol):
    def granted(self, caller: Caller, request_id: str) -> Reservation | None:
        """A reservation that needs no round trip (an unmetered user's grant, or a unit of a
        lease), else None."""
        ...

    async def reserve(self, caller: Caller, request_id: str, server: str, tool: str) -> Reservation: ...
    async def commit(self, reservation: Reservation) -> None: ...
    async def release(self, reservation: Reservation) -> None: ...


class AllowAll:
    """The default gate until the quota service provides one."""

    def granted(self, caller: Caller, request_id: str) -> Reservation | None:
        return Reservation(request_id, caller.user_id)

    async def reserve(self, caller: Caller, request_id: str, server: str, tool: str) -> Reservation:
        return Reservation(request_id, caller.user_id)

    async def commit(self, reservation: Reservation) -> None:
        return None

    async def release(self, reservation: Reservation) -> None:
        return None


class ServerSlots(Protocol):
    """The server limit: a user's own registrations hold one unit each (docs/quota.md).

    `reserve` raises QuotaExceeded over the limit; reserving a key that already holds a
    unit answers with it (a name counts once). `commit` and `release` are idempotent.
    """

    async def reserve(self, caller: Caller, key: str) -> None: ...
    async def commit(self, caller: Caller, key: str) -> None: ...
    async def release(self, caller: Caller, key: str, reason: str) -> None: ...


class NoServerLimit:
    """Without the quota service (GATEHOUSE_MCP_QUOTA=off): only MAX_SERVERS applies."""

    async def reserve(self, caller: Caller, key: str) -> None:
        return None

    async def commit(self, caller: Caller, key: str) -> None:
        return None

    async def release(self, caller: Caller, key: str, reason: str) -> None:
        return None


# -- upstreams ------------------------------------------------------------------------------
class Target(msgspec.Struct, frozen=True, kw_only=True):
    """What to start or connect to, with the caller's secrets already injected."""

    key: PoolKey
    server: str
    user_id: str
    org_id: str
    transport: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = msgspec.field(default_factory=dict)
    url: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class Reply(msgspec.Struct, frozen=True):
    """An upstream's answer to a request: its result as sent (a CallToolResult for
    tools/call), or its JSON-RPC error."""

    result: msgspec.Raw | None
    is_error: bool = False  # the result says isError: true
    error: str | None = None  # a JSON-RPC error's message, or the text of an isError result
    error_code: int | None = None
    size: int = 0  # bytes of the result as received
    error_data: bytes | None = None  # a JSON-RPC error's `data`, as sent


class UpstreamError(Exception):
    """The upstream could not answer; `reached` says whether the call may have reached it."""

    code: int = -32004
    status: str = "error"

    def __init__(self, message: str, reached: bool) -> None:
        super().__init__(message)
        self.reached = reached


class UpstreamUnavailable(UpstreamError):
    """Could not be started or connected: the call never reached it."""

    code = -32003

    def __init__(self, message: str) -> None:
        super().__init__(message, reached=False)


class LimitReached(UpstreamError):
    code = -32006

    def __init__(self, message: str) -> None:
        super().__init__(message, reached=False)


class UpstreamFailed(UpstreamError):
    """Crashed, flooded or broke the protocol while the call was in flight."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reached=True)


class UpstreamTimeout(UpstreamError):
    code = -32005
    status = "timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, reached=True)


class CallCanceled(UpstreamError):
    code = -32800

    def __init__(self, message: str = "The call was canceled by the client.") -> None:
        super().__init__(message, reached=True)


class Asked(msgspec.Struct, frozen=True, kw_only=True):
    """The MCP client's answer to an upstream's request: its result (raw JSON), or an error."""

    result: bytes | None = None
    code: int = 0
    message: str = ""
    data: bytes | None = None  # the error's `data`, raw


class CallListener(Protocol):
    """Where an upstream's notifications and requests during one call go (adapters/notices.py).

    `progress` takes the upstream's `notifications/progress` params (its token is replaced by
    the client's), `log` a `notifications/message`'s params; both return at once. `accepts`
    says whether the caller's client can be asked `method` (sampling, elicitation: it declared
    the capability); `ask` relays such a request and waits for the client's answer (or an
    error once the call is over). `flush` ends the call's listening: it waits until everything
    handed over has been sent, before the call's outcome is, and answers what is still asked.
    """

    wants_progress: bool
    wants_logs: bool

    def progress(self, params: bytes) -> None: ...
    def log(self, params: bytes) -> None: ...
    def accepts(self, method: str, params: bytes) -> bool: ...
    async def ask(self, method: str, params: bytes) -> Asked: ...
    async def flush(self) -> None: ...


class Notices(Protocol):
    def listener(self, call: CallTool) -> CallListener | None:
        """None when the caller wants no notifications of this call."""
        ...


class NoNotices:
    def listener(self, call: CallTool) -> CallListener | None:
        return None


class Upstream(Protocol):
    """One live process or session, used by one user.

    `request` sends any other request (FORWARDED_METHODS) with raw params and answers with
    the raw result or the upstream's error; `features` is what its initialize declared.
    """

    features: UpstreamFeatures

    async def tools(self, refresh: bool = False) -> list[Tool]: ...
    async def request(self, method: str, params: bytes, timeout: float) -> Reply: ...
    async def call(
        self, tool: str, arguments: bytes, timeout: float, call_id: str, listener: CallListener | None = None
    ) -> Reply: ...
    def cancel(self, call_id: str) -> bool: ...


class Upstreams(Protocol):
    """Processes or sessions, pooled by key; `retire` stops whatever serves a server."""

    async def open(self, target: Target) -> Upstream: ...
    async def retire_server(self, prefix: str, reason: str) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
