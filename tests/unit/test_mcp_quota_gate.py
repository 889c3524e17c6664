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
PRO = Caller(user_id="u-pro", org_id="o-1", tier="pro")


class Quota:
    """Answers like the quota service: enterprise is unlimited (a 30 s grant), free has 2 calls,
    pro gets leases of `lease_units` calls for `lease_for_s`."""

    def __init__(self, lease_units: int = 3, lease_for_s: float = 5.0, lease_tier: str = "pro") -> None:
        self.sent: list[tuple[str, Any]] = []
        self.used: dict[str, int] = {}
        self.failures: list[Problem] = []
        self.lease_units, self.lease_for_s, self.lease_tier = lease_units, lease_for_s, lease_tier
        self.leases = 0

    async def call(
        self, service: str, verb: str, request: Any, reply_type: type, timeout: float = 5.0
    ) -> Any:
        self.sent.append((verb, request))
        if verb == "reserve" and request.user_id == PRO.user_id:
            assert request.lease  # mcp_proxy always offers to take a lease
            await asyncio.sleep(0.01)
            self.leases += 1
            return q.Reservation(
                granted=True,
                reservation_id=f"lease-{self.leases}",
                state="held",
                kind="call",
                used=self.lease_units * self.leases,
                limit=500,
                tier=self.lease_tier,
                lease_key=f"lease:{self.leases}",
                lease_units=self.lease_units,
                lease_for_s=self.lease_for_s,
            )
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

    def usage_messages(self) -> list[tuple[list[tuple[str, str | None]], list[str]]]:
        """Each RecordUsage sent: its (key, lease) uses, then the leases it returned."""
        return [
            ([(u.key, u.lease) for u in r.uses], [back.key for back in r.returned])
            for verb, r in self.sent
            if verb == "record_usage"
        ]


async def settled(gate: QuotaService) -> None:
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not gate._uses and not gate._returned and not gate._wake.is_set():
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


async def test_a_lease_runs_its_calls_without_a_trip_and_goes_back_after_its_uses() -> None:
    quota = Quota(lease_units=3)
    gate = QuotaService(quota, usage_interval_s=0.01)  # type: ignore[arg-type]
    await gate.start()
    first = await gate.reserve(PRO, "p-1", "echo", "echo")
    second, third = gate.granted(PRO, "p-2"), gate.granted(PRO, "p-3")
    assert second is not None and third is not None
    assert (first.lease, second.lease, third.lease) == ("lease:1", "lease:1", "lease:1")
    assert not first.held and gate.granted(PRO, "p-4") is None  # three units, three calls
    assert quota.verbs() == ["reserve"]
    await gate.commit(first)
    await gate.release(second)  # never reached its upstream: its unit goes back with the lease
    await settled(gate)
    assert quota.usage_messages() == [([("p-1", "lease:1")], [])]  # p-3 still runs: not returned
    await gate.commit(third)
    await settled(gate)
    assert quota.usage_messages()[-1] == ([("p-3", "lease:1")], ["lease:1"])
    fourth = await gate.reserve(PRO, "p-4", "echo", "echo")  # the next lease
    assert fourth.lease == "lease:2" and quota.verbs().count("reserve") == 2
    await gate.commit(fourth)
    await gate.stop()  # a lease still held is returned on the way out, after its uses
    assert quota.usage_messages()[-1] == ([("p-4", "lease:2")], ["lease:2"])


async def test_a_lease_ends_with_its_window_and_concurrent_calls_share_one_request() -> None:
    quota = Quota(lease_units=100, lease_for_s=0.2)
    gate = QuotaService(quota, usage_interval_s=0.01)  # type: ignore[arg-type]
    await gate.start()
    calls = await asyncio.gather(*(gate.reserve(PRO, f"w-{i}", "echo", "echo") for i in range(10)))
    assert quota.verbs() == ["reserve"]  # ten callers, one request: the others waited for it
    assert {c.lease for c in calls} == {"lease:1"}
    for call in calls:
        await gate.commit(call)
    await settled(gate)
    assert not any(back for _, back in quota.usage_messages())  # its window is still open
    await asyncio.sleep(0.3)
    await settled(gate)
    assert quota.usage_messages()[-1][1] == ["lease:1"]  # the window closed: returned
    assert gate.granted(PRO, "w-10") is None
    await gate.stop()


async def test_a_lease_decided_at_another_tier_serves_only_its_own_call() -> None:
    quota = Quota(lease_units=50, lease_tier="free")  # the quota service still sees the old tier
    gate = QuotaService(quota, usage_interval_s=0.01)  # type: ignore[arg-type]
    await gate.start()
    only = await gate.reserve(PRO, "t-1", "echo", "echo")
    assert only.lease == "lease:1" and gate.granted(PRO, "t-2") is None
    await gate.commit(only)
    await settled(gate)
    assert quota.usage_messages() == [([("t-1", "lease:1")], ["lease:1"])]
    await gate.stop()
