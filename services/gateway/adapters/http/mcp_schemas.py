"""Bodies of the `/v1/mcp/...` REST routes (msgspec; validated by Litestar)."""

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from contracts.commands.secrets import NAME_PATTERN as SECRET_NAME_PATTERN
from services.gateway.mcp.naming import RESERVED_SERVER_NAMES, SERVER_NAME_MAX, SERVER_NAME_PATTERN

ServerName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=SERVER_NAME_MAX, pattern=SERVER_NAME_PATTERN)
]
SecretName = Annotated[str, msgspec.Meta(pattern=SECRET_NAME_PATTERN)]
EnvName = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
HeaderName = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
PlainValue = Annotated[str, msgspec.Meta(max_length=8192)]
Url = Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^https?://[^\s/?#]+[^\s]*$")]
MAX_TIMEOUT_S = 300.0


class SecretRef(msgspec.Struct, forbid_unknown_fields=True):
    """`{"secret": "NAME"}`: the caller's secret NAME (or their org's), injected at call time."""

    secret: SecretName


Value = PlainValue | SecretRef


class NewServer(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: ServerName
    transport: Literal["stdio", "http", "sse"]
    command: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    args: Annotated[list[Annotated[str, msgspec.Meta(max_length=4096)]], msgspec.Meta(max_length=64)] = []
    env: Annotated[dict[EnvName, Value], msgspec.Meta(max_length=64)] = {}
    url: Url | None = None
    headers: Annotated[dict[HeaderName, Value], msgspec.Meta(max_length=64)] = {}
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT_S)] = 30.0
    scope: Literal["user", "org"] = "user"

    def __post_init__(self) -> None:
        if self.name.lower() in RESERVED_SERVER_NAMES:
            raise ValueError(f"`{self.name}` is reserved; choose another server name")
        if self.transport == "stdio":
            if not self.command:
                raise ValueError("a stdio server needs `command` (the program to start)")
            if self.url is not None or self.headers:
                raise ValueError(
                    "`url` and `headers` apply to http and sse servers; a stdio server takes `env`"
                )
        else:
            if not self.url:
                raise ValueError(f"an {self.transport} server needs `url`")
            if self.command is not None or self.args or self.env:
                raise ValueError(
                    "`command`, `args` and `env` apply to stdio servers; http and sse servers take `headers`"
                )


class ServerInfo(msgspec.Struct):
    name: str
    transport: str
    status: str
    tools_count: int
    requires_auth: bool
    scope: str
    error: str | None = None


class ToolInfo(msgspec.Struct):
    name: str
    description: str | None
    inputSchema: dict[str, Any]


class Execute(msgspec.Struct, forbid_unknown_fields=True):
    tool_name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    arguments: dict[str, Any] = {}


class Execution(msgspec.Struct):
    request_id: str
    server: str
    tool_name: str
    status: str
    result: Any
    error: str | None
    duration_ms: float
    timestamp: datetime | None


class HistoryEntry(msgspec.Struct):
    request_id: str
    server: str
    tool_name: str
    status: str
    duration_ms: float
    arguments_sha256: str
    arguments_bytes: int
    result_bytes: int
    timestamp: datetime
    error: str | None


class HistoryPage(msgspec.Struct):
    items: list[HistoryEntry]
    next_cursor: str | None
