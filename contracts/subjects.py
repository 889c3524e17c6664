"""Subject and stream names: the addresses every service agrees on."""

from typing import Final

STREAM: Final = "GATEHOUSE_EVENTS"
EVENTS_PREFIX: Final = "events"
ALL_EVENTS: Final = "events.>"

# Every service that runs in a full deployment; `/ready` asks each of them.
SERVICES: Final = ("identity", "audit", "secrets", "quota", "dispatcher", "session_runner", "mcp_proxy")


def event_subject(event_type: str) -> str:
    """`identity.user_registered` -> `events.identity.user_registered`."""
    return f"{EVENTS_PREFIX}.{event_type}"


def service_events(service: str) -> str:
    """Every event one service publishes: `events.identity.>`."""
    return f"{EVENTS_PREFIX}.{service}.>"


def command(service: str, verb: str) -> str:
    """Request/reply subject of a command: `cmd.identity.create_user`."""
    return f"cmd.{service}.{verb}"


def ping(service: str) -> str:
    return command(service, "ping")


# MCP notifications of one tool call (progress, logs), mcp_proxy -> the gateway replica that
# took the call, on core NATS (contracts/commands/mcp.py: CallTool.progress_token, log_level).
MCP_NOTICES: Final = "mcp.notify.>"


def mcp_notices(request_id: str) -> str:
    return f"mcp.notify.{request_id}"


# The MCP client's answers to an upstream's requests during one tool call (sampling,
# elicitation: contracts/commands/mcp.py ClientRequest, ClientAnswer), gateway -> the mcp_proxy
# instance running the call, as core NATS request/reply; `seq` is the request's id on the
# notice subject.
MCP_ANSWERS: Final = "mcp.answer.>"


def mcp_answers(request_id: str) -> str:
    """Every answer of one call: what mcp_proxy subscribes to while the call runs."""
    return f"mcp.answer.{request_id}.*"


def mcp_answer(request_id: str, seq: int) -> str:
    return f"mcp.answer.{request_id}.{seq}"


# An upstream's own `notifications/tools/list_changed`, mcp_proxy -> every gateway replica, on
# core NATS (contracts/commands/mcp.py UpstreamToolsChanged): the replicas holding that user's
# MCP streams tell them to list again.
MCP_TOOLS_CHANGED: Final = "mcp.tools_changed.>"


def mcp_tools_changed(user_id: str) -> str:
    return f"mcp.tools_changed.{user_id}"


# Builds (contracts/commands/builds.py): a work queue, a log stream, live status, heartbeats.
BUILDS_STREAM: Final = "GATEHOUSE_BUILDS"  # work-queue retention: an order is removed once acked
BUILD_QUEUE: Final = "builds.queue"
BUILD_CONSUMER: Final = "runners"  # the durable pull consumer every runner node shares
BUILD_LOGS_STREAM: Final = "GATEHOUSE_BUILD_LOGS"  # captures `builds.*.log`
BUILD_HEARTBEATS: Final = "gatehouse_build_heartbeats"  # KV bucket with a TTL


def build_log(build_id: str) -> str:
    return f"builds.{build_id}.log"


def build_status(build_id: str) -> str:
    return f"builds.{build_id}.status"


def build_live(build_id: str) -> str:
    """Both live subjects of one build."""
    return f"builds.{build_id}.*"
