"""Commands over real NATS: every refusal comes back as a Problem, never as a silent timeout."""

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from contracts.commands.common import Ping, Problem
from services.kit.bus import Bus, connect
from services.kit.config import load_settings
from services.kit.rpc import CommandClient, CommandFailed, CommandServer, refuse
from tests.integration.calc import Add, Sum, connected

pytestmark = pytest.mark.integration


class Reply(msgspec.Struct):
    ok: bool
    value: object = None
    problem: Problem | None = None


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    async with connected(nats_url, "test-rpc") as bus:
        yield bus


@pytest.fixture
async def calculator(bus: Bus) -> AsyncIterator[list[Add]]:
    """A `calc` service: `add` sums, `reserve` refuses with 409, `crash` raises."""
    seen: list[Add] = []
    server = CommandServer(bus, "calc")

    async def add(c: Add) -> Sum:
        seen.append(c)
        return Sum(c.a + c.b)

    async def reserve(c: Add) -> Sum:
        raise refuse(409, "Conflict", f"slot {c.a} is already taken", code="slot_taken")

    async def crash(c: Add) -> Sum:
        raise RuntimeError("database exploded")

    server.route("add", Add, add)
    server.route("reserve", Add, reserve)
    server.route("crash", Add, crash)
    await server.start()
    yield seen
    await server.stop()


async def test_a_command_is_answered(bus: Bus, calculator: list[Add]) -> None:
    result = await CommandClient(bus).call("calc", "add", Add(a=2, b=3), Sum)
    assert result == Sum(5)
    assert calculator == [Add(a=2, b=3)]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"", b'{"a": 1}', b'{"a": "one", "b": 2}', b"[1, 2]"],
    ids=["garbage", "empty", "missing-field", "wrong-type", "array"],
)
async def test_malformed_body_gets_a_400_problem(bus: Bus, calculator: list[Add], body: bytes) -> None:
    msg = await bus.nc.request("cmd.calc.add", body, timeout=5)
    reply = msgspec.json.decode(msg.data, type=Reply)
    assert reply.ok is False
    assert reply.problem is not None
    assert reply.problem.status == 400
    assert reply.problem.detail.startswith("Invalid command")
    assert calculator == []  # the handler never ran


async def test_wrong_command_shape_through_the_client_is_refused_with_400(
    bus: Bus, calculator: list[Add]
) -> None:
    with pytest.raises(CommandFailed) as failed:
        await CommandClient(bus).call("calc", "add", Ping(), Sum)
    assert failed.value.problem.status == 400
    assert calculator == []


async def test_refusal_keeps_its_status_and_sentence(bus: Bus, calculator: list[Add]) -> None:
    with pytest.raises(CommandFailed) as failed:
        await CommandClient(bus).call("calc", "reserve", Add(a=7, b=0), Sum)
    problem = failed.value.problem
    assert problem.status == 409
    assert problem.title == "Conflict"
    assert problem.detail == "slot 7 is already taken"
    assert problem.code == "slot_taken"
    assert str(failed.value) == "slot 7 is already taken"


async def test_unexpected_error_is_a_503_without_internals(bus: Bus, calculator: list[Add]) -> None:
    with pytest.raises(CommandFailed) as failed:
        await CommandClient(bus).call("calc", "crash", Add(a=1, b=1), Sum)
    assert failed.value.problem.status == 503
    assert "calc" in failed.value.problem.detail
    assert "exploded" not in failed.value.problem.detail


async def test_no_responders_is_a_503_naming_the_service(bus: Bus) -> None:
    with pytest.raises(CommandFailed) as failed:
        await CommandClient(bus).call("billing", "charge", Add(a=1, b=2), Sum, timeout=30)
    assert failed.value.problem.status == 503
    assert "billing service" in failed.value.problem.detail


async def test_stopped_server_no_longer_answers(bus: Bus) -> None:
    server = CommandServer(bus, "calc")

    async def add(c: Add) -> Sum:
        return Sum(c.a + c.b)

    server.route("add", Add, add)
    await server.start()
    client = CommandClient(bus)
    assert await client.call("calc", "add", Add(a=1, b=1), Sum) == Sum(2)
    await server.stop()
    with pytest.raises(CommandFailed) as failed:
        await client.call("calc", "add", Add(a=1, b=1), Sum, timeout=30)
    assert failed.value.problem.status == 503
    assert "calc" in failed.value.problem.detail


async def test_instances_share_the_work_and_each_command_runs_once(nats_url: str) -> None:
    settings = load_settings({"GATEHOUSE_NATS_URL": nats_url})
    buses = [await connect(settings, f"calc-{i}") for i in range(3)]
    served: list[tuple[int, int]] = []
    servers = []
    try:
        for i, b in enumerate(buses):
            server = CommandServer(b, "calc")

            async def add(c: Add, instance: int = i) -> Sum:
                served.append((instance, c.a))
                await asyncio.sleep(0.01)
                return Sum(c.a + c.b)

            server.route("add", Add, add)
            await server.start()
            servers.append(server)
        client_bus = await connect(settings, "client")
        try:
            client = CommandClient(client_bus)
            results = await asyncio.gather(
                *(client.call("calc", "add", Add(a=n, b=1), Sum) for n in range(60))
            )
        finally:
            await client_bus.close()
        assert [r.total for r in results] == [n + 1 for n in range(60)]
        assert sorted(a for _, a in served) == list(range(60))  # each exactly once
    finally:
        for server in servers:
            await server.stop()
        for b in buses:
            await b.close()
