"""mcp_proxy's own settings, from `GATEHOUSE_MCP_*` environment variables (docs/mcp.md).

Read here rather than in services/kit/config.py so the kit's Settings stay the shared ones.
"""

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from services.kit.config import ConfigError
from services.mcp_proxy.domain.addresses import AddressPolicy
from services.mcp_proxy.domain.specs import SpecPolicy


class ProxySettings(msgspec.Struct, kw_only=True, frozen=True):
    idle_timeout_s: float = 300.0
    max_procs_per_user: int = 8
    max_procs: int = 200
    memory_limit_mb: int = 2048  # RLIMIT_AS of each stdio upstream; 0: none
    cpu_limit_s: int = 3600  # RLIMIT_CPU (CPU seconds over the process's life); 0: none
    start_timeout_s: float = 60.0  # spawn + initialize (npx/uvx may download first)
    max_timeout_s: float = 600.0  # the longest timeout_s a server or call may ask for
    kill_grace_s: float = 2.0  # SIGTERM, then SIGKILL after this
    max_message_bytes: int = 16 * 1024 * 1024  # one JSON-RPC line from an upstream
    stderr_log_bytes: int = 1024 * 1024  # per process, kept in two files
    allow_private: tuple[str, ...] = ()
    stdio_commands: tuple[str, ...] = ("*",)
    path: str = "/usr/local/bin:/usr/bin:/bin"
    registry_ttl_s: float = 5.0
    secret_ttl_s: float = 60.0
    http_retries: int = 3
    health_interval_s: float = 30.0
    idempotency_ttl_s: float = 600.0
    record_batch: int = 500
    record_interval_ms: float = 50.0
    max_in_flight: int = 1024
    quota: bool = False  # ask the quota service before each call (adapters/quota.py)
    data_dir: Path = Path(".gatehouse")

    def spec_policy(self) -> SpecPolicy:
        return SpecPolicy(
            addresses=AddressPolicy(self.allow_private),
            stdio_commands=frozenset(self.stdio_commands),
            max_timeout_s=self.max_timeout_s,
        )


def _num(env: Mapping[str, str], name: str, default: float, kind: type[int] | type[float]) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}")
    return value


def _list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None:
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be on or off, got {raw!r}")


def load_proxy_settings(data_dir: Path, env: Mapping[str, str] | None = None) -> ProxySettings:
    env = os.environ if env is None else env
    d = ProxySettings()
    return ProxySettings(
        idle_timeout_s=_num(env, "GATEHOUSE_MCP_IDLE_TIMEOUT_S", d.idle_timeout_s, float),
        max_procs_per_user=int(_num(env, "GATEHOUSE_MCP_MAX_PROCS_PER_USER", d.max_procs_per_user, int)),
        max_procs=int(_num(env, "GATEHOUSE_MCP_MAX_PROCS", d.max_procs, int)),
        memory_limit_mb=int(_num(env, "GATEHOUSE_MCP_MEMORY_LIMIT_MB", d.memory_limit_mb, int)),
        cpu_limit_s=int(_num(env, "GATEHOUSE_MCP_CPU_LIMIT_S", d.cpu_limit_s, int)),
        start_timeout_s=_num(env, "GATEHOUSE_MCP_START_TIMEOUT_S", d.start_timeout_s, float),
        max_timeout_s=_num(env, "GATEHOUSE_MCP_MAX_TIMEOUT_S", d.max_timeout_s, float),
        kill_grace_s=_num(env, "GATEHOUSE_MCP_KILL_GRACE_S", d.kill_grace_s, float),
        max_message_bytes=int(_num(env, "GATEHOUSE_MCP_MAX_MESSAGE_BYTES", d.max_message_bytes, int)),
        stderr_log_bytes=int(_num(env, "GATEHOUSE_MCP_STDERR_LOG_BYTES", d.stderr_log_bytes, int)),
        allow_private=_list(env, "GATEHOUSE_MCP_ALLOW_PRIVATE", d.allow_private),
        stdio_commands=_list(env, "GATEHOUSE_MCP_STDIO_COMMANDS", d.stdio_commands),
        path=env.get("GATEHOUSE_MCP_PATH") or os.environ.get("PATH") or d.path,
        registry_ttl_s=_num(env, "GATEHOUSE_MCP_REGISTRY_TTL_S", d.registry_ttl_s, float),
        secret_ttl_s=_num(env, "GATEHOUSE_MCP_SECRET_TTL_S", d.secret_ttl_s, float),
        http_retries=int(_num(env, "GATEHOUSE_MCP_HTTP_RETRIES", d.http_retries, int)),
        health_interval_s=_num(env, "GATEHOUSE_MCP_HEALTH_INTERVAL_S", d.health_interval_s, float),
        idempotency_ttl_s=_num(env, "GATEHOUSE_MCP_IDEMPOTENCY_TTL_S", d.idempotency_ttl_s, float),
        record_batch=max(1, int(_num(env, "GATEHOUSE_MCP_RECORD_BATCH", d.record_batch, int))),
        record_interval_ms=_num(env, "GATEHOUSE_MCP_RECORD_INTERVAL_MS", d.record_interval_ms, float),
        max_in_flight=max(1, int(_num(env, "GATEHOUSE_MCP_MAX_IN_FLIGHT", d.max_in_flight, int))),
        quota=_flag(env, "GATEHOUSE_MCP_QUOTA", d.quota),
        data_dir=data_dir / "mcp_proxy",
    )
