"""A runner node's own settings (`GATEHOUSE_RUNNER_*`, `GATEHOUSE_AGENT_*`, `GATEHOUSE_BUILD_*`),
listed in docs/configuration.md."""

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from services.kit.buildbus import heartbeat_ttl_s, log_retention_s
from services.kit.config import ConfigError
from services.session_runner.domain.agent import DEFAULT_AGENT_COMMAND, node_name, parse_command
from services.session_runner.domain.protocol import Limits, PromptMode


class RunnerSettings(msgspec.Struct, kw_only=True, frozen=True):
    node: str
    capacity: int
    agent_command: list[str]
    prompt_mode: PromptMode
    limits: Limits
    path: str
    data_dir: Path
    heartbeat_ttl_s: float
    log_retention_s: float

    @property
    def heartbeat_every_s(self) -> float:
        return max(0.5, min(3.0, self.heartbeat_ttl_s / 3))

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs" / "builds"

    @property
    def builds_dir(self) -> Path:
        return self.data_dir / "builds"


def _number(env: Mapping[str, str], name: str, default: float, kind: type[int] | type[float]) -> float:
    raw = env.get(name) or str(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}")
    return value


def load_runner_settings(
    data_dir: Path, instance: str, env: Mapping[str, str] | None = None
) -> RunnerSettings:
    env = os.environ if env is None else env
    try:
        command = parse_command(env.get("GATEHOUSE_AGENT_COMMAND") or DEFAULT_AGENT_COMMAND)
        node = node_name(env.get("GATEHOUSE_RUNNER_NODE") or instance)
    except ValueError as err:
        raise ConfigError(f"GATEHOUSE_AGENT_COMMAND / GATEHOUSE_RUNNER_NODE: {err}") from None
    mode = env.get("GATEHOUSE_AGENT_PROMPT_MODE", "arg")
    if mode not in ("arg", "stdin"):
        raise ConfigError(f"GATEHOUSE_AGENT_PROMPT_MODE must be arg or stdin, got {mode!r}")
    capacity = int(_number(env, "GATEHOUSE_RUNNER_CAPACITY", 8, int))
    if capacity < 1:
        raise ConfigError("GATEHOUSE_RUNNER_CAPACITY must be at least 1")
    limits = Limits(
        step_timeout_s=_number(env, "GATEHOUSE_BUILD_STEP_TIMEOUT_S", 1800, float) or 1800,
        build_timeout_s=_number(env, "GATEHOUSE_BUILD_TIMEOUT_S", 3600, float) or 3600,
        max_output_bytes=int(_number(env, "GATEHOUSE_BUILD_MAX_OUTPUT_BYTES", 64 * 1024 * 1024, int)),
        memory_mb=int(_number(env, "GATEHOUSE_BUILD_MEMORY_MB", 2048, int)),
        address_space_mb=int(_number(env, "GATEHOUSE_BUILD_ADDRESS_SPACE_MB", 0, int)),
        kill_grace_s=_number(env, "GATEHOUSE_BUILD_KILL_GRACE_S", 5, float),
    )
    return RunnerSettings(
        node=node,
        capacity=capacity,
        agent_command=command,
        prompt_mode=mode,  # type: ignore[arg-type]
        limits=limits,
        path=env.get("GATEHOUSE_AGENT_PATH") or os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        data_dir=data_dir,
        heartbeat_ttl_s=heartbeat_ttl_s(env),
        log_retention_s=log_retention_s(env),
    )
