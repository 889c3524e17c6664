"""A tool call's notifications: rewritten and filtered in mcp_proxy, relayed in order by the gateway."""

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from contracts.commands.common import CommandMeta
from contracts.commands.mcp import Caller, CallTool
from contracts.envelope import Actor
from services.gateway.mcp.exchange import Exchange
from services.kit.redaction import register_secret
from services.mcp_proxy.adapters.notices import BusNotices, log_notification, progress_notification

pytestmark = pytest.mark.unit

META = CommandMeta(actor=Actor(kind="user", id="u1"), correlation_id="c")


def call(request_id: str = "5d0c3a9e-0f4e-4f7b-9a51-1c2d3e4f5a6b", **kw: Any) -> CallTool:
    return CallTool(
        meta=META, caller=Caller(user_id="u1", org_id="o1"), request_id=request_id, server="s", tool="t", **kw
    )


def test_progress_carries_the_clients_token_and_the_rest_as_sent() -> None:
    upstream = b'{"progressToken":"5d0c3a9e","progress":50,"total":100,"message":"half"}'
    note = json.loads(progress_notification(upstream, b'"tok-1"') or b"")
    assert note == {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": "tok-1", "progress": 50, "total": 100, "message": "half"},
    }
    assert progress_notification(b'{"progress":1}', b"7") is not None
    assert progress_notification(b"not json", b"7") is None
    assert progress_notification(b'{"total":3}', b"7") is None  # no progress: not a progress report


def test_log_lines_below_the_level_asked_for_are_dropped() -> None:
    warning = b'{"level":"warning","data":"disk almost full"}'
    assert log_notification(warning, 0) is not None  # debug and above
    assert log_notification(warning, 3) is not None  # warning and above
    assert log_notification(warning, 4) is None  # error and above
    assert log_notification(b'{"level":"loud","data":1}', 0) is None
    note = json.loads(log_notification(warning, 0) or b"")
    assert note["method"] == "notifications/message" and note["params"]["data"] == "disk almost full"


class _Nc:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        await asyncio.sleep(0)
        self.sent.append((subject, data))


class _Bus:
    def __init__(self) -> None:
        self.nc = _Nc()


async def test_a_listener_only_for_calls_that_ask_and_its_messages_in_order_and_redacted() -> None:
    bus = _Bus()
    notices = BusNotices(bus)  # type: ignore[arg-type]
    assert notices.listener(call()) is None
    assert notices.listener(call(log_level="verbose")) is None  # not an MCP level
    assert notices.listener(call("a.b", progress_token=1)) is None  # not one subject token
    listener = notices.listener(call(progress_token="tok", log_level="info"))
    assert listener is not None and listener.wants_progress and listener.wants_logs
    register_secret("sup3r-s3cret-value")
    for step in range(5):
        listener.progress(b'{"progressToken":"x","progress":%d}' % step)
    listener.log(b'{"level":"debug","data":"dropped"}')
    listener.log(b'{"level":"info","data":"token is sup3r-s3cret-value"}')
    await listener.flush()
    subjects = {subject for subject, _ in bus.nc.sent}
    assert subjects == {"mcp.notify.5d0c3a9e-0f4e-4f7b-9a51-1c2d3e4f5a6b"}
    messages = [json.loads(data) for _, data in bus.nc.sent]
    assert [m["params"]["progress"] for m in messages[:5]] == [0, 1, 2, 3, 4]
    assert all(m["params"]["progressToken"] == "tok" for m in messages[:5])
    assert messages[5]["params"]["data"] == "token is [REDACTED]" and len(messages) == 6


class _Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def next(self) -> bytes:
        return await self.queue.get()

    def drain(self) -> list[bytes]:
        return [self.queue.get_nowait() for _ in range(self.queue.qsize())]


class _Heard:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def notice(self, message: bytes) -> None:
        await asyncio.sleep(0)
        self.messages.append(message)


async def test_the_gateway_hands_over_every_notification_before_the_outcome() -> None:
    inbox = _Inbox()

    @asynccontextmanager
    async def listen(request_id: str) -> AsyncIterator[_Inbox]:
        yield inbox

    exchange = Exchange(None, None, None, listen)  # type: ignore[arg-type]
    heard = _Heard()

    async def call_with_a_burst() -> str:
        inbox.queue.put_nowait(b"1")
        await asyncio.sleep(0)
        for n in (b"2", b"3", b"4"):  # published right before the outcome: still queued
            inbox.queue.put_nowait(n)
        return "outcome"

    outcome = await exchange._relayed("r1", call_with_a_burst(), heard)  # type: ignore[arg-type]
    assert outcome == "outcome" and heard.messages == [b"1", b"2", b"3", b"4"]
