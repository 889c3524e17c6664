"""Builds: commands of the dispatcher (`cmd.dispatcher.<verb>`) and of runner nodes
(`cmd.session_runner.stop.<node>`), the work-queue order, and the live messages.

A build is a list of prompts run one after another by an agent CLI in a worker process of
its own, on a runner node, with the user's own agent key. The dispatcher owns the build's
lifecycle (queued -> running -> completed | failed | canceled); runner nodes pull orders
from the work queue (stream `GATEHOUSE_BUILDS`, subject `builds.queue`) and report back
with the runner verbs below. Log lines travel on `builds.<id>.log` (stream
`GATEHOUSE_BUILD_LOGS`) and status changes on `builds.<id>.status` (core NATS).
"""

from datetime import datetime
from typing import Literal

import msgspec

from contracts.commands.common import CommandMeta
from contracts.envelope import TraceContext

Status = Literal["queued", "running", "completed", "failed", "canceled"]
StepStatus = Literal["completed", "failed", "canceled"]
Stream = Literal["out", "err"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "canceled"})

MAX_PROMPTS = 100
MAX_PROMPT_BYTES = 32 * 1024  # each prompt, UTF-8 (passed as one argv string: Linux allows 128 KiB)
MAX_TOTAL_PROMPT_BYTES = 256 * 1024
MAX_ENV = 32
MAX_ENV_VALUE_BYTES = 4096
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
MAX_LOG_PAGE = 2000


# -- product backend -> dispatcher (through the gateway) ------------------------------------
class SubmitBuild(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str
    user_id: str
    prompts: list[str]
    agent: str = "cursor"
    env: dict[str, str] = msgspec.field(default_factory=dict)


class BuildAccepted(msgspec.Struct, kw_only=True):
    build_id: str
    status: Status


class GetBuild(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str
    user_id: str
    build_id: str


class StepView(msgspec.Struct, kw_only=True):
    index: int
    status: StepStatus
    exit_code: int | None
    duration_ms: int
    started_at: datetime
    finished_at: datetime
    error: str | None = None


class BuildView(msgspec.Struct, kw_only=True):
    build_id: str
    status: Status
    agent: str
    prompts: int
    steps: list[StepView]
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    error: str | None
    node: str | None = None


class ListSessions(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str
    user_id: str


class SessionView(msgspec.Struct, kw_only=True):
    build_id: str
    pid: int | None
    node: str
    started_at: datetime
    uptime_s: float


class SessionList(msgspec.Struct):
    sessions: list[SessionView]


class StopBuild(msgspec.Struct, kw_only=True):
    """Idempotent: stopping a finished build answers its final state."""

    meta: CommandMeta
    org_id: str
    user_id: str
    build_id: str


class GetLogs(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str
    user_id: str
    build_id: str
    after: int = 0  # line number; lines are numbered from 1 across both streams and all steps
    limit: int = 1000


class LogLine(msgspec.Struct, array_like=True):
    """`[n, stream, text]` on the wire: compact, since there are many."""

    n: int
    stream: Stream
    text: str


class LogPage(msgspec.Struct, kw_only=True):
    build_id: str
    status: Status
    lines: list[LogLine]
    next_after: int  # pass as `after` for the next page
    more: bool  # more lines are stored now (a running build may add more later)


# -- the work queue (dispatcher -> runner nodes) ---------------------------------------------
class BuildOrder(msgspec.Struct, kw_only=True):
    """One message on `builds.queue`; `Nats-Msg-Id` is the build id."""

    build_id: str
    user_id: str
    org_id: str
    agent: str
    key_name: str  # the user's secret holding the agent key, e.g. `cursor_api_key`
    key_env: str  # the environment variable the agent reads it from, e.g. `CURSOR_API_KEY`
    prompts: list[str]
    env: dict[str, str]
    queued_at: datetime
    correlation_id: str
    trace: TraceContext = msgspec.field(default_factory=TraceContext)


# -- runner node -> dispatcher ----------------------------------------------------------------
class ClaimBuild(msgspec.Struct, kw_only=True):
    """A node pulled the order and is about to start it: queued -> running (node recorded)."""

    meta: CommandMeta
    build_id: str
    node: str


class WorkerAttached(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    build_id: str
    node: str
    pid: int


class StepFinished(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    build_id: str
    node: str
    step: StepView


class BuildFinished(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    build_id: str
    node: str
    status: Literal["completed", "failed", "canceled"]
    exit_code: int | None = None
    error: str | None = None
    log_lines: int = 0


class Go(msgspec.Struct, kw_only=True):
    """The dispatcher's answer to a node: `go` False means stop (canceled, or someone else's)."""

    go: bool
    status: Status
    reason: str | None = None


# -- dispatcher -> one runner node (`cmd.session_runner.stop.<node>`) ------------------------
class StopSession(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    build_id: str
    reason: str = "canceled"


class Stopping(msgspec.Struct, kw_only=True):
    found: bool  # False: the node runs no such build (already ended)


def stop_verb(node: str) -> str:
    """The runner verb of one node: `cmd.session_runner.stop.<node>`."""
    return f"stop.{node}"


# -- live messages ------------------------------------------------------------------------------
class LogBatch(msgspec.Struct, kw_only=True):
    """On `builds.<id>.log` (kept in GATEHOUSE_BUILD_LOGS); secret values already redacted."""

    build_id: str
    lines: list[LogLine]
    at: datetime


class StatusChange(msgspec.Struct, kw_only=True, omit_defaults=True):
    """On `builds.<id>.status` (core NATS, not kept): one transition or finished step."""

    build_id: str
    status: Status
    at: datetime
    step: StepView | None = None
    exit_code: int | None = None
    error: str | None = None


class Heartbeat(msgspec.Struct, kw_only=True):
    """The value of a build's key in the KV bucket `gatehouse_build_heartbeats`."""

    node: str
    pid: int | None = None
