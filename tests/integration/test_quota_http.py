"""`GET /v1/quota` through the real gateway app, and the 429 an exhausted quota becomes."""

from typing import Any

import httpx
import pytest
from litestar import Litestar, get

from contracts.commands import quota as q
from contracts.commands.common import CommandMeta, Problem
from contracts.commands.identity import CreateUser, SetTier, UserCreated, UserView
from services.gateway.adapters.http.problems import HANDLERS, quota_exceeded
from services.gateway.bootstrap import assemble
from services.identity.bootstrap import build as build_identity
from services.kit.config import Settings
from services.kit.rpc import CommandClient, CommandFailed
from services.quota.bootstrap import build as build_quota
from tests.helpers import OPERATOR, eventually, running, wait_ready

pytestmark = pytest.mark.integration


def op() -> CommandMeta:
    """A fresh meta per command (a client may stamp its deadline on the one it sends)."""
    return CommandMeta(actor=OPERATOR.actor, correlation_id="test")


SENTENCE = "Monthly quota exceeded (50 calls). Upgrade to Pro for 500 calls/month."


async def test_get_quota_reports_tier_period_usage_and_limits(settings: Settings) -> None:
    async with running(build_identity, settings, "identity") as bus, running(build_quota, settings, "quota"):
        client = CommandClient(bus)
        await wait_ready(bus, "quota")
        user = await client.call(
            "identity", "create_user", CreateUser(meta=op(), email="me@example.test"), UserCreated
        )
        for i in range(3):
            ask = q.Reserve(meta=op(), user_id=user.user_id, org_id=user.org_id, kind="call", key=f"r{i}")
            assert (await client.call("quota", "reserve", ask, q.Reservation)).granted
        app, feed = await assemble(settings, bus)
        await feed.ready.wait()
        headers = {"Authorization": f"Bearer {user.api_key}"}
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://gatehouse") as http:

            async def known() -> bool:
                return (await http.get("/v1/quota", headers=headers)).status_code == 200

            await eventually(known)
            body = (await http.get("/v1/quota", headers=headers)).json()
            assert body["tier"] == "free"
            assert body["period_start"].endswith("T00:00:00Z") and body["period_start"][8:10] == "01"
            assert (body["calls_used"], body["calls_limit"]) == (3, 50)
            assert (body["concurrent_builds_used"], body["concurrent_builds_limit"]) == (0, 1)
            assert (body["servers_used"], body["servers_limit"]) == (0, 1)
            await client.call(
                "identity",
                "set_tier",
                SetTier(meta=op(), org_id=user.org_id, user_id=user.user_id, tier="enterprise"),
                UserView,
            )

            async def upgraded() -> dict[str, Any] | None:
                got = (await http.get("/v1/quota", headers=headers)).json()
                return got if got["tier"] == "enterprise" else None

            after = await eventually(upgraded)
            assert after["calls_limit"] is None and after["servers_limit"] is None  # unlimited
            assert after["concurrent_builds_limit"] == 50
            assert (await http.get("/v1/quota")).status_code == 401
        await feed.stop()


async def test_a_quota_refusal_becomes_429_with_retry_after_and_the_sentence() -> None:
    @get("/refused")
    async def refused() -> None:
        raise CommandFailed(
            Problem(
                status=429, title="Quota exceeded", detail=SENTENCE, code="quota_exceeded", retry_after_s=3600
            )
        )

    @get("/direct")
    async def direct() -> Any:
        return quota_exceeded(SENTENCE, 120)

    app = Litestar([refused, direct], exception_handlers=HANDLERS)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://gatehouse") as http:
        for path, after in (("/refused", "3600"), ("/direct", "120")):
            response = await http.get(path)
            assert response.status_code == 429
            assert response.headers["retry-after"] == after
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["detail"] == SENTENCE
            assert response.json()["code"] == "quota_exceeded"
