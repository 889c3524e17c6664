"""Commands answered by the mcp_proxy service (`cmd.mcp_proxy.<verb>`).

The registry of upstream MCP servers and the execution of tool calls both live in
mcp_proxy. Tool arguments and results travel as raw JSON (`msgspec.Raw`) so that neither
the gateway nor the proxy re-validates what it only forwards.
"""

from datetime import datetime
from typing import Final, Literal

import msgspec

from contracts.commands.common import CommandMeta

Transport = Literal["stdio", "http", "sse"]
Scope = Literal["user", "org"]


class SecretRef(msgspec.Struct, forbid_unknown_fields=True):
    """`{"secret": "NAME"}`: resolved at call time from the caller's (or their org's) secrets."""

    secret: str


EnvValue = str | SecretRef


class Caller(msgspec.Struct, kw_only=True):
    """On whose behalf: the authenticated user (from the gateway's key check, never the body)."""

    user_id: str
    org_id: str
    tier: str = "free"
    is_admin: bool = False


class ServerSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    transport: Transport
    command: str | None = None
    args: list[str] = msgspec.field(default_factory=list)
    env: dict[str, EnvValue] = msgspec.field(default_factory=dict)
    url: str | None = None
    headers: dict[str, EnvValue] = msgspec.field(default_factory=dict)
    timeout_s: float = 30.0


class RegisterServer(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    caller: Caller
    scope: Scope = "user"  # "org": an admin registers it for every member of the org
    spec: ServerSpec


class ServerView(msgspec.Struct, kw_only=True):
    name: str
    transport: Transport
    scope: Scope
    status: str  # "unknown" | "ok" | "error"
    tools_count: int
    requires_auth: bool  # some env/header value is a secret reference
    secrets: list[str] = msgspec.field(default_factory=list)  # names referenced (never values)
    error: str | None = None
    created_at: datetime | None = None


class ServerList(msgspec.Struct):
    servers: list[ServerView]


class ListServers(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    caller: Caller


class RemoveServer(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    caller: Caller
    name: str
    scope: Scope | None = None  # None: the caller's own server of that name, else (admins) the org's


class TestServer(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    caller: Caller
    name: str


# A raw-JSON field that is absent: the default of optional `msgspec.Raw` fields below. (Not
# `Raw | None`: msgspec decodes only `null` into that union, so a present object could not be
# read back with the contract type.)
ABSENT: Final = msgspec.Raw(b"")


def present(raw: msgspec.Raw) -> bool:
    """Whether an optional raw-JSON field holds a value (neither absent nor `null`)."""
    return bool(raw) and raw != msgspec.Raw(b"null")


class Tool(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    description: str | None = None
    inputSchema: msgspec.Raw = msgspec.Raw(b'{"type":"object"}')  # MCP's own field name
    annotations: msgspec.Raw = ABSENT
    title: str | None = None


class UpstreamFeatures(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What an upstream offers besides tools, as its initialize result declared it."""

    resources: bool = False
    subscribe: bool = False  # resources/subscribe and resources/unsubscribe
    prompts: bool = False
    completions: bool = False


class ServerTools(msgspec.Struct, kw_only=True):
    server: str
    tools: list[Tool] = msgspec.field(default_factory=list)
    error: str | None = None  # the server could not be listed (the others still are)
    features: UpstreamFeatures = msgspec.field(default_factory=UpstreamFeatures)


class ListTools(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    caller: Caller
    server: str | None = None  # None: every server the caller can use


class ToolCatalog(msgspec.Struct):
    servers: list[ServerTools]


class CallTool(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    caller: Caller
    request_id: str  # idempotency key; also the quota reservation key
    server: str
    tool: str
    arguments: msgspec.Raw = msgspec.Raw(b"{}")
    timeout_s: float | None = None  # None: the server's timeout_s
    # Notifications the caller listens for on `mcp.notify.<request_id>` (contracts/subjects.py),
    # each a raw JSON-RPC notification, published before the outcome: `notifications/progress`
    # with this token (the MCP client's own), and `notifications/message` (logs) at `log_level`
    # or above (an MCP level, "debug" … "emergency"). None: not wanted.
    progress_token: str | int | None = None
    log_level: str | None = None
    # What the caller's MCP client declared it answers (CLIENT_FEATURES): an upstream's
    # sampling/elicitation request during this call goes to it as a ClientRequest on the same
    # subject. Empty: such requests are refused upstream (-32601), as before.
    client_features: list[str] = msgspec.field(default_factory=list)


CallStatus = Literal["success", "error", "timeout"]

# Server-to-client requests relayed during a tool call, and the client capability each needs
# (`elicitation/create` by its `mode`, "form" when absent). Roots are not relayed.
CLIENT_FEATURES: Final = ("sampling", "elicitation.form", "elicitation.url")
CLIENT_REQUESTS: Final = ("sampling/createMessage", "elicitation/create")


class ClientRequest(msgspec.Struct, kw_only=True):
    """An upstream's request to the caller's MCP client during a tool call, published on
    `mcp.notify.<request_id>` among the call's notifications (contracts/subjects.py).

    A JSON-RPC request whose `id` is the call's own counter (1, 2, …): the gateway gives the
    client an id of its own and sends the client's answer to `mcp.answer.<request_id>.<id>`.
    `params` are the upstream's, as sent (user content: never logged, never on JetStream).
    """

    jsonrpc: str = "2.0"
    id: int
    method: str  # one of CLIENT_REQUESTS
    params: msgspec.Raw


class AnswerError(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A client's JSON-RPC error (`data` raw; empty: absent, so that it decodes from any JSON)."""

    code: int
    message: str
    data: msgspec.Raw = msgspec.Raw(b"")


class ClientAnswer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The MCP client's JSON-RPC response to a ClientRequest: exactly one of result and error.

    `user_id` is whose session the response came in (the gateway checked it); mcp_proxy
    accepts it only from the call's own caller.
    """

    user_id: str
    result: msgspec.Raw = msgspec.Raw(b"")  # empty: absent
    error: AnswerError | None = None


class AnswerReceipt(msgspec.Struct, kw_only=True, omit_defaults=True):
    """mcp_proxy's reply to a ClientAnswer: taken to the upstream, or why not."""

    accepted: bool
    detail: str = ""


class UpstreamToolsChanged(msgspec.Struct, kw_only=True):
    """An upstream told mcp_proxy that its tool list changed (`notifications/tools/list_changed`),
    published on `mcp.tools_changed.<user_id>` (core NATS, contracts/subjects.py).

    Upstream processes and sessions are per user, so the change concerns that user only, even
    for an org server (another member's process may list other tools). `server` is the
    registration's name as the user sees it. Sent at most once a second per (user, server).
    """

    user_id: str
    org_id: str
    server: str


class CallOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    server: str
    tool_name: str
    status: CallStatus
    result: msgspec.Raw = ABSENT  # the upstream's CallToolResult, as sent
    error: str | None = None
    error_code: int | None = None  # JSON-RPC error code for MCP clients
    duration_ms: float = 0.0
    timestamp: datetime | None = None


# Methods `cmd.mcp_proxy.request` forwards (anything else is answered with -32601).
FORWARDED_METHODS: Final = (
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
)


class ForwardRequest(msgspec.Struct, kw_only=True):
    """One MCP request to one upstream, on the caller's pooled process or session.

    `params` is the client's params object, raw (without its `_meta`); the upstream's result
    comes back raw as well. Not a tool call: not metered.
    """

    meta: CommandMeta
    caller: Caller
    server: str
    method: str  # one of FORWARDED_METHODS
    params: msgspec.Raw = msgspec.Raw(b"{}")


class RpcError(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A JSON-RPC error: the upstream's own, or mcp_proxy's (codes as in CallOutcome)."""

    code: int
    message: str
    data: msgspec.Raw = ABSENT  # the upstream's `data`, as sent


class ForwardOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Exactly one of `result` (the upstream's, as sent) and `error`."""

    result: msgspec.Raw = ABSENT
    error: RpcError | None = None


class CancelCall(msgspec.Struct, kw_only=True):
    caller: Caller
    request_id: str


class History(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    caller: Caller
    limit: int = 50
    server: str | None = None
    cursor: str | None = None


class HistoryItem(msgspec.Struct, kw_only=True):
    request_id: str
    server: str
    tool_name: str
    status: str
    duration_ms: float
    arguments_sha256: str
    arguments_bytes: int
    result_bytes: int
    timestamp: datetime
    error: str | None = None


class HistoryPage(msgspec.Struct):
    items: list[HistoryItem]
    next_cursor: str | None
