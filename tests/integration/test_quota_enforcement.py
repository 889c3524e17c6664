"""Quota enforcement over NATS on real servers: the boundary, retries, crashes, tiers, expiry.

The quota service runs as its own OS process (as in production, and so it can be killed
with SIGKILL); identity runs in the test's event loop. The callers are separate OS
processes (tests/integration/quota_load.py), like two gateway replicas.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec
import pytest

from contracts.commands import quota as q
from contracts.commands.common import CommandMeta
from contracts.commands.identity import CreateUser, SetTier, UserCreated, UserView
from contracts.events import quota as ev
from services.identity.bootstrap import build as build_identity
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.rpc import CommandClient, CommandFailed
from services.quota.domain import period_end
from tests.helpers import (
    OPERATOR,
    eventually,
    running,
    spawn_service,
    stop_process,
    stream_envelopes,
    wait_ready,
)

pytestmark = pytest.mark.integration


def op() -> CommandMeta:
    """A fresh meta per command (a client may stamp its deadline on the one it sends)."""
    return CommandMeta(actor=OPERATOR.actor, correlation_id="test")


T = TypeVar("T")
SENTENCE = "Monthly quota exceeded (50 calls). Upgrade to Pro for 500 calls/month."
Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn_quota(service_env: dict[str, str], tmp_path: Path) -> Iterator[Spawn]:
    started: list[subprocess.Popen[bytes]] = []

    def start(**extra_env: str) -> subprocess.Popen[bytes]:
        process = spawn_service("quota", service_env, tmp_path / "quota.log", **extra_env)
        started.append(process)
        return process

    yield start
    for process in started:
        stop_process(process)


@pytest.fixture
async def platform(settings: Settings, spawn_quota: Spawn) -> AsyncIterator[tuple[Bus, CommandClient]]:
    """identity in this event loop, one quota process; yields a bus and a command client."""
    async with running(build_identity, settings, "identity") as bus:
        spawn_quota()
        await wait_ready(bus, "quota")
        yield bus, CommandClient(bus)


async def create_user(client: CommandClient, email: str, tier: str = "free") -> UserCreated:
    return await client.call(
        "identity", "create_user", CreateUser(meta=op(), email=email, tier=tier), UserCreated
    )


async def reserve(client: CommandClient, user: UserCreated, key: str) -> q.Reservation:
    request = q.Reserve(meta=op(), user_id=user.user_id, org_id=user.org_id, kind="call", key=key)
    return await client.call("quota", "reserve", request, q.Reservation)


async def commit(client: CommandClient, user: UserCreated, key: str) -> q.Settled:
    return await client.call("quota", "commit", q.Commit(meta=op(), user_id=user.user_id, key=key), q.Settled)


async def quota_view(client: CommandClient, user: UserCreated) -> q.QuotaView:
    request = q.GetQuota(meta=op(), user_id=user.user_id, org_id=user.org_id)
    return await client.call("quota", "get", request, q.QuotaView)


def load_process(
    service_env: dict[str, str], user: UserCreated, prefix: str, *extra: str
) -> subprocess.Popen[bytes]:
    args = ["--user", user.user_id, "--org", user.org_id, "--prefix", prefix, *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.quota_load", *args],
        env={**os.environ, **service_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def result_of(process: subprocess.Popen[bytes], timeout: float = 120.0) -> dict[str, list[str]]:
    out, err = await asyncio.to_thread(process.communicate, None, timeout)
    assert process.returncode == 0, err.decode()[-3000:]
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    assert lines, err.decode()[-3000:]
    result: dict[str, list[str]] = json.loads(lines[-1])
    assert not result["failures"], result["failures"]
    return result


async def rebuilt(client: CommandClient, verb: str = "rebuild") -> q.QuotaRebuildReport:
    request = q.Verify(meta=op()) if verb == "verify" else q.Rebuild(meta=op())
    return await client.call("quota", verb, request, q.QuotaRebuildReport, timeout=120)


async def test_exactly_limit_calls_succeed_across_two_gateway_processes(
    platform: tuple[Bus, CommandClient], service_env: dict[str, str]
) -> None:
    _, client = platform
    user = await create_user(client, "boundary@example.test")
    start_at = str(time.time() + 4)  # both processes fire together, once connected
    callers = [
        load_process(service_env, user, f"gw{n}", "--count", "60", "--commit", "--start-at", start_at)
        for n in (1, 2)
    ]
    results = [await result_of(p) for p in callers]
    granted = [k for r in results for k in r["granted"]]
    refused = [k for r in results for k in r["refused"]]
    assert len(granted) == 50, (len(granted), len(refused))
    assert len(refused) == 70
    assert {s for r in results for s in r["sentences"]} == {SENTENCE}
    view = await quota_view(client, user)
    assert (view.calls_used, view.calls_limit, view.tier) == (50, 50, "free")
    report = await rebuilt(client, "verify")
    assert report.differences == [] and report.live.digest == report.rebuilt.digest
    assert report.live.charged_calls == 50


async def test_leases_grant_exactly_the_limit_across_two_gateway_processes(
    settings: Settings, spawn_quota: Spawn, service_env: dict[str, str]
) -> None:
    """Two processes run calls through mcp_proxy's own gate: they spend leases, and at the
    boundary a refusal waits for the other process's unspent units to come back."""
    async with running(build_identity, settings, "identity") as bus:
        client = CommandClient(bus)
        spawn_quota(GATEHOUSE_QUOTA_TIERS='{"pro": {"calls": 400}}', GATEHOUSE_QUOTA_LEASE_S="0.5")
        await wait_ready(bus, "quota")
        user = await create_user(client, "leases@example.test", tier="pro")
        start_at = str(time.time() + 4)
        args = ("--count", "300", "--gate", "pro", "--start-at", start_at)
        callers = [load_process(service_env, user, f"gw{n}", *args) for n in (1, 2)]
        results = [await result_of(p) for p in callers]
        granted = [k for r in results for k in r["granted"]]
        refused = [k for r in results for k in r["refused"]]
        assert (len(granted), len(refused)) == (400, 200)
        leased = sum(cast(int, r["leased"]) for r in results)
        assert leased > 200  # mostly spent from leases
        assert {s for r in results for s in r["sentences"]} == {
            "Monthly quota exceeded (400 calls). Upgrade to Team for 5000 calls/month."
        }
        view = await quota_view(client, user)
        assert view.calls_used == 400  # every lease came back: nothing left held

        async def leases() -> tuple[list[ev.Reserved], list[ev.UsageRecorded], list[ev.Released]]:
            def of(found: list[Any], kind: type[T]) -> list[T]:
                return [msgspec.json.decode(e.data, type=kind) for e in found]

            reserved = of(await stream_envelopes(bus, "events.quota.reserved"), ev.Reserved)
            usage = of(await stream_envelopes(bus, "events.quota.usage_recorded"), ev.UsageRecorded)
            released = of(await stream_envelopes(bus, "events.quota.released"), ev.Released)
            return [r for r in reserved if r.lease], usage, released

        taken, usage, released = await leases()
        assert taken and all(r.user_id == user.user_id and r.amount >= 4 for r in taken)
        assert len(usage) == 400 and len({u.usage_id for u in usage}) == 400
        assert {u.lease_id for u in usage if u.lease_id} <= {r.reservation_id for r in taken}
        assert len([u for u in usage if u.lease_id]) == leased  # each spent a unit of its lease
        assert {r.reservation_id for r in released} >= {r.reservation_id for r in taken}
        report = await rebuilt(client, "verify")
        assert report.differences == [] and report.live.charged_calls == 400


async def test_a_refusal_waits_for_unspent_lease_units_to_come_back(
    settings: Settings, spawn_quota: Spawn
) -> None:
    async with running(build_identity, settings, "identity") as bus:
        client = CommandClient(bus)
        spawn_quota(GATEHOUSE_QUOTA_TIERS='{"pro": {"calls": 100}}', GATEHOUSE_QUOTA_LEASE_S="5")
        await wait_ready(bus, "quota")
        user = await create_user(client, "waits@example.test", tier="pro")
        for i in range(30):
            assert (await reserve(client, user, f"plain-{i}")).granted
        ask = q.Reserve(meta=op(), user_id=user.user_id, org_id=user.org_id, kind="call", key="x", lease=True)
        lease = await client.call("quota", "reserve", ask, q.Reservation)
        assert lease.granted and lease.lease_key and lease.lease_units == 4  # (100 - 30) // 16
        assert lease.lease_for_s == 5.0 and lease.used == 34
        for i in range(30, 96):
            assert (await reserve(client, user, f"plain-{i}")).granted
        waiting = asyncio.ensure_future(reserve(client, user, "after-the-lease"))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # refused by the ledger, but 4 units sit unspent in a lease
        spent = q.Use(user_id=user.user_id, org_id=user.org_id, key="x", lease=lease.lease_key)
        back = q.Returned(user_id=user.user_id, key=lease.lease_key)
        usage = q.RecordUsage(meta=op(), uses=[spent], returned=[back])
        receipt = await client.call("quota", "record_usage", usage, q.UsageReceipt)
        assert receipt.recorded == 1
        answer = await waiting
        assert answer.granted and answer.used == 98  # 96 holds, 1 spent lease unit, this one
        assert (await quota_view(client, user)).calls_used == 98


async def test_the_same_request_id_retried_is_charged_once(
    platform: tuple[Bus, CommandClient], service_env: dict[str, str]
) -> None:
    bus, client = platform
    user = await create_user(client, "retry@example.test")
    answers = await asyncio.gather(*(reserve(client, user, "request-1") for _ in range(10)))
    assert all(a.granted for a in answers)
    assert len({a.reservation_id for a in answers}) == 1
    settled = [await commit(client, user, "request-1") for _ in range(10)]
    assert [s.changed for s in settled] == [True] + [False] * 9
    again = await reserve(client, user, "request-1")  # a retry after the charge
    assert again.granted and again.state == "committed"
    # Two processes retrying the same keys 10 times each, concurrently.
    callers = [
        load_process(service_env, user, "same", "--count", "5", "--repeat", "10", "--commit") for _ in (1, 2)
    ]
    for caller in callers:
        assert len((await result_of(caller))["granted"]) == 5
    assert (await quota_view(client, user)).calls_used == 6

    async def usage_events() -> list[ev.UsageRecorded]:
        found = await stream_envelopes(bus, "events.quota.usage_recorded")
        return [msgspec.json.decode(e.data, type=ev.UsageRecorded) for e in found] if len(found) >= 6 else []

    usage = await eventually(usage_events)
    assert len(usage) == 6 and len({u.usage_id for u in usage}) == 6  # one billing record per charge


async def test_replay_reproduces_live_balances_after_a_sigkill_mid_load(
    settings: Settings, spawn_quota: Spawn, service_env: dict[str, str]
) -> None:
    async with running(build_identity, settings, "identity") as bus:
        client = CommandClient(bus)
        first = spawn_quota()
        await wait_ready(bus, "quota")
        users = [await create_user(client, f"crash{i}@example.test", tier="team") for i in range(2)]
        args = ("--count", "400", "--concurrency", "16", "--commit", "--retry", "--timeout", "2")
        callers = [load_process(service_env, user, f"c{i}", *args) for i, user in enumerate(users)]

        async def charged() -> int:
            try:
                return sum([(await quota_view(client, u)).calls_used for u in users])
            except CommandFailed:
                return 0

        await eventually(lambda: _at_least(charged, 100), timeout=60)
        first.send_signal(signal.SIGKILL)
        first.wait()
        await asyncio.sleep(0.5)
        spawn_quota()  # waits for the dead one's lease to expire, then loads from the store
        results = [await result_of(p, timeout=180) for p in callers]
        assert any(r["errors"] for r in results), "the kill landed after the load finished"
        for user, result in zip(users, results, strict=True):
            assert len(result["granted"]) == 400
            assert (await quota_view(client, user)).calls_used == 400
        report = await rebuilt(client)
        assert report.live.digest == report.rebuilt.digest, report.differences
        assert report.live.charged_calls == 800
        verified = await rebuilt(client, "verify")
        assert verified.differences == []


async def _at_least(count: Callable[[], object], n: int) -> bool:
    value = await count()  # type: ignore[misc]
    return bool(value >= n)


async def test_free_users_51st_call_is_refused_then_pro_calls_at_once(
    platform: tuple[Bus, CommandClient],
) -> None:
    _, client = platform
    user = await create_user(client, "upgrade@example.test")
    for i in range(50):
        assert (await reserve(client, user, f"call-{i}")).granted
        assert (await commit(client, user, f"call-{i}")).changed
    refused = await reserve(client, user, "call-50")
    assert not refused.granted
    assert refused.sentence == SENTENCE
    now = datetime.now(UTC)
    expected = (period_end(now) - now).total_seconds()
    assert refused.retry_after_s is not None and abs(refused.retry_after_s - expected) <= 5
    await client.call(
        "identity",
        "set_tier",
        SetTier(meta=op(), org_id=user.org_id, user_id=user.user_id, tier="pro"),
        UserView,
    )
    granted = await reserve(client, user, "call-50")
    assert granted.granted and granted.limit == 500 and granted.tier == "pro"


async def test_an_abandoned_reservation_expires_with_an_event(settings: Settings, spawn_quota: Spawn) -> None:
    async with running(build_identity, settings, "identity") as bus:
        client = CommandClient(bus)
        spawn_quota(GATEHOUSE_QUOTA_RESERVATION_TIMEOUT_S="1")
        await wait_ready(bus, "quota")
        user = await create_user(client, "crashed-caller@example.test")
        held = await reserve(client, user, "never-settled")
        assert held.granted and (await quota_view(client, user)).calls_used == 1

        async def released() -> list[object]:
            return [
                e
                for e in await stream_envelopes(bus, "events.quota.released")
                if b'"reason":"expired"' in bytes(e.data)
            ]

        await eventually(released, timeout=15)
        assert (await quota_view(client, user)).calls_used == 0
        assert not (await commit(client, user, "never-settled")).changed  # too late: not charged


async def test_bad_input_is_refused_or_ignored(platform: tuple[Bus, CommandClient]) -> None:
    _, client = platform
    user = await create_user(client, "bad@example.test")
    with pytest.raises(CommandFailed) as unknown:
        await reserve(client, UserCreated(user_id="nobody", org_id=user.org_id, key_id="", api_key=""), "k")
    assert unknown.value.problem.status == 404
    for amount in (-1, 0, 10**9):
        request = q.Reserve(
            meta=op(), user_id=user.user_id, org_id=user.org_id, kind="call", key="k", amount=amount
        )
        with pytest.raises(CommandFailed) as absurd:
            await client.call("quota", "reserve", request, q.Reservation)
        assert absurd.value.problem.status == 400
    with pytest.raises(CommandFailed) as kind:
        await client.call(
            "quota",
            "reserve",
            {
                "meta": {"actor": {"kind": "service", "id": "t"}, "correlation_id": "c"},
                "user_id": "u",
                "org_id": "o",
                "kind": "lunch",
                "key": "k",
            },  # type: ignore[arg-type]
            q.Reservation,
        )
    assert kind.value.problem.status == 400
    assert (await commit(client, user, "never-reserved")) == q.Settled(changed=False, state=None)
    release = q.Release(meta=op(), user_id=user.user_id, key="never-reserved")
    assert (await client.call("quota", "release", release, q.Settled)).changed is False
