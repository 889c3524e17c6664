"""Composition root: the build store, its outbox and followers, the ports, the reaper, commands."""

import asyncio

from services.dispatcher.adapters.commands import routes
from services.dispatcher.adapters.index import ActiveIndex
from services.dispatcher.adapters.jetstream import JetStreamQueue, KvHeartbeats, NatsLive, StreamLogs
from services.dispatcher.adapters.outbox import translate
from services.dispatcher.adapters.reaper import Reaper
from services.dispatcher.adapters.services import QuotaSlots, RunnerNodes, SecretsKeys, SlotKeeper
from services.dispatcher.application import BuildBook, Builds
from services.dispatcher.config import load_dispatcher_settings
from services.kit.buildbus import ensure_build_streams, heartbeat_bucket
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.eventstore import open_store
from services.kit.history import serve_stored_events
from services.kit.host import Component, add_ping
from services.kit.outbox import OutboxRelay
from services.kit.rpc import CommandClient, CommandServer

SCHEMA = "dispatcher"


async def build(bus: Bus, settings: Settings) -> list[Component]:
    config = load_dispatcher_settings()
    book = await asyncio.to_thread(open_store, settings, SCHEMA, BuildBook)
    await ensure_build_streams(bus, config.log_retention_s)
    kv = await heartbeat_bucket(bus, config.heartbeat_ttl_s)
    client = CommandClient(bus)
    slots = QuotaSlots(client)
    relay = OutboxRelay(SCHEMA, book, bus, translate)
    index = ActiveIndex(book, bus)
    keeper = SlotKeeper(slots, book, bus)

    def saved() -> None:
        relay.nudge()
        index.nudge()
        keeper.nudge()

    book.on_saved = saved
    builds = Builds(
        book,
        keys=SecretsKeys(client),
        slots=slots,
        queue=JetStreamQueue(bus),
        live=NatsLive(bus),
        nodes=RunnerNodes(client),
        index=index,
        logs=StreamLogs(bus),
        heartbeats=KvHeartbeats(kv),
    )
    reaper = Reaper(builds, bus, config.reap_grace_s, config.queue_timeout_s, config.reap_interval_s)
    server = CommandServer(bus, SCHEMA)
    add_ping(server, settings)
    serve_stored_events(server, relay)  # for replays after the stream's retention
    routes(server, builds)
    return [relay, index, keeper, reaper, server]
