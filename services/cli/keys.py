"""`gatehouse keys rotate|retire|list` and `gatehouse secrets rewrap`: master-key operations.

The keyring file (`GATEHOUSE_MASTER_KEYS_FILE`, else `<data dir>/keys/master-keys`) is
edited here; the secrets service is then asked to re-read it. A key is retired only when
the service reports that nothing is wrapped under it any more.
"""

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

from contracts.commands import secrets as cmd
from services.cli.operator import _meta, _with_bus
from services.kit.bus import Bus
from services.kit.config import ConfigError, Settings, load_settings
from services.kit.rpc import CommandClient, CommandFailed
from services.secrets.adapters.keyfile import default_keyring_file, new_kid, write_keyring
from services.secrets.crypto import Keyring, KeyringError

SettingsLoader = Callable[[], Settings]


def keyring_path(settings: Settings) -> Path:
    if settings.master_keys:
        raise ConfigError(
            "the master keys come from GATEHOUSE_MASTER_KEYS: add a new `kid:base64key` (32 random "
            "bytes) at its front and restart the secrets service; `gatehouse keys` edits a keyring file"
        )
    return settings.master_keys_file or default_keyring_file(settings.data_dir)


def _read(path: Path) -> Keyring:
    try:
        return Keyring.parse(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no master keyring at {path} (`gatehouse up` creates one)") from None
    except KeyringError as err:
        raise ConfigError(f"{path}: {err}") from None


def _status(load: SettingsLoader, reload: bool) -> cmd.KeyReport:
    async def work(bus: Bus) -> cmd.KeyReport:
        request = cmd.KeyStatus(meta=_meta(), reload=reload)
        return await CommandClient(bus).call("secrets", "key_status", request, cmd.KeyReport, timeout=30)

    return asyncio.run(_with_bus(load(), work))


def _try_status(load: SettingsLoader) -> cmd.KeyReport | None:
    try:
        return _status(load, reload=True)
    except (ConfigError, CommandFailed, OSError, TimeoutError):
        return None


def rotate(load: SettingsLoader) -> int:
    path = keyring_path(load_settings())
    ring = _read(path).with_new_key(new_kid())
    write_keyring(path, ring)
    print(f"Added master key {ring.current.kid} and made it current ({path}: {len(ring.kids)} keys).")
    report = _try_status(load)
    if report is None:
        print("No secrets service answered: restart it (every instance) so that it uses the new key.")
    elif report.current_key_id != ring.current.kid:
        print(f"The secrets service still wraps under {report.current_key_id}: restart it.", file=sys.stderr)
        return 1
    else:
        print(f"The secrets service now wraps new data keys under {ring.current.kid}.")
    print("Next: `gatehouse secrets rewrap`, then `gatehouse keys retire <old kid>`.")
    return 0


def retire(load: SettingsLoader, kid: str) -> int:
    path = keyring_path(load_settings())
    ring = _read(path)
    if kid not in ring:
        print(f"gatehouse: no master key {kid} in {path} (it holds {', '.join(ring.kids)})", file=sys.stderr)
        return 1
    if ring.current.kid == kid:
        print(f"gatehouse: {kid} is the current master key; rotate first", file=sys.stderr)
        return 1
    report = _status(load, reload=True)  # the check needs the service: no answer, no retirement
    usage = next((k for k in report.keys if k.key_id == kid), None)
    if usage is not None and usage.data_keys:
        print(f"Master key {kid} still wraps {usage.data_keys} data keys, for example:", file=sys.stderr)
        for what in usage.secrets:
            print(f"  {what}", file=sys.stderr)
        print("Run `gatehouse secrets rewrap` first; nothing was changed.", file=sys.stderr)
        return 1
    kept = ring.without(kid)
    write_keyring(path, kept)
    _try_status(load)
    print(f"Retired master key {kid}: nothing is wrapped under it. {path} holds {', '.join(kept.kids)}.")
    return 0


def list_keys(load: SettingsLoader) -> int:
    report = _status(load, reload=False)
    for k in report.keys:
        flags = ", ".join(f for f, on in (("current", k.current), ("NOT HELD", not k.known)) if on)
        print(f"{k.key_id}\t{k.data_keys} data keys" + (f"\t({flags})" if flags else ""))
    missing = [k for k in report.keys if not k.known]
    for k in missing:
        print(f"master key {k.key_id} is not held but still wraps {k.data_keys} data keys:", file=sys.stderr)
        for what in k.secrets:
            print(f"  {what}", file=sys.stderr)
    return 1 if missing else 0


def rewrap(load: SettingsLoader) -> int:
    async def work(bus: Bus) -> cmd.RewrapReport:
        client = CommandClient(bus)
        await client.call("secrets", "key_status", cmd.KeyStatus(meta=_meta(), reload=True), cmd.KeyReport)
        return await client.call(
            "secrets", "rewrap", cmd.Rewrap(meta=_meta()), cmd.RewrapReport, timeout=3600
        )

    report = asyncio.run(_with_bus(load(), work))
    moved = ", ".join(f"{kid}: {n}" for kid, n in sorted(report.from_key_ids.items())) or "none"
    print(
        f"Rewrapped {report.rewrapped} data keys under {report.key_id} in {report.seconds:.2f}s "
        f"({report.already_current} already were; moved from {moved}). No secret value was decrypted."
    )
    if report.unreadable:
        held = ", ".join(f"{kid} ({n})" for kid, n in sorted(report.unreadable.items()))
        print(
            f"gatehouse: data keys wrapped under master keys the service does not hold were left as they "
            f"are: {held}. Restore those keys to the keyring and run the rewrap again.",
            file=sys.stderr,
        )
        return 1
    return 0
