"""Which recorded mcp_proxy events become public facts, and in what shape.

Matched by qualified name (`ServerCatalog.ServerRegistered`), which is also the stored topic.
"""

from typing import Any

import msgspec

from contracts.events import mcp as ev
from services.kit.outbox import Outgoing
from services.mcp_proxy.domain.calls import audit_outcome

_SERVICE_META: dict[str, Any] = {"actor": {"kind": "service", "id": "mcp_proxy"}}


def _secrets(spec: dict[str, Any]) -> list[str]:
    values = [*spec.get("env", {}).values(), *spec.get("headers", {}).values()]
    return sorted({v["secret"] for v in values if isinstance(v, dict) and "secret" in v})


def _payload(kind: str, e: Any) -> msgspec.Struct | None:
    if kind == "ToolCall.Completed":
        return ev.ToolCallCompleted(
            request_id=e.request_id,
            user_id=e.user_id,
            server=e.server,
            tool_name=e.tool_name,
            status=e.status,
            outcome=audit_outcome(e.status),
            duration_ms=e.duration_ms,
            arguments_sha256=e.arguments_sha256,
            arguments_bytes=e.arguments_bytes,
            result_bytes=e.result_bytes,
            reached_upstream=e.reached_upstream,
            started_at=e.started_at,
            error=e.error,
        )
    if kind == "UpstreamRequest.Completed":
        return ev.UpstreamRequestCompleted(
            request_id=e.request_id,
            user_id=e.user_id,
            server=e.server,
            method=e.method,
            status=e.status,
            outcome=audit_outcome(e.status),
            duration_ms=e.duration_ms,
            params_sha256=e.params_sha256,
            params_bytes=e.params_bytes,
            result_bytes=e.result_bytes,
            started_at=e.started_at,
            error=e.error,
        )
    if kind == "ServerCatalog.ServerRegistered":
        return ev.ServerRegistered(
            server=e.name,
            scope=e.scope,
            owner_user_id=e.owner_id if e.scope == "user" else None,
            transport=e.spec["transport"],
            secrets=_secrets(e.spec),
        )
    if kind == "ServerCatalog.ServerRemoved":
        return ev.ServerRemoved(
            server=e.name, scope=e.scope, owner_user_id=e.owner_id if e.scope == "user" else None
        )
    if kind == "UpstreamProcess.Started":
        return ev.UpstreamProcessStarted(server=e.server, user_id=e.user_id, pid=e.pid, node=e.node)
    if kind == "UpstreamProcess.Stopped":
        return ev.UpstreamProcessStopped(
            server=e.server, user_id=e.user_id, pid=e.pid, node=e.node, reason=e.reason
        )
    return None  # ServerCatalog.Opened is bookkeeping


def translate(event: Any) -> Outgoing | None:
    payload = _payload(type(event).__qualname__, event)
    if payload is None:
        return None
    meta: dict[str, Any] = getattr(event, "meta", None) or _SERVICE_META
    return Outgoing(payload, meta.get("org_id"), meta)
