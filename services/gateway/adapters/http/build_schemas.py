"""Request and response bodies of `/v1/builds` and `/v1/sessions`."""

from datetime import datetime
from typing import Literal

import msgspec

from contracts.commands import builds as cmd


class NewBuild(msgspec.Struct, forbid_unknown_fields=True):
    """Prompts run one after another; `agent` names the agent CLI (default `cursor`); `env` adds
    environment variables for the agent (not `GATEHOUSE_*`, `LD_*` nor the agent key's own)."""

    prompts: list[str]
    agent: str = "cursor"
    env: dict[str, str] = msgspec.field(default_factory=dict)


class BuildAccepted(msgspec.Struct):
    build_id: str
    status: Literal["queued"]


class StepInfo(msgspec.Struct):
    index: int
    status: str
    exit_code: int | None
    duration_ms: int
    started_at: datetime
    finished_at: datetime
    error: str | None


class BuildInfo(msgspec.Struct):
    build_id: str
    status: str
    steps: list[StepInfo]
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    error: str | None
    queued_at: datetime
    agent: str
    prompts: int


class SessionInfo(msgspec.Struct):
    build_id: str
    pid: int | None
    node: str
    started_at: datetime
    uptime_s: float


class LogLineInfo(msgspec.Struct):
    n: int
    stream: str
    text: str


class LogPageInfo(msgspec.Struct):
    build_id: str
    status: str
    lines: list[LogLineInfo]
    next_after: int
    more: bool


def step_info(s: cmd.StepView) -> StepInfo:
    return StepInfo(
        index=s.index,
        status=s.status,
        exit_code=s.exit_code,
        duration_ms=s.duration_ms,
        started_at=s.started_at,
        finished_at=s.finished_at,
        error=s.error,
    )


def build_info(v: cmd.BuildView) -> BuildInfo:
    return BuildInfo(
        build_id=v.build_id,
        status=v.status,
        steps=[step_info(s) for s in v.steps],
        started_at=v.started_at,
        finished_at=v.finished_at,
        exit_code=v.exit_code,
        error=v.error,
        queued_at=v.queued_at,
        agent=v.agent,
        prompts=v.prompts,
    )


def line_info(line: cmd.LogLine) -> LogLineInfo:
    return LogLineInfo(n=line.n, stream=line.stream, text=line.text)
