"""Runs one service as a process: logs, tracing, bus, its components, and a clean stop."""

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from contracts.commands.common import Ping, Pong
from services.kit.bus import Bus, connect, ensure_stream
from services.kit.config import ConfigError, Settings, load_settings
from services.kit.eventstore import database_alive
from services.kit.logs import configure_logging
from services.kit.rpc import CommandServer
from services.kit.telemetry import configure_tracing

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


Build = Callable[[Bus, Settings], Awaitable[list[Component]]]


def add_ping(server: CommandServer, settings: Settings) -> None:
    """Every service answers `cmd.<service>.ping` with its database health (for /ready)."""

    async def ping(_: Ping) -> Pong:
        url = settings.database_url
        healthy = await asyncio.to_thread(database_alive, url) if url else True
        return Pong(service=server.service, database=healthy, instance=settings.instance)

    server.route("ping", Ping, ping)


async def serve(service: str, build: Build, settings: Settings | None = None) -> None:
    settings = settings or load_settings()
    configure_logging(service, settings.log_level)
    configure_tracing(service, settings.trace_export)
    bus = await connect(settings, service)
    await ensure_stream(bus, settings)
    components = await build(bus, settings)
    for component in components:
        await component.start()
    log.info("%s service ready", service)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s service stopping", service)
    for component in reversed(components):
        with contextlib.suppress(Exception):
            await component.stop()
    await bus.close()


def run(service: str, build: Build) -> None:
    """Entry point of `python -m services.<name>` and `gatehouse service <name>`."""
    try:
        import uvloop

        runner: Callable[..., object] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(service, build))
    except ConfigError as err:
        print(f"gatehouse {service}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass
