"""The server limit end to end on real NATS and PostgreSQL: gateway -> mcp_proxy -> quota.

identity, quota, mcp_proxy (GATEHOUSE_MCP_QUOTA=on) and the gateway app all run in the
test's event loop; the gateway is driven in-process over ASGI. A free user may register
one server of their own; org servers (admins', for everyone) count against no one.
"""

import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from contracts.commands import quota as q
from contracts.commands.common import CommandMeta
from contracts.commands.identity import CreateUser, SetTier, UserCreated, UserView
from contracts.events import decode_payload
from contracts.events import quota as ev
from services.gateway.bootstrap import assemble
from services.identity.bootstrap import build as build_identity
from services.kit.config import Settings
from services.kit.rpc import CommandClient
from services.mcp_proxy.bootstrap import build as build_mcp_proxy
from services.quota.bootstrap import build as build_quota
from tests.helpers import OPERATOR, eventually, running, stream_envelopes, wait_ready

pytestmark = pytest.mark.integration

SENTENCE = "Server limit reached (1 server). Upgrade to Pro for 10 servers."


def op() -> CommandMeta:
    return CommandMeta(actor=OPERATOR.actor, correlation_id="test")


def server(name: str, scope: str = "user") -> dict[str, Any]:
    return {"name": name, "transport": "stdio", "command": sys.executable, "args": ["-V"], "scope": scope}


class Platform:
    def __init__(self, http: httpx.AsyncClient, client: CommandClient) -> None:
        self.http, self.client = http, client

    async def user(self, email: str, is_admin: bool = False) -> UserCreated:
        request = CreateUser(meta=op(), email=email, org="alpha", is_admin=is_admin)
        return await self.client.call("identity", "create_user", request, UserCreated)

    async def register(self, who: UserCreated, name: str, scope: str = "user") -> httpx.Response:
        return await self.http.post("/v1/mcp/servers", json=server(name, scope), headers=bearer(who))

    async def remove(self, who: UserCreated, name: str, scope: str | None = None) -> httpx.Response:
        params = {"scope": scope} if scope else {}
        return await self.http.delete(f"/v1/mcp/servers/{name}", params=params, headers=bearer(who))

    async def servers(self, who: UserCreated) -> tuple[int, int | None]:
        body = (await self.http.get("/v1/quota", headers=bearer(who))).json()
        return body["servers_used"], body["servers_limit"]


def bearer(who: UserCreated) -> dict[str, str]:
    return {"Authorization": f"Bearer {who.api_key}"}


@pytest.fixture
async def platform(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Platform]:
    monkeypatch.setenv("GATEHOUSE_MCP_QUOTA", "on")
    async with (
        running(build_identity, settings, "identity") as bus,
        running(build_quota, settings, "quota"),
        running(build_mcp_proxy, settings, "mcp_proxy"),
    ):
        await wait_ready(bus, "quota")
        app, feed = await assemble(settings, bus)
        await feed.ready.wait()
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://gatehouse.test") as http:
            yield Platform(http, CommandClient(bus))
        await feed.stop()


async def test_the_server_limit_counts_each_name_once_and_frees_on_removal(platform: Platform) -> None:
    ann, admin = await platform.user("ann@alpha.test"), await platform.user("admin@alpha.test", True)

    async def known() -> bool:
        answers = [await platform.http.get("/v1/quota", headers=bearer(u)) for u in (ann, admin)]
        return all(a.status_code == 200 for a in answers)

    await eventually(known, timeout=30)
    assert await platform.servers(ann) == (0, 1)

    assert (await platform.register(ann, "github")).status_code == 201  # up to the limit
    refused = await platform.register(ann, "jira")
    assert refused.status_code == 429, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.headers["retry-after"] == "60"
    assert refused.json()["detail"] == SENTENCE and refused.json()["code"] == "quota_exceeded"
    again = await platform.register(ann, "github")  # the same name: a 409, not a second unit
    assert again.status_code == 409, again.text
    assert await platform.servers(ann) == (1, 1)
    names = [s["name"] for s in (await platform.http.get("/v1/mcp/servers", headers=bearer(ann))).json()]
    assert "jira" not in names

    # Org servers are the admins' and count against no one; the admin's own server does.
    assert (await platform.register(admin, "wiki", scope="org")).status_code == 201
    assert (await platform.register(admin, "wiki-2", scope="org")).status_code == 201
    assert (await platform.register(admin, "mine")).status_code == 201
    assert await platform.servers(admin) == (1, 1) and await platform.servers(ann) == (1, 1)

    assert (await platform.remove(ann, "github")).status_code == 204  # frees the slot at once
    assert await platform.servers(ann) == (0, 1)
    assert (await platform.register(ann, "jira")).status_code == 201
    assert (await platform.remove(ann, "nope")).status_code == 404
    assert await platform.servers(ann) == (1, 1)

    # An upgrade lifts the limit at once (the quota service asks identity before refusing).
    set_tier = SetTier(meta=op(), org_id=ann.org_id, user_id=ann.user_id, tier="pro")
    await platform.client.call("identity", "set_tier", set_tier, UserView)
    assert (await platform.register(ann, "notes")).status_code == 201
    assert await platform.servers(ann) == (2, 10)

    # The balances rebuilt from the stream and from the store equal the live ones.
    report = await platform.client.call(
        "quota", "verify", q.Verify(meta=op()), q.QuotaRebuildReport, timeout=120
    )
    assert report.differences == [] and report.live.digest == report.rebuilt.digest
    rebuilt = await platform.client.call("quota", "rebuild", q.Rebuild(meta=op()), q.QuotaRebuildReport, 120)
    assert rebuilt.live.digest == rebuilt.rebuilt.digest and rebuilt.live.open == 3  # jira, notes, mine


async def test_server_holdings_are_events_on_the_stream(platform: Platform) -> None:
    bea = await platform.user("bea@alpha.test")

    async def known() -> bool:
        return (await platform.http.get("/v1/quota", headers=bearer(bea))).status_code == 200

    await eventually(known, timeout=30)
    assert (await platform.register(bea, "notes")).status_code == 201
    assert (await platform.remove(bea, "notes")).status_code == 204
    bus = platform.client.bus

    async def facts() -> list[tuple[str, Any]] | None:
        found = [
            (e.type, decode_payload(e))
            for e in await stream_envelopes(bus, "events.quota.>")
            if e.type in ("quota.reserved", "quota.committed", "quota.released")
        ]
        return found if len(found) == 3 else None

    reserved, committed, released = await eventually(facts, timeout=30)
    assert isinstance(reserved[1], ev.Reserved) and reserved[1].kind == "server"
    assert reserved[1].key == "server:user:notes" and reserved[1].user_id == bea.user_id
    assert isinstance(committed[1], ev.Committed) and committed[1].kind == "server"
    assert isinstance(released[1], ev.Released)
    assert released[1].reason == "removed" and released[1].was_committed
