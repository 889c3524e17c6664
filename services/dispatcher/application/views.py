"""Builds as the contract shows them."""

from datetime import UTC, datetime
from typing import Any

import msgspec

from contracts.commands import builds as cmd
from contracts.commands.common import CommandMeta
from services.dispatcher.domain import Build, Meta


def step_view(step: dict[str, Any]) -> cmd.StepView:
    return cmd.StepView(
        index=step["index"],
        status=step["status"],
        exit_code=step["exit_code"],
        duration_ms=step["duration_ms"],
        started_at=step["started_at"],
        finished_at=step["finished_at"],
        error=step.get("error"),
    )


def build_view(build: Build) -> cmd.BuildView:
    return cmd.BuildView(
        build_id=build.build_id,
        status=build.status,  # type: ignore[arg-type]
        agent=build.agent,
        prompts=len(build.prompts),
        steps=[step_view(s) for s in build.steps],
        queued_at=build.queued_at,
        started_at=build.started_at,
        finished_at=build.finished_at,
        exit_code=build.exit_code,
        error=build.error,
        node=build.node,
    )


def change_of(build: Build, step: dict[str, Any] | None = None) -> cmd.StatusChange:
    return cmd.StatusChange(
        build_id=build.build_id,
        status=build.status,  # type: ignore[arg-type]
        at=datetime.now(UTC),
        step=step_view(step) if step else None,
        exit_code=build.exit_code,
        error=build.error,
    )


def meta_of(meta: CommandMeta) -> Meta:
    out: Meta = msgspec.to_builtins(meta)
    out.pop("deadline", None)  # the caller's, not part of the facts
    return out
