"""Where the master keyring comes from, and the keyring file `gatehouse keys` edits.

Order: `GATEHOUSE_MASTER_KEYS` (`kid:base64key,…`, newest first), else the file named by
`GATEHOUSE_MASTER_KEYS_FILE`, else `<data dir>/keys/master-keys` when it exists (what
`gatehouse up` generates). The file holds the same entries, one a line, mode 0600.
"""

import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from services.kit.config import ConfigError, Settings
from services.kit.redaction import register_secret
from services.secrets.crypto import Keyring, KeyringError, b64, new_master_key

FILE_NAME = "master-keys"


def default_keyring_file(data_dir: Path) -> Path:
    return data_dir / "keys" / FILE_NAME


def keyring_file(settings: Settings) -> Path | None:
    """The file the keyring is read from (None when it comes from GATEHOUSE_MASTER_KEYS)."""
    if settings.master_keys:
        return None
    if settings.master_keys_file:
        return settings.master_keys_file
    path = default_keyring_file(settings.data_dir)
    return path if path.exists() else None


def load_keyring(settings: Settings) -> Keyring:
    if settings.master_keys:
        return _parsed(settings.master_keys, "GATEHOUSE_MASTER_KEYS")
    path = keyring_file(settings)
    if path is None:
        raise ConfigError(
            "no master keys: set GATEHOUSE_MASTER_KEYS=kid:base64key (32 random bytes; newest first, "
            "comma-separated) or GATEHOUSE_MASTER_KEYS_FILE (`gatehouse up` generates one in its data dir)"
        )
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read the master keyring {path}: {err.strerror}") from None
    return _parsed(text, str(path))


def _parsed(text: str, source: str) -> Keyring:
    try:
        keyring = Keyring.parse(text)
    except KeyringError as err:
        raise ConfigError(f"{source}: {err}") from None
    for kid in keyring.kids:
        register_secret(b64(keyring.get(kid).key))
    return keyring


def new_kid(now: datetime | None = None) -> str:
    return f"mk-{(now or datetime.now(UTC)):%Y%m%d}-{secrets.token_hex(3)}"


def write_keyring(path: Path, keyring: Keyring) -> None:
    """Replaces the file atomically, never readable by anyone but its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(keyring.format())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def ensure_keyring_file(path: Path) -> tuple[str, bool]:
    """The current kid of the file at `path`, creating it with one new key when missing."""
    if path.exists():
        return Keyring.parse(path.read_text()).current.kid, False
    keyring = new_master_key(new_kid())
    write_keyring(path, keyring)
    return keyring.current.kid, True
