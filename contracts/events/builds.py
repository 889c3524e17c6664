"""Facts published by the dispatcher about builds (subjects `events.dispatcher.<name>`).

Every step and every transition of a build is a fact. None carries a prompt, an agent key,
an environment value or a line of output: only counts, names, exit codes and errors. Each
names the build (`build_id`) and the user it runs for (`user_id`), so the audit trail files
it under the build and shows it to that user.
"""

from datetime import datetime

import msgspec


class BuildQueued(msgspec.Struct, kw_only=True):
    build_id: str
    user_id: str
    agent: str
    prompts: int
    env_names: list[str]
    queued_at: datetime


class BuildRefused(msgspec.Struct, kw_only=True):
    """A build was not queued because the user's agent key is not configured."""

    user_id: str
    agent: str
    key_name: str  # the secret that was looked for, e.g. `cursor_api_key`
    reason: str  # "agent_key_missing"
    refused_at: datetime
    outcome: str = "denied"


class BuildStarted(msgspec.Struct, kw_only=True):
    """A runner node took the build from the queue."""

    build_id: str
    user_id: str
    node: str
    started_at: datetime


class BuildStepFinished(msgspec.Struct, kw_only=True):
    build_step_id: str  # `<build id>:<index>`
    build_id: str
    user_id: str
    index: int
    status: str  # "completed" | "failed" | "canceled"
    exit_code: int | None
    duration_ms: int
    started_at: datetime
    finished_at: datetime
    error: str | None = None
    outcome: str = "success"  # "failure" unless the step completed


class BuildCompleted(msgspec.Struct, kw_only=True):
    build_id: str
    user_id: str
    exit_code: int | None
    steps: int
    finished_at: datetime
    log_lines: int = 0


class BuildFailed(msgspec.Struct, kw_only=True):
    build_id: str
    user_id: str
    exit_code: int | None
    error: str
    steps: int
    finished_at: datetime
    log_lines: int = 0
    outcome: str = "failure"


class BuildCanceled(msgspec.Struct, kw_only=True):
    build_id: str
    user_id: str
    steps: int
    finished_at: datetime
    by: str  # who stopped it: a user id, or a service


EVENTS: dict[str, type[msgspec.Struct]] = {
    "dispatcher.build_queued": BuildQueued,
    "dispatcher.build_refused": BuildRefused,
    "dispatcher.build_started": BuildStarted,
    "dispatcher.build_step_finished": BuildStepFinished,
    "dispatcher.build_completed": BuildCompleted,
    "dispatcher.build_failed": BuildFailed,
    "dispatcher.build_canceled": BuildCanceled,
}
