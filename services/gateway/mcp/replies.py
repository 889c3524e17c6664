"""How the gateway decodes mcp_proxy replies: same JSON as the contract's `ToolCatalog`,
`CallOutcome` and `ForwardOutcome`, with raw-JSON fields msgspec can decode.

The contract declares `Tool.annotations` and `CallOutcome.result` as `msgspec.Raw | None`;
msgspec encodes that fine but decodes only `null` into it ("Expected `null`, got `object`"),
so a reply carrying a real result could not be read with the contract type. Here an absent
field is an empty `Raw` instead of None.
"""

from datetime import datetime

import msgspec

from contracts.commands.mcp import UpstreamFeatures
from services.gateway.mcp.protocol import ABSENT


def present(raw: msgspec.Raw) -> bool:
    return bool(raw) and raw != msgspec.Raw(b"null")


class ToolReply(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    inputSchema: msgspec.Raw = msgspec.Raw(b'{"type":"object"}')
    annotations: msgspec.Raw = ABSENT
    title: str | None = None


class ServerToolsReply(msgspec.Struct, kw_only=True):
    server: str
    tools: list[ToolReply] = msgspec.field(default_factory=list)
    error: str | None = None
    features: UpstreamFeatures = msgspec.field(default_factory=UpstreamFeatures)


class ToolCatalogReply(msgspec.Struct):
    servers: list[ServerToolsReply]


class CallOutcomeReply(msgspec.Struct, kw_only=True):
    request_id: str
    server: str
    tool_name: str
    status: str  # "success" | "error" | "timeout"
    result: msgspec.Raw = ABSENT  # the upstream's CallToolResult, as sent
    error: str | None = None
    error_code: int | None = None
    duration_ms: float = 0.0
    timestamp: datetime | None = None


class RpcErrorReply(msgspec.Struct, kw_only=True):
    code: int
    message: str
    data: msgspec.Raw = ABSENT


class ForwardOutcomeReply(msgspec.Struct, kw_only=True):
    result: msgspec.Raw = ABSENT  # the upstream's result, as sent
    error: RpcErrorReply | None = None
