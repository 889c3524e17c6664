"""An upstream's own tools/list_changed: throttled in mcp_proxy, heard only by its user's streams."""

import asyncio
from typing import Any

import msgspec
import pytest

from contracts.commands.mcp import UpstreamToolsChanged
from services.gateway.adapters.mcp_listeners import Listeners
from services.gateway.adapters.upstream_changes import change_of
from services.gateway.mcp.listening import LIST_CHANGED, Audience, UpstreamChange, hears
from services.mcp_proxy.adapters.tool_changes import ToolChanges
from services.mcp_proxy.application.ports import Target
from services.mcp_proxy.domain.pooling import pool_key
from services.mcp_proxy.domain.throttle import Throttle

pytestmark = pytest.mark.unit

ANN = "0b5c1a8e-6a57-4d0e-8f4a-000000000001"
BEA = "0b5c1a8e-6a57-4d0e-8f4a-000000000002"


# -- who hears it -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("audience", "heard"),
    [
        (Audience(ANN, "alpha", None), True),  # her /mcp (and /sse)
        (Audience(ANN, "alpha", "wiki"), True),  # that server's endpoint
        (Audience(ANN, "alpha", "other"), False),  # another server's endpoint
        (Audience(BEA, "alpha", None), False),  # same org, same org server: her own process
        (Audience(BEA, "alpha", "wiki"), False),
        (Audience(BEA, "beta", None), False),
    ],
)
def test_only_the_users_own_streams_hear_an_upstreams_change(audience: Audience, heard: bool) -> None:
    assert hears(UpstreamChange(ANN, "wiki"), audience) is heard


def test_an_empty_user_is_nobody() -> None:
    assert not hears(UpstreamChange("", "wiki"), Audience("", "alpha", None))


def test_a_replica_tells_only_that_users_streams() -> None:
    listeners = Listeners(bus=None)  # type: ignore[arg-type]  # legacy streams never touch the bus

    async def scenario() -> tuple[int, list[bytes], list[bytes], list[bytes]]:
        queues = [asyncio.Queue[bytes]() for _ in range(3)]
        async with (
            listeners.legacy("s1", Audience(ANN, "alpha", None), queues[0]),
            listeners.legacy("s2", Audience(ANN, "alpha", "other"), queues[1]),
            listeners.legacy("s3", Audience(BEA, "alpha", None), queues[2]),
        ):
            told = listeners.upstream_changed(UpstreamChange(ANN, "wiki"))
        return told, *([q.get_nowait() for _ in range(q.qsize())] for q in queues)  # type: ignore[return-value]

    told, ann_all, ann_other, bea = asyncio.run(scenario())
    assert told == 1
    assert ann_all == [LIST_CHANGED] and ann_other == [] and bea == []


def test_the_gateway_reads_the_message_only_when_subject_and_body_agree() -> None:
    body = msgspec.json.encode(UpstreamToolsChanged(user_id=ANN, org_id="alpha", server="wiki"))
    assert change_of(f"mcp.tools_changed.{ANN}", body) == UpstreamChange(ANN, "wiki")
    assert change_of(f"mcp.tools_changed.{BEA}", body) is None
    assert change_of(f"mcp.tools_changed.{ANN}", b"{not json") is None
    assert change_of(f"mcp.tools_changed.{ANN}", b'{"user_id": 1}') is None


# -- the debounce -------------------------------------------------------------------------------
def test_a_burst_is_one_message_now_and_one_at_the_end_of_the_window() -> None:
    throttle = Throttle(1.0)
    assert throttle.offer("k", 10.0) == 0.0  # quiet key: at once
    assert throttle.offer("k", 10.25) == pytest.approx(0.75)  # inside the window: once, at its end
    assert throttle.offer("k", 10.5) is None  # already scheduled: folded into it
    assert throttle.offer("other", 10.5) == 0.0  # keys are independent
    throttle.sent("k", 11.0)
    assert throttle.offer("k", 11.5) == pytest.approx(0.5)  # the trailing send opened a window
    throttle.sent("k", 12.0)
    assert throttle.offer("k", 13.5) == 0.0  # quiet again


def test_forgotten_quiet_keys_do_not_lose_a_pending_one() -> None:
    throttle = Throttle(1.0)
    throttle.offer("pending", 0.0)
    assert throttle.offer("pending", 0.5) == pytest.approx(0.5)
    for n in range(5000):  # pruning kicks in past 4096 remembered keys
        throttle.offer(n, 5.0 + n)
    assert throttle.offer("pending", 6000.0) is None  # still scheduled: not sent twice


class FakeNats:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.sent.append((subject, data))


class FakeBus:
    def __init__(self) -> None:
        self.nc = FakeNats()


def target(user_id: str, server: str = "wiki") -> Target:
    return Target(
        key=pool_key(user_id, f"org:alpha:{server}:1", {}),
        server=server,
        user_id=user_id,
        org_id="alpha",
        transport="stdio",
        command="x",
    )


def test_a_flapping_upstream_publishes_at_most_once_a_window() -> None:
    bus: Any = FakeBus()

    async def scenario() -> None:
        changes = ToolChanges(bus, interval_s=0.3)
        for _ in range(20):  # a flapping upstream
            changes.changed(target(ANN))
        changes.changed(target(BEA))  # another user's process: its own key
        await asyncio.sleep(0.05)
        assert len(bus.nc.sent) == 2  # the first of each, at once
        await asyncio.sleep(0.4)
        assert len(bus.nc.sent) == 3  # one trailing message for the burst, none for BEA
        await changes.stop()

    asyncio.run(scenario())
    subjects = [subject for subject, _ in bus.nc.sent]
    assert subjects == [f"mcp.tools_changed.{ANN}", f"mcp.tools_changed.{BEA}", f"mcp.tools_changed.{ANN}"]
    first = msgspec.json.decode(bus.nc.sent[0][1], type=UpstreamToolsChanged)
    assert first == UpstreamToolsChanged(user_id=ANN, org_id="alpha", server="wiki")


def test_stopping_drops_a_scheduled_message_and_odd_user_ids_are_not_subjects() -> None:
    bus: Any = FakeBus()

    async def scenario() -> None:
        changes = ToolChanges(bus, interval_s=0.2)
        changes.changed(target(ANN))
        changes.changed(target(ANN))  # scheduled for the end of the window
        changes.changed(target("a.b"))  # a dot would make it another subject: never sent
        await changes.stop()
        await asyncio.sleep(0.3)

    asyncio.run(scenario())
    assert [subject for subject, _ in bus.nc.sent] == [f"mcp.tools_changed.{ANN}"]
