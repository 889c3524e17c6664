"""Configuration from `GATEHOUSE_*` environment variables (listed in docs/configuration.md)."""

import base64
import os
from pathlib import Path

import msgspec


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


class Settings(msgspec.Struct, kw_only=True):
    nats_url: str | None
    database_url: str | None
    data_dir: Path
    key_pepper: bytes | None
    stream_max_age_days: float
    stream_max_bytes: int
    log_level: str
    trace_export: str
    http_host: str
    http_port: int
    max_body_bytes: int
    instance: str
    nats_user: str | None = None  # with nats_password: this process's own NATS user
    nats_password: str | None = None
    master_keys: str | None = None  # secrets service: `kid:base64key,…`, newest first
    master_keys_file: Path | None = None

    def require_nats(self) -> str:
        if not self.nats_url:
            raise ConfigError("GATEHOUSE_NATS_URL is not set (e.g. nats://127.0.0.1:4222)")
        return self.nats_url

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "GATEHOUSE_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1/gatehouse)"
            )
        return self.database_url

    def require_pepper(self) -> bytes:
        if not self.key_pepper:
            raise ConfigError(
                "GATEHOUSE_KEY_PEPPER is not set: 32+ random bytes, base64 "
                "(`gatehouse up` generates one in its data dir)"
            )
        return self.key_pepper


def _number(env: dict[str, str], name: str, default: str, kind: type[int] | type[float]) -> float:
    raw = env.get(name, default)
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def _pepper(raw: str | None) -> bytes | None:
    if not raw:
        return None
    try:
        value = base64.b64decode(raw, validate=True)
    except ValueError:
        raise ConfigError("GATEHOUSE_KEY_PEPPER must be base64") from None
    if len(value) < 32:
        raise ConfigError("GATEHOUSE_KEY_PEPPER must decode to at least 32 bytes")
    return value


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    return Settings(
        nats_url=env.get("GATEHOUSE_NATS_URL") or None,
        database_url=env.get("GATEHOUSE_DATABASE_URL") or None,
        data_dir=Path(env.get("GATEHOUSE_DATA_DIR", ".gatehouse")).resolve(),
        key_pepper=_pepper(env.get("GATEHOUSE_KEY_PEPPER")),
        stream_max_age_days=_number(env, "GATEHOUSE_STREAM_MAX_AGE_DAYS", "0", float),
        stream_max_bytes=int(_number(env, "GATEHOUSE_STREAM_MAX_BYTES", "-1", int)),
        log_level=env.get("GATEHOUSE_LOG_LEVEL", "INFO").upper(),
        trace_export=env.get("GATEHOUSE_TRACE_EXPORT", "none"),
        http_host=env.get("GATEHOUSE_HTTP_HOST", "127.0.0.1"),
        http_port=int(_number(env, "GATEHOUSE_HTTP_PORT", "8765", int)),
        max_body_bytes=int(_number(env, "GATEHOUSE_MAX_BODY_BYTES", str(1024 * 1024), int)),
        instance=env.get("GATEHOUSE_INSTANCE", f"{os.uname().nodename}-{os.getpid()}"),
        nats_user=env.get("GATEHOUSE_NATS_USER") or None,
        nats_password=env.get("GATEHOUSE_NATS_PASSWORD") or None,
        master_keys=env.get("GATEHOUSE_MASTER_KEYS") or None,
        master_keys_file=Path(env["GATEHOUSE_MASTER_KEYS_FILE"]).resolve()
        if env.get("GATEHOUSE_MASTER_KEYS_FILE")
        else None,
    )
