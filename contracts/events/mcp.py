"""Facts published by mcp_proxy (subjects `events.mcp_proxy.<name>`).

Call and request events carry a hash and the sizes of the arguments (params), never the
arguments themselves, nor results.
"""

from datetime import datetime

import msgspec


class ServerRegistered(msgspec.Struct, kw_only=True):
    server: str
    scope: str  # "user" | "org"
    owner_user_id: str | None
    transport: str
    secrets: list[str] = msgspec.field(default_factory=list)  # referenced names only


class ServerRemoved(msgspec.Struct, kw_only=True):
    server: str
    scope: str
    owner_user_id: str | None


class ToolCallCompleted(msgspec.Struct, kw_only=True):
    request_id: str
    user_id: str
    server: str
    tool_name: str
    status: str  # "success" | "error" | "timeout"
    outcome: str  # audit outcome: "success" | "failure"
    duration_ms: float
    arguments_sha256: str
    arguments_bytes: int
    result_bytes: int
    reached_upstream: bool  # False: refused before the upstream saw it (not charged)
    started_at: datetime
    error: str | None = None


class UpstreamRequestCompleted(msgspec.Struct, kw_only=True):
    """A forwarded request that reads or changes something upstream (resources/read,
    prompts/get, resources/subscribe, resources/unsubscribe). Never charged as a tool call."""

    request_id: str
    user_id: str
    server: str
    method: str
    status: str  # "success" | "error" | "timeout"
    outcome: str  # audit outcome: "success" | "failure"
    duration_ms: float
    params_sha256: str
    params_bytes: int
    result_bytes: int
    started_at: datetime
    error: str | None = None


class UpstreamProcessStarted(msgspec.Struct, kw_only=True):
    server: str
    user_id: str
    pid: int
    node: str


class UpstreamProcessStopped(msgspec.Struct, kw_only=True):
    server: str
    user_id: str
    pid: int
    node: str
    reason: str  # "idle" | "crashed" | "removed" | "shutdown" | "limit"


EVENTS: dict[str, type[msgspec.Struct]] = {
    "mcp_proxy.server_registered": ServerRegistered,
    "mcp_proxy.server_removed": ServerRemoved,
    "mcp_proxy.tool_call_completed": ToolCallCompleted,
    "mcp_proxy.upstream_request_completed": UpstreamRequestCompleted,
    "mcp_proxy.upstream_process_started": UpstreamProcessStarted,
    "mcp_proxy.upstream_process_stopped": UpstreamProcessStopped,
}
