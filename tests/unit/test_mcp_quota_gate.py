"""mcp_proxy's quota gate (adapters/quota.py) against a stand-in for the quota service's replies:
which calls hold first, which skip the hold, and how charges are sent after the calls."""

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from contracts.commands import quota as q
from contracts.commands.common import Problem
from contracts.commands.mcp import Caller
from services.kit.rpc import CommandFailed
from services.mcp_proxy.adapters.quota import QuotaService
from services.mcp_proxy.application.ports import QuotaExceeded

pytestmark = pytest.mark.unit

BIG = Caller(user_id="u-big", org_id="o-1", tier="enterprise")
SMALL = Caller(user_id="u-small", org_id="o-1", tier="free")


class Quota:
    """Answers like the quota service: enterprise is unlimited (a 30 s grant), free has 2 calls."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.used: dict[str, int] = {}
        self.failures: list[Problem] = []

    async def call(
        self, service: str, verb: str, request: Any, reply_type: type, timeout: float = 5.0
    ) -> Any:
        self.sent.append((verb, request))
        if verb == "reserve":
            unlimited = request.user_id == BIG.user_id
            used = self.used.get(request.user_id, 0)
            granted = unlimited or used < 2
            if granted:
                self.used[request.user_id] = used + 1
            return q.Reservation(
                granted=granted,
                reservation_id="r" if granted else None,
                state="held" if granted else "refused",
                kind="call",
                used=used + 1,
                limit=None if unlimited else 2,
                tier="enterprise" if unlimited else "free",
                period_start=datetime(2026, 11, 1, tzinfo=UTC),
                sentence=None if granted else "Monthly quota exceeded (2 calls).",
                retry_after_s=None if granted else 60,
                unmetered_for_s=30.0 if unlimited else None,
            )
        if self.failures:
            raise CommandFailed(self.failures.pop(0))
        if verb == "record_usage":
            return q.UsageReceipt(recorded=len(request.uses))
        return q.Settled(changed=True, state="released")

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.sent]

    def uses(self) -> list[tuple[str, bool]]:
        return [(u.key, u.held) for verb, r in self.sent if verb == "record_usage" for u in r.uses]


async def settled(gate: QuotaService) -> None:
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not gate._uses and not gate._wake.is_set():
            return


async def test_an_unlimited_user_holds_once_then_runs_calls_without_a_hold() -> None:
    quota = Quota()
    gate = QuotaService(quota, usage_interval_s=0.01)  # type: ignore[arg-type]
    await gate.start()
    assert gate.granted(BIG, "c-0") is None  # nothing known yet: the call must ask
    first = await gate.reserve(BIG, "c-1", "echo", "echo")
    no_trip = gate.granted(BIG, "c-9")
    assert no_trip is not None and not no_trip.held and no_trip.request_id == "c-9"
    rest = [await gate.reserve(BIG, f"c-{i}", "echo", "echo") for i in range(2, 6)]
    assert first.held and not any(r.held for r in rest)
    assert quota.verbs() == ["reserve"]  # one round trip for five calls
    for reservation in (first, *rest[:3]):
        await gate.commit(reservation)
    await gate.release(rest[3])  # never reached its upstream: nothing to charge, nothing sent
    await settled(gate)
    assert quota.verbs() == ["reserve", "record_usage"]  # the four charges in one message
    assert quota.uses() == [("c-1", True), ("c-2", False), ("c-3", False), ("c-4", False)]
    await gate.stop()


async def test_a_tier_change_asks_again_and_a_limited_tier_always_holds() -> None:
    quota = Quota()
    gate = QuotaService(quota, usage_interval_s=0.01)  # type: ignore[arg-type]
    await gate.start()
    await gate.reserve(BIG, "a-1", "echo", "echo")
    downgraded = Caller(user_id=BIG.user_id, org_id=BIG.org_id, tier="team")  # the gateway's view
    again = await gate.reserve(downgraded, "a-2", "echo", "echo")
    assert again.held and quota.verbs() == ["reserve", "reserve"]
    # The quota service still said enterprise: no grant is kept for the tier it did not decide.
    assert (await gate.reserve(downgraded, "a-3", "echo", "echo")).held
    assert [(await gate.reserve(SMALL, f"s-{i}", "echo", "echo")).held for i in range(2)] == [True, True]
    with pytest.raises(QuotaExceeded) as refused:
        await gate.reserve(SMALL, "s-2", "echo", "echo")
    assert refused.value.retry_after_s == 60
    await gate.release(again)  # a held call that did not reach its upstream: released at once
    await asyncio.sleep(0.02)
    assert ("release", "a-2") in [(v, getattr(r, "key", None)) for v, r in quota.sent]
    await gate.stop()


async def test_charges_are_retried_until_recorded_and_a_refused_message_is_dropped() -> None:
    quota = Quota()
    unavailable = Problem(status=503, title="Service unavailable", detail="quota is loading")
    quota.failures = [unavailable]
    gate = QuotaService(quota, usage_interval_s=0.01)  # type: ignore[arg-type]
    await gate.start()
    hold = await gate.reserve(BIG, "k-1", "echo", "echo")
    await gate.commit(hold)
    await asyncio.sleep(0.5)  # the first delivery fails, the next one (after 0.2 s) goes through
    assert quota.verbs() == ["reserve", "record_usage", "record_usage"] and not gate._uses
    quota.failures = [Problem(status=400, title="Invalid request", detail="bad")]
    await gate.commit(await gate.reserve(BIG, "k-2", "echo", "echo"))
    await settled(gate)
    assert quota.verbs().count("record_usage") == 3 and not gate._uses  # dropped, not retried forever
    await gate.stop()
