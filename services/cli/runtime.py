"""Where a running `gatehouse up` can be found: `<data dir>/runtime.json`, and its key files."""

import base64
import json
import os
import secrets
from pathlib import Path

import msgspec


class Runtime(msgspec.Struct):
    nats_url: str
    database_url: str
    gateway_url: str
    pid: int


def runtime_file(data_dir: Path) -> Path:
    return data_dir / "runtime.json"


def write_runtime(data_dir: Path, runtime: Runtime) -> None:
    path = runtime_file(data_dir)
    path.write_bytes(msgspec.json.encode(runtime))
    path.chmod(0o600)


def read_runtime(data_dir: Path) -> Runtime | None:
    try:
        return msgspec.json.decode(runtime_file(data_dir).read_bytes(), type=Runtime)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def secret_file(data_dir: Path, name: str, make: int = 32) -> tuple[str, bool]:
    """A base64 secret kept in `<data dir>/keys/<name>` (0600), made on first use."""
    keys = data_dir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    keys.chmod(0o700)
    path = keys / name
    if path.exists():
        return path.read_text().strip(), False
    value = base64.b64encode(secrets.token_bytes(make)).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value, True


def dump_json(value: object) -> str:
    return json.dumps(value, indent=2)
