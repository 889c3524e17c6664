"""Composition root: mcp_proxy's store, pools, caches, projection and commands."""

import asyncio
import hashlib
import hmac
from collections.abc import Callable

from contracts.subjects import event_subject
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.eventstore import open_store
from services.kit.history import serve_stored_events
from services.kit.host import Component, add_ping
from services.kit.outbox import Fed, OutboxRelay
from services.kit.projection import LIVE_LINGER_S, ProjectionConsumer
from services.kit.rpc import CommandClient, CommandServer
from services.mcp_proxy.adapters.commands import CancelListener, routes
from services.mcp_proxy.adapters.fact_writer import FactWriter
from services.mcp_proxy.adapters.feeds import Feeds
from services.mcp_proxy.adapters.notices import BusNotices
from services.mcp_proxy.adapters.outbox import translate
from services.mcp_proxy.adapters.quota import QuotaService
from services.mcp_proxy.adapters.remote import RemotePool
from services.mcp_proxy.adapters.secrets import RevealingSecrets
from services.mcp_proxy.adapters.server_quota import ServerQuota
from services.mcp_proxy.adapters.stdio.pool import StdioPool
from services.mcp_proxy.adapters.tables import ProxyTables
from services.mcp_proxy.adapters.tool_changes import ToolChanges
from services.mcp_proxy.adapters.upstreams import UpstreamRouter
from services.mcp_proxy.application.calls import Calls
from services.mcp_proxy.application.history import CallHistory
from services.mcp_proxy.application.ports import AllowAll, QuotaGate
from services.mcp_proxy.application.recorder import Recorder
from services.mcp_proxy.application.registry import Registry
from services.mcp_proxy.application.requests import Forwarding
from services.mcp_proxy.application.servers import Servers
from services.mcp_proxy.application.store import ProxyStore
from services.mcp_proxy.config import load_proxy_settings

SCHEMA = "mcp_proxy"


class PromptStop:
    """Stops a kit component (outbox relay, projection) even when its task swallows the cancel.

    On Python 3.11, `asyncio.wait_for` (used by the relay while it waits for a nudge, and by
    nats-py while a projection fetches) can swallow a cancellation that coincides with the
    awaited thing completing: the task keeps running and `stop()` waits forever. With call
    events saved and published right up to shutdown this happened here; the component's
    task is cancelled again until it ends. (A fix in the kit would use `asyncio.timeout`.)
    """

    def __init__(self, inner: Component, quiet: Callable[[], None] = lambda: None) -> None:
        self.inner, self._quiet = inner, quiet

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        self._quiet()
        await asyncio.sleep(0.05)  # let a nudge already scheduled land before the cancel
        stopping = asyncio.ensure_future(self.inner.stop())
        for _ in range(50):
            done, _ = await asyncio.wait({stopping}, timeout=0.2)
            if done:
                stopping.result()
                return
            task = getattr(self.inner, "_task", None)
            if task is not None and not task.done():
                task.cancel()
        stopping.cancel()


def fed_to(outbox: OutboxRelay) -> Callable[[list[Fed]], None]:
    """The call facts the recorder saved go to the relay as they are, published at once."""

    def feed(rows: list[Fed]) -> None:
        outbox.feed(rows)
        outbox.wake()

    return feed


def cursor_key(settings: Settings) -> bytes:
    """Shared by every instance so any of them continues a page another one started."""
    label = b"gatehouse mcp history cursor v1"
    if settings.key_pepper:
        return hmac.new(settings.key_pepper, label, hashlib.sha256).digest()
    return hashlib.sha256(label).digest()


async def build(bus: Bus, settings: Settings, quota: QuotaGate | None = None) -> list[Component]:
    proxy = load_proxy_settings(settings.data_dir)
    url = settings.require_database()
    tables = ProxyTables(url, SCHEMA)  # started first: it creates the schema's read tables
    store = open_store(settings, SCHEMA, lambda env: ProxyStore(env=env))
    outbox = OutboxRelay(SCHEMA, store, bus, translate)
    store.on_saved = outbox.nudge
    facts = FactWriter(store, url, on_rows=fed_to(outbox))

    def quiet() -> None:
        store.on_saved = lambda: None
        facts.on_rows = lambda _: None

    relay = PromptStop(outbox, quiet=quiet)
    recorder = Recorder(facts.write, proxy.record_batch, proxy.record_interval_ms / 1000)
    changes = ToolChanges(bus)  # an upstream's own tools/list_changed, told to the gateway
    upstreams = UpstreamRouter(
        StdioPool(proxy, settings.instance, recorder.process, changes.changed),
        RemotePool(proxy, changes.changed),
    )
    slots = ServerQuota(CommandClient(bus)) if proxy.quota else None  # the server limit (docs/quota.md)
    registry = Registry(store, proxy.spec_policy(), proxy.registry_ttl_s, upstreams, slots=slots)
    secrets = RevealingSecrets(CommandClient(bus), proxy.secret_ttl_s)
    usage: list[Component] = []
    if quota is None and proxy.quota:
        quota = QuotaService(CommandClient(bus))
        usage.append(quota)  # its sender charges unmetered calls; stopped after the upstreams
    elif quota is None:
        quota = AllowAll()
    calls = Calls(registry, secrets, upstreams, quota, recorder, tables, proxy, notices=BusNotices(bus))
    projection = ProjectionConsumer(
        bus=bus,
        database_url=url,
        schema=SCHEMA,
        name="mcp_history",
        filter_subject=event_subject("mcp_proxy.tool_call_completed"),
        apply_batch=tables.apply_batch,
        linger_s=LIVE_LINGER_S,
    )
    history = CallHistory(tables, projection, cursor_key(settings))
    server = CommandServer(bus, SCHEMA, max_in_flight=proxy.max_in_flight)
    add_ping(server, settings)
    serve_stored_events(server, outbox)  # for replays after the stream's retention
    routes(server, Servers(registry, calls), calls, Forwarding(calls, recorder), history)
    # Stopped in reverse: no new commands first, then processes (their stop events are
    # recorded), then the recorder's last flush, then the relay.
    return [
        tables,
        relay,
        facts,
        recorder,
        changes,
        *usage,
        upstreams,
        PromptStop(projection),
        Feeds(bus, registry, secrets),
        server,
        CancelListener(bus, calls),
    ]
