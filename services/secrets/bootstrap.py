"""Composition root: the keyring, the keystore, the event store, the outbox and the bus.

Startup refuses, naming the key id, when a stored data key is wrapped under a master key
the keyring does not hold: secrets must never become silently unreadable.
"""

import asyncio

from services.kit.bus import Bus
from services.kit.config import ConfigError, Settings
from services.kit.eventstore import open_store
from services.kit.history import serve_stored_events
from services.kit.host import Component, add_ping
from services.kit.outbox import OutboxRelay
from services.kit.rpc import CommandServer
from services.secrets.adapters.commands import routes
from services.secrets.adapters.keyfile import load_keyring
from services.secrets.adapters.keystore import PostgresKeyReader, PostgresKeystore
from services.secrets.adapters.outbox import translate
from services.secrets.adapters.reveal_log import RevealLog
from services.secrets.adapters.usage import PostgresUsage
from services.secrets.application import Secrets
from services.secrets.crypto import Keyring

SCHEMA = "secrets"


def check_keys(keyring: Keyring, usage: dict[str, int]) -> None:
    missing = {kid: n for kid, n in usage.items() if kid not in keyring}
    if missing:
        listed = ", ".join(f"`{kid}` ({n} data keys)" for kid, n in sorted(missing.items()))
        raise ConfigError(
            f"stored data keys are wrapped under master keys this keyring lacks: {listed}. "
            f"Add them back to GATEHOUSE_MASTER_KEYS (the keyring holds {', '.join(keyring.kids)}); "
            "once every key is rewrapped (`gatehouse secrets rewrap`) a key can be retired"
        )


async def build(bus: Bus, settings: Settings) -> list[Component]:
    keyring = load_keyring(settings)
    keystore = PostgresKeystore(settings.require_database(), SCHEMA)
    usage = PostgresUsage(settings.require_database(), SCHEMA)
    try:
        await asyncio.to_thread(keystore.open)
        await asyncio.to_thread(usage.open)
        check_keys(keyring, await asyncio.to_thread(keystore.usage))
        app = await asyncio.to_thread(
            open_store,
            settings,
            SCHEMA,
            lambda env: Secrets(
                keyring, keystore, usage, env=env, reload_keyring=lambda: load_keyring(settings)
            ),
        )
    except BaseException:
        keystore.close()
        usage.close()
        raise
    relay = OutboxRelay("secrets", app, bus, translate)
    app.on_saved = relay.nudge
    reveals = RevealLog(app)
    reader = PostgresKeyReader(settings.require_database(), SCHEMA)
    server = CommandServer(bus, "secrets")
    add_ping(server, settings)
    serve_stored_events(server, relay)  # for replays after the stream's retention
    routes(server, app, reveals, reader)
    return [keystore, usage, reader, relay, reveals, server]
