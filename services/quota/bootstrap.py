"""Composition root: quota's store, group-commit writer, outbox, identity feed, leadership."""

import asyncio
from collections.abc import Callable

from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.eventstore import open_store
from services.kit.history import serve_stored_events
from services.kit.host import Component, add_ping
from services.kit.outbox import OutboxRelay
from services.kit.rpc import CommandServer
from services.quota.adapters.commands import routes
from services.quota.adapters.identity import IdentityFeed, identity_lookup
from services.quota.adapters.leader import Leader
from services.quota.adapters.outbox import translate
from services.quota.adapters.sources import StoreSource, StreamSource
from services.quota.adapters.store import QuotaStore
from services.quota.adapters.writer import GroupWriter
from services.quota.application import Quota, Source
from services.quota.config import load_quota_settings

SCHEMA = "quota"


def coalesced(nudge: Callable[[], None], delay_s: float = 0.02) -> Callable[[], None]:
    """Wakes the outbox relay at most every `delay_s` instead of after every batch.

    Each wake-up costs the relay a publish pass (and, when it was not fed the rows, a store
    read); at one batch per request (light load) that was most of the service's CPU. Events
    reach the stream up to 20 ms later; nothing waits on them synchronously (rebuilds wait
    for the relay anyway).
    """
    pending = False

    def fire() -> None:
        nonlocal pending
        pending = False
        nudge()

    def schedule() -> None:
        nonlocal pending
        if not pending:
            pending = True
            asyncio.get_running_loop().call_later(delay_s, fire)

    return schedule


async def build(bus: Bus, settings: Settings) -> list[Component]:
    quota_settings = load_quota_settings()
    # Read through eventsourcing only (loading, the outbox relay): the group writer inserts
    # with its own connection.
    store = open_store(settings, SCHEMA, lambda env: QuotaStore(env=env))
    relay = OutboxRelay("quota", store, bus, translate)
    writer = GroupWriter(
        store, settings.require_database(), holder="", on_written=coalesced(relay.wake), on_rows=relay.feed
    )
    quota = Quota(quota_settings, writer, identity_lookup(bus))
    feed = IdentityFeed(bus, quota)
    server = CommandServer(bus, "quota", max_in_flight=1024)
    add_ping(server, settings)
    serve_stored_events(server, relay)  # for replays after the stream's retention
    sources: dict[str, Source] = {"stream": StreamSource(bus), "store": StoreSource(store)}
    routes(server, quota, sources)
    reap_every = min(1.0, quota_settings.reservation_timeout.total_seconds() / 4)
    leader = Leader(bus, quota, store, writer, server, feed, reap_every_s=reap_every)
    return [relay, feed, writer, leader]
