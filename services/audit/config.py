"""The audit service's own settings (`GATEHOUSE_AUDIT_*`), listed in docs/configuration.md."""

import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from services.kit.config import ConfigError

KEY_FILE = "audit-signing-key"  # in <data dir>/keys, made by `gatehouse up`


class AuditSettings(msgspec.Struct, kw_only=True, frozen=True):
    signing_key: bytes | None  # Ed25519 private key (32-byte seed); None: no checkpoints are signed
    trusted_keys: tuple[bytes, ...]  # raw Ed25519 public keys of earlier signing keys
    checkpoint_interval_s: float  # 0: only on demand
    retention_days: float  # 0: entries are kept for ever
    replay_worker_from: int = 50_000  # a catch-up this long seals in a worker process; 0: never


def key_file(data_dir: Path) -> Path:
    return data_dir / "keys" / KEY_FILE


def _b64(name: str, text: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, binascii.Error):
        raise ConfigError(f"{name} must be base64") from None
    if len(raw) != size:
        raise ConfigError(f"{name} must decode to {size} bytes, got {len(raw)}")
    return raw


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name) or str(default)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}")
    return value


def _signing_key(env: Mapping[str, str], data_dir: Path) -> bytes | None:
    if env.get("GATEHOUSE_AUDIT_SIGNING_KEY"):
        return _b64("GATEHOUSE_AUDIT_SIGNING_KEY", env["GATEHOUSE_AUDIT_SIGNING_KEY"], 32)
    named = env.get("GATEHOUSE_AUDIT_SIGNING_KEY_FILE")
    path = Path(named) if named else key_file(data_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if named:
            raise ConfigError(f"GATEHOUSE_AUDIT_SIGNING_KEY_FILE: no file at {path}") from None
        return None
    except OSError as err:
        raise ConfigError(f"cannot read the audit signing key {path}: {err.strerror}") from None
    return _b64(str(path), text, 32)


def load_audit_settings(data_dir: Path, env: Mapping[str, str] | None = None) -> AuditSettings:
    env = os.environ if env is None else env
    trusted = tuple(
        _b64("GATEHOUSE_AUDIT_TRUSTED_KEYS", part, 32)
        for part in env.get("GATEHOUSE_AUDIT_TRUSTED_KEYS", "").split(",")
        if part.strip()
    )
    settings = AuditSettings(
        signing_key=_signing_key(env, data_dir),
        trusted_keys=trusted,
        checkpoint_interval_s=_number(env, "GATEHOUSE_AUDIT_CHECKPOINT_INTERVAL_S", 600),
        retention_days=_number(env, "GATEHOUSE_AUDIT_RETENTION_DAYS", 0),
        replay_worker_from=int(_number(env, "GATEHOUSE_AUDIT_REPLAY_WORKER_FROM", 50_000)),
    )
    if settings.retention_days and settings.signing_key is None:
        raise ConfigError(
            "GATEHOUSE_AUDIT_RETENTION_DAYS needs a signing key: each deletion is recorded as a signed "
            "checkpoint (set GATEHOUSE_AUDIT_SIGNING_KEY or GATEHOUSE_AUDIT_SIGNING_KEY_FILE)"
        )
    return settings
