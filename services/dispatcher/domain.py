"""Builds: what may be asked for, and the lifecycle every build goes through. No I/O.

    queued --claim--> running --finish--> completed | failed | canceled
       \\-----------cancel / fail---------------------^

A build is claimed by one runner node; only that node may report its worker, its steps and
its end. Steps are reported in order, each once (a repeated report changes nothing). Once a
build has ended, nothing changes it again: a late report from its node, a second stop or a
reaper's verdict is answered with the final state.
"""

import re
import uuid
from datetime import datetime
from typing import Any

import msgspec
from eventsourcing.domain import Aggregate, event

from contracts.commands.builds import (
    ENV_NAME_PATTERN,
    MAX_ENV,
    MAX_ENV_VALUE_BYTES,
    MAX_PROMPT_BYTES,
    MAX_PROMPTS,
    MAX_TOTAL_PROMPT_BYTES,
    TERMINAL,
)

Meta = dict[str, Any]
ENV_NAME = re.compile(ENV_NAME_PATTERN)
RESERVED_ENV_PREFIXES = ("GATEHOUSE_", "LD_")
WORKER_LOST = "worker lost"


class Agent(msgspec.Struct, frozen=True):
    name: str
    label: str  # as a human says it
    key_name: str  # the user's secret holding the key
    key_env: str  # the variable the agent CLI reads it from

    def missing_key_sentence(self) -> str:
        return f"{self.label} API key not configured for this user. Please add your API key in Settings."


AGENTS: dict[str, Agent] = {
    "cursor": Agent(name="cursor", label="Cursor", key_name="cursor_api_key", key_env="CURSOR_API_KEY"),
}


class BuildError(Exception):
    """A rule was broken; the message is for a human."""


class Invalid(BuildError):
    pass


class NotFound(BuildError):
    pass


class Conflict(BuildError):
    pass


# -- what may be asked for ------------------------------------------------------------------
def agent_named(name: str) -> Agent:
    found = AGENTS.get(name)
    if found is None:
        raise Invalid(f"unknown agent {name!r}; agents are {', '.join(sorted(AGENTS))}")
    return found


def check_prompts(prompts: list[str]) -> list[str]:
    if not prompts:
        raise Invalid("a build needs at least one prompt")
    if len(prompts) > MAX_PROMPTS:
        raise Invalid(f"a build has at most {MAX_PROMPTS} prompts, got {len(prompts)}")
    total = 0
    for i, prompt in enumerate(prompts):
        size = len(prompt.encode())
        if not prompt.strip():
            raise Invalid(f"prompt {i + 1} is empty")
        if size > MAX_PROMPT_BYTES:
            raise Invalid(f"prompt {i + 1} is {size} bytes; a prompt is at most {MAX_PROMPT_BYTES} bytes")
        if "\x00" in prompt:
            raise Invalid(f"prompt {i + 1} contains a NUL character")
        total += size
    if total > MAX_TOTAL_PROMPT_BYTES:
        raise Invalid(
            f"the prompts add up to {total} bytes; a build is at most {MAX_TOTAL_PROMPT_BYTES} bytes"
        )
    return prompts


def check_env(env: dict[str, str], agent: Agent) -> dict[str, str]:
    if len(env) > MAX_ENV:
        raise Invalid(f"a build sets at most {MAX_ENV} environment variables, got {len(env)}")
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            raise Invalid(f"{name[:80]!r} is not a valid environment variable name")
        if name == agent.key_env or name.startswith(RESERVED_ENV_PREFIXES):
            raise Invalid(f"the environment variable {name} is set by Gatehouse and cannot be overridden")
        if len(value.encode()) > MAX_ENV_VALUE_BYTES or "\x00" in value:
            raise Invalid(f"the value of {name} must be at most {MAX_ENV_VALUE_BYTES} bytes, without NUL")
    return env


def check_request(prompts: list[str], agent: str, env: dict[str, str]) -> Agent:
    found = agent_named(agent)
    check_prompts(prompts)
    check_env(env, found)
    return found


# -- the aggregate -----------------------------------------------------------------------------
class Build(Aggregate):
    @staticmethod
    def create_id(build_id: str) -> uuid.UUID:
        """The id is chosen before the build is recorded: it keys the quota reservation too."""
        return uuid.UUID(build_id)

    @event("Queued")
    def __init__(
        self,
        build_id: str,
        user_id: str,
        org_id: str,
        agent: str,
        prompts: list[str],
        env: dict[str, str],
        queued_at: datetime,
        meta: Meta,
    ) -> None:
        # `meta` (actor, correlation id, trace, org id) rides on every event for the outbox.
        self.user_id = user_id
        self.org_id = org_id
        self.agent = agent
        self.prompts = prompts
        self.env = env
        self.queued_at = queued_at
        self.status = "queued"
        self.node: str | None = None
        self.pid: int | None = None
        self.started_at: datetime | None = None
        self.finished_at: datetime | None = None
        self.exit_code: int | None = None
        self.error: str | None = None
        self.steps: list[dict[str, Any]] = []
        self.log_lines = 0

    @property
    def build_id(self) -> str:
        return str(self.id)

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    # claim and worker
    def claim(self, node: str, at: datetime, meta: Meta) -> tuple[bool, str | None]:
        """(go, reason): the node may start the build. A repeated claim by the same node is fine."""
        if self.status == "running" and self.node == node:
            return True, None
        if self.status != "queued":
            why = f"the build is {self.status}" + (
                f" on node {self.node}" if self.status == "running" else ""
            )
            return False, why
        self._started(node=node, started_at=at, meta=self._scoped(meta))
        return True, None

    @event("Started")
    def _started(self, node: str, started_at: datetime, meta: Meta) -> None:
        self.status = "running"
        self.node = node
        self.started_at = started_at

    def attach(self, node: str, pid: int, meta: Meta) -> bool:
        """Records the worker's pid; False when the node should stop it (ended, or not its build)."""
        if self.status != "running" or self.node != node:
            return False
        if self.pid != pid:
            self._attached(pid=pid, meta=self._scoped(meta))
        return True

    @event("Attached")
    def _attached(self, pid: int, meta: Meta) -> None:
        self.pid = pid

    # steps
    def record_step(self, node: str, step: dict[str, Any], meta: Meta) -> bool:
        """Records the next step; False when the node should stop (the build ended or is not its)."""
        if self.status != "running" or self.node != node:
            return False
        index = step["index"]
        if index < len(self.steps):
            return True  # reported again (the node retried): already recorded
        if index != len(self.steps) or index >= len(self.prompts):
            raise Invalid(f"step {index} reported out of order (next is {len(self.steps)})")
        if step["status"] not in ("completed", "failed", "canceled"):
            raise Invalid(f"unknown step status {step['status']!r}")
        self._step_finished(step=step, meta=self._scoped(meta))
        return True

    @event("StepFinished")
    def _step_finished(self, step: dict[str, Any], meta: Meta) -> None:
        self.steps.append(step)

    # the end
    def finish(
        self,
        status: str,
        exit_code: int | None,
        error: str | None,
        at: datetime,
        log_lines: int,
        meta: Meta,
        node: str | None = None,
    ) -> bool:
        """Ends the build; False when it had ended already (the first verdict stands)."""
        if self.ended:
            return False
        if node is not None and self.node is not None and node != self.node:
            raise Conflict(f"build {self.id} runs on node {self.node}, not {node}")
        if status not in TERMINAL:
            raise Invalid(f"{status!r} is not a final status")
        if status == "completed":
            passed = [s for s in self.steps if s["status"] == "completed"]
            if len(passed) != len(self.prompts):
                raise Invalid(f"a build completes after all {len(self.prompts)} steps; {len(passed)} passed")
            error = None
        elif status == "failed" and not error:
            error = "the build failed"
        self._finished(
            status=status,
            exit_code=exit_code,
            error=error,
            finished_at=at,
            log_lines=log_lines,
            steps=len(self.steps),
            meta=self._scoped(meta),
        )
        return True

    def cancel(self, at: datetime, meta: Meta) -> bool:
        return self.finish("canceled", self.exit_code, None, at, self.log_lines, meta)

    def lose(self, at: datetime, meta: Meta, why: str = WORKER_LOST) -> bool:
        """The reaper's verdict: the worker or its node vanished."""
        return self.finish("failed", None, why, at, self.log_lines, meta)

    @event("Finished")
    def _finished(
        self,
        status: str,
        exit_code: int | None,
        error: str | None,
        finished_at: datetime,
        log_lines: int,
        steps: int,
        meta: Meta,
    ) -> None:
        self.status = status
        self.exit_code = exit_code
        self.error = error
        self.finished_at = finished_at
        self.log_lines = max(self.log_lines, log_lines)

    def owned_by(self, user_id: str) -> bool:
        return self.user_id == user_id

    def _scoped(self, meta: Meta) -> Meta:
        """Every fact about a build names its org and user (events are routed and audited by them)."""
        return {**meta, "org_id": self.org_id, "user_id": self.user_id}


class BuildRefusal(Aggregate):
    """A build that was not queued (the agent key is missing): recorded for the audit trail."""

    @event("Refused")
    def __init__(
        self,
        user_id: str,
        org_id: str,
        agent: str,
        key_name: str,
        reason: str,
        refused_at: datetime,
        meta: Meta,
    ) -> None:
        self.user_id = user_id
        self.org_id = org_id
        self.agent = agent
        self.key_name = key_name
        self.reason = reason
        self.refused_at = refused_at


def parse_build_id(build_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(build_id)
    except ValueError:
        raise NotFound(f"no build {build_id[:80]}") from None
