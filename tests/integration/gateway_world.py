"""A gateway app in the test's event loop, in front of real identity and audit services,
with two orgs' users: the setting of the gateway's HTTP tests (Litestar through httpx's ASGI
transport, real NATS JetStream and PostgreSQL behind it)."""

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
from litestar import Litestar

from contracts.commands.identity import CreateUser, UserCreated
from services.audit.bootstrap import build as audit_build
from services.gateway.bootstrap import assemble
from services.identity.bootstrap import build as identity_build
from services.kit.bus import Bus, connect, ensure_stream
from services.kit.config import Settings
from services.kit.host import Build
from services.kit.rpc import CommandClient
from tests.helpers import OPERATOR, eventually, running


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class TwoOrgs:
    app: Litestar
    http: httpx.AsyncClient  # requests come from `ip`
    identity_bus: Bus
    identity: CommandClient
    admin: UserCreated  # admin of org "alpha"
    ann: UserCreated  # plain user of "alpha"
    bea: UserCreated  # plain user of "alpha"
    other_admin: UserCreated  # admin of org "beta"


@asynccontextmanager
async def two_orgs_gateway(
    settings: Settings, ip: str, also: Sequence[tuple[Build, str]] = ()
) -> AsyncIterator[TwoOrgs]:
    """Yields once the gateway's view of identity knows every user's key; `also` runs more
    services (build, name) beside identity and audit."""
    async with AsyncExitStack() as services:
        identity_bus = await services.enter_async_context(running(identity_build, settings, "identity"))
        await services.enter_async_context(running(audit_build, settings, "audit"))
        for build, name in also:
            await services.enter_async_context(running(build, settings, name))
        bus = await connect(settings, "gateway")
        await ensure_stream(bus, settings)
        app, feed = await assemble(settings, bus)
        try:
            client = CommandClient(identity_bus)

            async def create(email: str, org: str, is_admin: bool = False) -> UserCreated:
                request = CreateUser(meta=OPERATOR, email=email, org=org, is_admin=is_admin)
                return await client.call("identity", "create_user", request, UserCreated)

            admin = await create("admin@alpha.test", "alpha", is_admin=True)
            ann = await create("ann@alpha.test", "alpha")
            bea = await create("bea@alpha.test", "alpha")
            other_admin = await create("admin@beta.test", "beta", is_admin=True)
            transport = httpx.ASGITransport(app=app, client=(ip, 4711))
            async with httpx.AsyncClient(transport=transport, base_url="http://gatehouse.test") as http:

                async def everyone_known() -> bool:
                    for user in (admin, ann, bea, other_admin):
                        if (await http.get("/v1/me", headers=bearer(user.api_key))).status_code != 200:
                            return False
                    return True

                await eventually(everyone_known, timeout=30)
                yield TwoOrgs(app, http, identity_bus, client, admin, ann, bea, other_admin)
        finally:
            await app.state.auth_failures.stop()
            await feed.stop()
            await bus.close()
