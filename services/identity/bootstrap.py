"""Composition root: wires identity's application to its store, the outbox and the bus."""

from services.identity.adapters.commands import routes
from services.identity.adapters.outbox import translate
from services.identity.application import Identity
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.eventstore import open_store
from services.kit.history import serve_stored_events
from services.kit.host import Component, add_ping
from services.kit.outbox import OutboxRelay
from services.kit.rpc import CommandServer


async def build(bus: Bus, settings: Settings) -> list[Component]:
    pepper = settings.require_pepper()
    app = open_store(settings, "identity", lambda env: Identity(pepper=pepper, env=env))
    relay = OutboxRelay("identity", app, bus, translate)
    app.on_saved = relay.nudge
    server = CommandServer(bus, "identity")
    add_ping(server, settings)
    serve_stored_events(server, relay)  # for replays after the stream's retention
    routes(server, app)
    return [relay, server]
