"""Call records for the tests of mcp_proxy's recorder, store and outbox feed."""

from datetime import UTC, datetime
from typing import Any

from services.mcp_proxy.domain.calls import CallRecord


def call_record(request_id: str = "r-1", **changes: Any) -> CallRecord:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "user_id": "u-1",
        "org_id": "o-1",
        "server": "echo",
        "tool_name": "echo",
        "status": "success",
        "duration_ms": 1.5,
        "arguments_sha256": "0" * 64,
        "arguments_bytes": 2,
        "result_bytes": 10,
        "reached_upstream": True,
        "started_at": datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
        "error": None,
        "meta": {"actor": {"kind": "user", "id": "u-1"}, "correlation_id": "c"},
    }
    return CallRecord(**(fields | changes))
