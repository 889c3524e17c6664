"""Tool calls charged end to end: gateway -> mcp_proxy -> quota, on real NATS and PostgreSQL.

A limited tier holds a unit before each call; a tier with unlimited calls (enterprise) is
charged after its calls, without a hold (docs/quota.md, "Unmetered calls"). Both end in the
same ledger and the same billing events, and a rebuild equals the live balances.
"""

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest

from contracts.commands import quota as q
from contracts.commands.common import CommandMeta
from contracts.commands.identity import SetTier, UserCreated, UserView
from services.kit.rpc import CommandClient
from services.quota.bootstrap import build as build_quota
from tests.helpers import OPERATOR, eventually, stream_envelopes, wait_ready
from tests.integration.mcp_world import bearer, platform_settings, real_proxy

pytestmark = pytest.mark.integration

ECHO = str(Path(__file__).resolve().parents[1] / "upstreams" / "echo_server.py")
SENTENCE = "Monthly quota exceeded (3 calls). Upgrade to Pro for 500 calls/month."


def op() -> CommandMeta:
    return CommandMeta(actor=OPERATOR.actor, correlation_id="test")


@dataclass
class Stack:
    http: httpx.AsyncClient
    client: CommandClient
    bus: object
    free: UserCreated
    big: UserCreated


@pytest.fixture
async def stack(tmp_path_factory: pytest.TempPathFactory, postgres_server: str) -> AsyncIterator[Stack]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GATEHOUSE_MCP_QUOTA", "on")
        env.setenv("GATEHOUSE_QUOTA_TIERS", '{"free": {"calls": 3}}')
        with platform_settings(tmp_path_factory, postgres_server) as settings:
            async with real_proxy(settings, also=((build_quota, "quota"),)) as platform:
                await wait_ready(platform.bus, "quota")
                client = CommandClient(platform.bus)
                free = await platform.user("free@calls.test", "alpha")
                big = await platform.user("big@calls.test", "alpha")
                await set_tier(client, big, "enterprise")
                transport = httpx.ASGITransport(app=platform.apps[0])  # type: ignore[arg-type]
                async with httpx.AsyncClient(transport=transport, base_url="http://gh", timeout=30) as http:

                    async def ready() -> bool:
                        me = await http.get("/v1/me", headers=bearer(big.api_key))
                        return me.status_code == 200 and me.json()["tier"] == "enterprise"

                    await eventually(ready, timeout=30)
                    echo = {"name": "echo", "transport": "stdio", "command": sys.executable, "args": [ECHO]}
                    for who in (free, big):
                        created = await http.post("/v1/mcp/servers", json=echo, headers=bearer(who.api_key))
                        assert created.status_code == 201, created.text
                    yield Stack(http, client, platform.bus, free, big)


async def set_tier(client: CommandClient, who: UserCreated, tier: str) -> None:
    request = SetTier(meta=op(), org_id=who.org_id, user_id=who.user_id, tier=tier)
    await client.call("identity", "set_tier", request, UserView)


async def execute(stack: Stack, who: UserCreated, text: str) -> httpx.Response:
    body = {"tool_name": "echo", "arguments": {"text": text}}
    return await stack.http.post("/v1/mcp/echo/execute", json=body, headers=bearer(who.api_key))


async def calls_used(stack: Stack, who: UserCreated) -> int:
    view = await stack.http.get("/v1/quota", headers=bearer(who.api_key))
    assert view.status_code == 200, view.text
    used: int = view.json()["calls_used"]
    return used


async def quota_events(stack: Stack, name: str, who: UserCreated) -> list[dict[str, object]]:
    found = await stream_envelopes(stack.bus, f"events.quota.{name}")  # type: ignore[arg-type]
    payloads = [msgspec.json.decode(e.data) for e in found]
    return [p for p in payloads if p["user_id"] == who.user_id and p["kind"] == "call"]


async def test_a_limited_tier_holds_before_each_call_and_is_refused_at_its_limit(stack: Stack) -> None:
    for i in range(3):
        answer = await execute(stack, stack.free, f"call {i}")
        assert answer.status_code == 200 and answer.json()["status"] == "success", answer.text
    refused = await execute(stack, stack.free, "one too many")
    assert refused.status_code == 429, refused.text
    assert refused.json()["detail"] == SENTENCE and int(refused.headers["Retry-After"]) > 0
    assert await calls_used(stack, stack.free) == 3

    async def three_held_then_charged() -> bool:
        held = await quota_events(stack, "reserved", stack.free)
        charged = await quota_events(stack, "usage_recorded", stack.free)
        return len(held) == 3 and len(charged) == 3 and all(c["held"] is not False for c in charged)

    await eventually(three_held_then_charged, timeout=15)


async def test_an_unlimited_tier_is_charged_after_its_calls_without_a_hold(stack: Stack) -> None:
    request_ids = []
    for i in range(6):
        answer = await execute(stack, stack.big, f"call {i}")
        assert answer.status_code == 200 and answer.json()["status"] == "success", answer.text
        request_ids.append(answer.json()["request_id"])
    failed = await stack.http.post(  # refused before the upstream: not charged
        "/v1/mcp/echo/execute", json={"tool_name": "no_such_tool"}, headers=bearer(stack.big.api_key)
    )
    assert failed.json()["status"] == "error", failed.text

    async def all_six_charged() -> bool:
        return await calls_used(stack, stack.big) == 6

    await eventually(all_six_charged, timeout=15)
    held = await quota_events(stack, "reserved", stack.big)
    assert [h["key"] for h in held] == request_ids[:1]  # only the first call asked before running

    async def six_billing_records() -> list[dict[str, object]]:  # the relay publishes ~20 ms later
        found = await quota_events(stack, "usage_recorded", stack.big)
        return found if len(found) >= 6 else []

    charged = await eventually(six_billing_records, timeout=15)
    assert sorted(str(c["key"]) for c in charged) == sorted(request_ids)  # one billing record each
    assert [c["held"] for c in charged if c["key"] != request_ids[0]] == [False] * 5

    # The ledger rebuilt from the stream and from quota's store equals the live one.
    report = await stack.client.call("quota", "verify", q.Verify(meta=op()), q.QuotaRebuildReport, timeout=60)
    assert report.differences == [] and report.live.digest == report.rebuilt.digest
    assert report.live.charged_calls == 6


async def test_usage_recorded_again_is_charged_once_and_unknown_users_are_named(stack: Stack) -> None:
    big = stack.big
    uses = [q.Use(user_id=big.user_id, org_id=big.org_id, key=k) for k in ("u-1", "u-2", "u-2")]
    stranger = q.Use(user_id="no-such-user", org_id=big.org_id, key="u-3")
    first = await stack.client.call(
        "quota", "record_usage", q.RecordUsage(meta=op(), uses=[*uses, stranger]), q.UsageReceipt
    )
    assert (first.recorded, first.unknown_users) == (2, ["no-such-user"])
    again = await stack.client.call(
        "quota", "record_usage", q.RecordUsage(meta=op(), uses=uses), q.UsageReceipt
    )
    assert again.recorded == 0
    assert await calls_used(stack, big) == 2
    held = q.Reserve(meta=op(), user_id=big.user_id, org_id=big.org_id, kind="call", key="u-4")
    reservation = await stack.client.call("quota", "reserve", held, q.Reservation)
    assert reservation.granted and reservation.unmetered_for_s == 30
    used = q.RecordUsage(meta=op(), uses=[q.Use(user_id=big.user_id, org_id=big.org_id, key="u-4")])
    assert (await stack.client.call("quota", "record_usage", used, q.UsageReceipt)).recorded == 1  # committed
    assert await calls_used(stack, big) == 3
    free = stack.free
    for key in ("f-1", "f-2"):
        limited = q.Reserve(meta=op(), user_id=free.user_id, org_id=free.org_id, kind="call", key=key)
        assert (await stack.client.call("quota", "reserve", limited, q.Reservation)).unmetered_for_s is None
    release = q.Release(meta=op(), user_id=free.user_id, key="f-2")
    assert (await stack.client.call("quota", "release", release, q.Settled)).changed
    # Held uses commit like Commit: once, and never a key that is unknown, was released or
    # names something else than a call (the server the user registered).
    held_uses = [
        q.Use(user_id=free.user_id, org_id=free.org_id, key=k, held=True)
        for k in ("f-1", "f-2", "f-9", "server:user:echo")
    ]
    settled = await stack.client.call(
        "quota", "record_usage", q.RecordUsage(meta=op(), uses=held_uses), q.UsageReceipt
    )
    assert settled.recorded == 1
    again = await stack.client.call(
        "quota", "record_usage", q.RecordUsage(meta=op(), uses=held_uses), q.UsageReceipt
    )
    assert again.recorded == 0
    assert await calls_used(stack, free) == 1


async def test_a_downgrade_is_enforced_on_the_next_call(stack: Stack) -> None:
    for i in range(4):
        assert (await execute(stack, stack.big, f"before {i}")).status_code == 200
    await set_tier(stack.client, stack.big, "free")

    async def downgraded() -> bool:  # the gateway and the quota service both know
        me = await stack.http.get("/v1/me", headers=bearer(stack.big.api_key))
        view = await stack.http.get("/v1/quota", headers=bearer(stack.big.api_key))
        return me.json()["tier"] == "free" and view.json()["tier"] == "free"

    await eventually(downgraded, timeout=15)
    refused = await execute(stack, stack.big, "after")  # 4 used of the free tier's 3
    assert refused.status_code == 429 and refused.json()["detail"] == SENTENCE, refused.text


async def test_a_pro_user_spends_a_lease_that_goes_back_when_its_window_closes(stack: Stack) -> None:
    pro = stack.free
    await set_tier(stack.client, pro, "pro")

    async def upgraded() -> bool:
        me = await stack.http.get("/v1/me", headers=bearer(pro.api_key))
        view = await stack.http.get("/v1/quota", headers=bearer(pro.api_key))
        return me.json()["tier"] == "pro" and view.json()["tier"] == "pro"

    await eventually(upgraded, timeout=15)
    request_ids = []
    for i in range(4):
        answer = await execute(stack, pro, f"call {i}")
        assert answer.status_code == 200 and answer.json()["status"] == "success", answer.text
        request_ids.append(answer.json()["request_id"])

    # A lease of (500 - 0) // 16 = 31 calls (another if the first call's cold start outlasted
    # its 1 s window); the units not spent are not shown as used. Spent units are reported
    # within the usage interval (20 ms).
    async def four_used() -> bool:
        return await calls_used(stack, pro) == 4

    await eventually(four_used, timeout=5)
    leases = [h for h in await quota_events(stack, "reserved", pro) if h.get("lease")]
    assert leases and leases[0]["amount"] == 31
    assert all(h["key"] not in request_ids and int(str(h["amount"])) >= 4 for h in leases)

    async def spent_then_returned() -> bool:
        charged = await quota_events(stack, "usage_recorded", pro)
        returned = await quota_events(stack, "released", pro)
        return len(charged) == 4 and [r["reason"] for r in returned] == ["returned"] * len(leases)

    await eventually(spent_then_returned, timeout=15)  # each window (1 s) closed: returned
    charged = await quota_events(stack, "usage_recorded", pro)
    assert sorted(str(c["key"]) for c in charged) == sorted(request_ids)
    assert {c["lease_id"] for c in charged} <= {h["reservation_id"] for h in leases}  # no call held alone
    assert None not in {c["lease_id"] for c in charged}
    assert await calls_used(stack, pro) == 4
    report = await stack.client.call("quota", "verify", q.Verify(meta=op()), q.QuotaRebuildReport, timeout=60)
    assert report.differences == [] and report.live.charged_calls == 4
