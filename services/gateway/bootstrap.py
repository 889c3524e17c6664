"""Composition root of the gateway: bus, identity view, Litestar app, uvicorn."""

import logging
import socket
import sys

import uvicorn
from litestar import Litestar

from services.gateway.adapters.http.app import create_app
from services.gateway.adapters.http.corked import CorkedHttpToolsProtocol
from services.gateway.adapters.identity_feed import IdentityFeed
from services.gateway.application import Gateway
from services.gateway.domain import AccessView
from services.kit.bus import Bus, connect, ensure_stream
from services.kit.config import ConfigError, Settings, load_settings
from services.kit.logs import configure_logging
from services.kit.telemetry import configure_tracing

log = logging.getLogger(__name__)


async def assemble(settings: Settings, bus: Bus) -> tuple[Litestar, IdentityFeed]:
    view = AccessView()
    feed = IdentityFeed(bus, view)
    await feed.start()
    gateway = Gateway(settings, bus, view, feed.ready)
    return create_app(gateway, feed, settings.max_body_bytes), feed


class GatewayServer(uvicorn.Server):
    """uvicorn, which at shutdown waits for every open response: the MCP event streams (which
    would stay open forever) are ended first."""

    def __init__(self, config: uvicorn.Config, app: Litestar) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.app.state.mcp.stop()
        await super().shutdown(sockets)


def server_config(app: Litestar, host: str, port: int) -> uvicorn.Config:
    """uvicorn as the gateway runs it (tests serve the app with the same)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=CorkedHttpToolsProtocol,  # one send per response (corked.py)
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
    )


async def serve(settings: Settings) -> None:
    configure_logging("gateway", settings.log_level)
    configure_tracing("gateway", settings.trace_export)
    settings.require_pepper()
    bus = await connect(settings, "gateway")
    await ensure_stream(bus, settings)
    app, feed = await assemble(settings, bus)
    config = server_config(app, settings.http_host, settings.http_port)
    log.info("gateway listening on http://%s:%d", settings.http_host, settings.http_port)
    try:
        await GatewayServer(config, app).serve()
    finally:
        await app.state.auth_failures.stop()
        await feed.stop()
        await bus.close()


def main() -> None:
    try:
        import uvloop

        uvloop.run(serve(load_settings()))
    except ConfigError as err:
        print(f"gatehouse gateway: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass
