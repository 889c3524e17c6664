"""The dispatcher's own settings (`GATEHOUSE_BUILD_*`), listed in docs/configuration.md."""

import os
from collections.abc import Mapping

import msgspec

from services.kit.buildbus import heartbeat_ttl_s, log_retention_s
from services.kit.config import ConfigError


class DispatcherSettings(msgspec.Struct, kw_only=True, frozen=True):
    heartbeat_ttl_s: float = 10.0
    reap_grace_s: float = 15.0  # a running build without a heartbeat this long is "worker lost"
    reap_interval_s: float = 2.0
    queue_timeout_s: float = 3600.0  # a build no node started this long is failed
    log_retention_s: float = 7 * 86400.0


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name) or str(default)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def load_dispatcher_settings(env: Mapping[str, str] | None = None) -> DispatcherSettings:
    env = os.environ if env is None else env
    ttl = heartbeat_ttl_s(env)
    grace = _seconds(env, "GATEHOUSE_BUILD_REAP_GRACE_S", max(15.0, ttl * 1.5))
    if grace <= ttl:
        raise ConfigError(
            f"GATEHOUSE_BUILD_REAP_GRACE_S ({grace:g}) must exceed GATEHOUSE_BUILD_HEARTBEAT_TTL_S ({ttl:g})"
        )
    return DispatcherSettings(
        heartbeat_ttl_s=ttl,
        reap_grace_s=grace,
        reap_interval_s=_seconds(env, "GATEHOUSE_BUILD_REAP_INTERVAL_S", 2.0),
        queue_timeout_s=_seconds(env, "GATEHOUSE_BUILD_QUEUE_TIMEOUT_S", 3600.0),
        log_retention_s=log_retention_s(env),
    )
