"""A platform for the MCP gateway tests: real NATS and PostgreSQL, identity in-process, the
fake_mcp_proxy responder, and two gateway replicas (two assembled apps on the same NATS),
each reachable in-process (httpx ASGI transport) and over real HTTP (uvicorn in this loop).
"""

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from litestar import Litestar
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from contracts.commands import mcp as cmd
from contracts.commands.common import CommandMeta
from contracts.commands.identity import CreateUser, UserCreated
from contracts.commands.mcp import Caller
from contracts.envelope import Actor
from services.gateway.bootstrap import GatewayServer, assemble, server_config
from services.identity.bootstrap import build as identity_build
from services.kit.bus import Bus, connect, ensure_stream
from services.kit.config import Settings, load_settings
from services.kit.embedded import EmbeddedNats
from services.kit.host import Build
from services.kit.rpc import CommandClient
from services.mcp_proxy.bootstrap import build as proxy_build
from tests.helpers import OPERATOR, eventually, running
from tests.integration.fake_mcp_proxy import FakeMcpProxy

MODERN = "2026-07-28"
META = CommandMeta(actor=Actor(kind="operator", id="test"), correlation_id="test")


@dataclass
class World:
    apps: list[Litestar]
    http: list[httpx.AsyncClient]  # in-process, one per replica
    urls: list[str]  # real HTTP, one per replica
    proxy: FakeMcpProxy
    client: CommandClient
    settings: Settings
    ann: UserCreated  # alpha; servers github, jira
    bea: UserCreated  # alpha; server notes
    admin: UserCreated  # alpha admin; org server wiki
    users: dict[str, Caller]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def platform_settings(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: str, **extra_env: str
) -> Iterator[Settings]:
    """A NATS server and a database of their own, and settings pointing at them."""
    nats_server = EmbeddedNats(tmp_path_factory.mktemp("mcp-nats")).start()
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(postgres_server)
    params["dbname"] = name
    try:
        yield load_settings(
            {
                "GATEHOUSE_NATS_URL": nats_server.url,
                "GATEHOUSE_DATABASE_URL": make_conninfo(**params),
                "GATEHOUSE_KEY_PEPPER": base64.b64encode(uuid.uuid4().bytes * 2).decode(),
                "GATEHOUSE_DATA_DIR": str(tmp_path_factory.mktemp("mcp-data")),
                "GATEHOUSE_LOG_LEVEL": "INFO",
                **extra_env,
            }
        )
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        nats_server.stop()


@asynccontextmanager
async def served(app: Litestar) -> AsyncIterator[str]:
    """The app over real HTTP (uvicorn with corked httptools, as in production) in this event loop."""
    server = GatewayServer(server_config(app, "127.0.0.1", 0), app)  # ends the MCP event streams at shutdown
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    await eventually(lambda: asyncio.sleep(0, server.started), timeout=10)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def replica(settings: Settings) -> AsyncIterator[tuple[Litestar, Bus]]:
    bus = await connect(settings, "gateway")
    await ensure_stream(bus, settings)
    app, feed = await assemble(settings, bus)
    try:
        yield app, bus
    finally:
        await feed.stop()
        await bus.close()


@dataclass
class RealProxy:
    """identity, the real mcp_proxy (and `also`), gateway replicas served over real HTTP."""

    settings: Settings
    bus: Bus  # identity's connection
    apps: list[Litestar]
    urls: list[str]

    async def user(self, email: str, org: str, is_admin: bool = False) -> UserCreated:
        request = CreateUser(meta=OPERATOR, email=email, org=org, is_admin=is_admin)
        return await CommandClient(self.bus).call("identity", "create_user", request, UserCreated)


@asynccontextmanager
async def real_proxy(
    settings: Settings, replicas: int = 1, also: tuple[tuple[Build, str], ...] = ()
) -> AsyncIterator[RealProxy]:
    async with AsyncExitStack() as stack:
        bus = await stack.enter_async_context(running(identity_build, settings, "identity"))
        for build, name in also:
            await stack.enter_async_context(running(build, settings, name))
        await stack.enter_async_context(running(proxy_build, settings, "mcp_proxy"))
        apps = [(await stack.enter_async_context(replica(settings)))[0] for _ in range(replicas)]
        urls = [await stack.enter_async_context(served(app)) for app in apps]
        yield RealProxy(settings, bus, apps, urls)


async def register(proxy: FakeMcpProxy, who: Caller, name: str, scope: str = "user") -> None:
    spec = cmd.ServerSpec(name=name, transport="stdio", command="true")
    await proxy.register_server(cmd.RegisterServer(meta=META, caller=who, scope=scope, spec=spec))  # type: ignore[arg-type]


@asynccontextmanager
async def mcp_world(settings: Settings) -> AsyncIterator[World]:
    async with (
        running(identity_build, settings, "identity") as bus,
        replica(settings) as (app0, _),
        replica(settings) as (app1, _),
        served(app0) as url0,
        served(app1) as url1,
    ):
        proxy = FakeMcpProxy(bus)
        await proxy.start()
        client = CommandClient(bus)

        async def create(email: str, is_admin: bool = False) -> UserCreated:
            request = CreateUser(meta=OPERATOR, email=email, org="alpha", is_admin=is_admin)
            return await client.call("identity", "create_user", request, UserCreated)

        ann, bea, admin = (
            await create("ann@alpha.test"),
            await create("bea@alpha.test"),
            await create("admin@alpha.test", is_admin=True),
        )
        transports = [httpx.ASGITransport(app=app, client=("203.0.113.7", 5000)) for app in (app0, app1)]
        async with (
            httpx.AsyncClient(transport=transports[0], base_url="http://gatehouse.test") as h0,
            httpx.AsyncClient(transport=transports[1], base_url="http://gatehouse.test") as h1,
        ):

            async def known() -> bool:
                for h in (h0, h1):
                    for user in (ann, bea, admin):
                        if (await h.get("/v1/me", headers=bearer(user.api_key))).status_code != 200:
                            return False
                return True

            await eventually(known, timeout=30)
            me: dict[str, Any] = (await h0.get("/v1/me", headers=bearer(ann.api_key))).json()
            org = me["org_id"]
            users = {
                "ann": Caller(user_id=ann.user_id, org_id=org),
                "bea": Caller(user_id=bea.user_id, org_id=org),
                "admin": Caller(user_id=admin.user_id, org_id=org, is_admin=True),
            }
            await register(proxy, users["ann"], "github")
            await register(proxy, users["ann"], "jira")
            await register(proxy, users["bea"], "notes")
            await register(proxy, users["admin"], "wiki", scope="org")
            try:
                yield World(
                    [app0, app1], [h0, h1], [url0, url1], proxy, client, settings, ann, bea, admin, users
                )
            finally:
                await proxy.stop()
