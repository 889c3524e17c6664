"""The outbox relay under SIGKILL: every recorded event reaches the stream exactly once.

The identity service runs as a real OS process against real NATS and PostgreSQL. What it
recorded is read back from its store and compared with what is on GATEHOUSE_EVENTS.
"""

import asyncio
import json
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from contracts.commands.identity import CreateUser, UserCreated
from contracts.events import event_type_of
from services.identity.adapters.outbox import translate
from services.identity.application import Identity
from services.kit.bus import Bus, connect
from services.kit.config import Settings
from services.kit.eventstore import open_store
from services.kit.outbox import NOTIFICATION_HEADER, event_id_for
from services.kit.rpc import CommandClient, CommandFailed
from tests.helpers import (
    OPERATOR,
    StreamMessage,
    eventually,
    spawn_service,
    stop_process,
    stream_envelopes,
    stream_messages,
    wait_ready,
)

pytestmark = pytest.mark.integration

# A killed relay keeps its lease until the KV entry expires (6 s), then the next one waits
# for it; give every "eventually" plenty of room on a slow machine.
SETTLE = 30.0

Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn(service_env: dict[str, str], tmp_path: Path) -> Iterator[Spawn]:
    """Starts identity processes; whatever is still running at the end is stopped."""
    started: list[subprocess.Popen[bytes]] = []

    def start(log_name: str = "identity.log", **extra_env: str) -> subprocess.Popen[bytes]:
        process = spawn_service("identity", service_env, tmp_path / log_name, **extra_env)
        started.append(process)
        return process

    yield start
    for process in started:
        stop_process(process)


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    bus = await connect(settings, "test")
    yield bus
    await bus.close()


def recorded_events(settings: Settings) -> dict[str, str]:
    """event id -> event type of every public event identity has recorded in its store."""
    pepper = settings.require_pepper()
    app = open_store(settings, "identity", lambda env: Identity(pepper=pepper, env=env))
    try:
        out: dict[str, str] = {}
        position = 0
        while True:
            batch = app.recorder.select_notifications(position, 500, None, (), inclusive_of_start=False)
            for notification in batch:
                outgoing = translate(app.mapper.to_domain_event(notification))
                if outgoing is not None:
                    out[event_id_for(notification)] = event_type_of(outgoing.payload)
                position = notification.id
            if len(batch) < 500:
                return out
    finally:
        app.close()


def assert_exactly_once(messages: list[StreamMessage]) -> None:
    counts = Counter(m.envelope.event_id for m in messages)
    duplicated = {event_id: n for event_id, n in counts.items() if n > 1}
    assert not duplicated, f"events on the stream more than once: {duplicated}"
    for m in messages:
        assert m.headers["Nats-Msg-Id"] == m.envelope.event_id
    notification_ids = [int(m.headers[NOTIFICATION_HEADER]) for m in messages]
    assert notification_ids == sorted(notification_ids), "the stream is out of store order"


async def stream_has_store(bus: Bus, settings: Settings) -> list[StreamMessage] | None:
    """The stream once every event the store recorded is on it (None until then)."""
    recorded = await asyncio.to_thread(recorded_events, settings)
    messages = await stream_messages(bus, "events.identity.>")
    on_stream = {m.envelope.event_id for m in messages}
    return messages if recorded.keys() <= on_stream else None


async def settled(bus: Bus, settings: Settings) -> list[StreamMessage]:
    """Waits for the relay to catch up, then checks the stream holds the store exactly once."""
    messages: list[StreamMessage] = await eventually(
        lambda: stream_has_store(bus, settings), timeout=SETTLE, step=0.2
    )
    assert_exactly_once(messages)
    recorded = await asyncio.to_thread(recorded_events, settings)
    assert {m.envelope.event_id: m.envelope.type for m in messages} == recorded
    messages_on_stream, _ = await stream_count(bus)
    assert messages_on_stream == len(messages) == len(recorded)
    return messages


async def stream_count(bus: Bus) -> tuple[int, int]:
    info = await bus.js.stream_info("GATEHOUSE_EVENTS")
    return info.state.messages, info.state.last_seq


def user_events(messages: list[StreamMessage], created: UserCreated) -> list[str]:
    out = []
    for m in messages:
        data = json.loads(bytes(m.envelope.data))
        if data.get("user_id") == created.user_id or (
            m.envelope.type == "identity.org_created" and data["org_id"] == created.org_id
        ):
            out.append(m.envelope.type)
    return sorted(out)


def log_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


async def test_sigkill_between_recording_and_publishing_loses_nothing(
    spawn: Spawn, bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    stalled = spawn("stalled.log", GATEHOUSE_FAILPOINTS="relay.before_publish")
    await wait_ready(bus, "identity")
    created = await CommandClient(bus).call(
        "identity",
        "create_user",
        CreateUser(meta=OPERATOR, email="crash@example.com"),
        UserCreated,
        timeout=10,
    )
    recorded = await asyncio.to_thread(recorded_events, settings)
    assert sorted(recorded.values()) == [
        "identity.api_key_issued",
        "identity.org_created",
        "identity.user_registered",
    ]

    await asyncio.sleep(1.0)  # give a (broken) relay every chance to publish anyway
    assert await stream_messages(bus, "events.identity.>") == []
    assert stalled.poll() is None

    stalled.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(stalled.wait, 15) == -signal.SIGKILL

    spawn("restarted.log")
    messages = await settled(bus, settings)
    assert_exactly_once(messages)
    assert user_events(messages, created) == [
        "identity.api_key_issued",
        "identity.org_created",
        "identity.user_registered",
    ]
    assert {m.envelope.event_id for m in messages} == set(recorded)
    messages_on_stream, _ = await stream_count(bus)
    assert messages_on_stream == len(recorded)
    for m in messages:
        assert m.envelope.actor.kind == "operator"
        assert m.envelope.correlation_id == "test"


async def test_sigkill_mid_burst_publishes_every_acknowledged_user_once(
    spawn: Spawn, bus: Bus, settings: Settings
) -> None:
    process = spawn()
    await wait_ready(bus, "identity")
    client = CommandClient(bus)
    total, kill_after = 60, 20
    replies: list[UserCreated] = []
    enough = asyncio.Event()
    # Bounded concurrency leaves the relay turns in the worker threads, so at the kill some
    # events are on the stream, some recorded only, and some commands still in flight.
    in_flight = asyncio.Semaphore(8)

    async def create(n: int) -> None:
        async with in_flight:
            created = await client.call(
                "identity",
                "create_user",
                CreateUser(meta=OPERATOR, email=f"burst{n}@example.com"),
                UserCreated,
                timeout=5,
            )
        replies.append(created)
        if len(replies) >= kill_after:
            enough.set()

    calls = [asyncio.create_task(create(n)) for n in range(total)]
    await asyncio.wait_for(enough.wait(), timeout=60)
    process.send_signal(signal.SIGKILL)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    await asyncio.to_thread(process.wait, 15)

    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, CommandFailed) and o.problem.status == 503 for o in failed), failed
    assert len(replies) >= kill_after
    assert failed, "every command finished before the kill: the crash window was not hit"

    spawn("restarted.log")
    messages = await settled(bus, settings)
    assert_exactly_once(messages)
    registered = Counter(
        json.loads(bytes(m.envelope.data))["user_id"]
        for m in messages
        if m.envelope.type == "identity.user_registered"
    )
    for created in replies:
        assert registered[created.user_id] == 1, (
            f"user {created.user_id} on the stream {registered[created.user_id]} times"
        )
        assert user_events(messages, created) == [
            "identity.api_key_issued",
            "identity.org_created",
            "identity.user_registered",
        ]
    messages_on_stream, _ = await stream_count(bus)
    assert messages_on_stream == len({m.envelope.event_id for m in messages})


async def test_restart_resumes_after_the_last_published_event(
    spawn: Spawn, bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    first = spawn("first.log")
    await wait_ready(bus, "identity")
    client = CommandClient(bus)
    for n in range(3):
        await client.call(
            "identity",
            "create_user",
            CreateUser(meta=OPERATOR, email=f"resume{n}@example.com"),
            UserCreated,
            timeout=10,
        )
    before = await settled(bus, settings)
    assert len(before) == 9
    last_notification = int(before[-1].headers[NOTIFICATION_HEADER])
    assert await asyncio.to_thread(stop_process, first) == 0  # a clean stop
    count_before = await stream_count(bus)

    spawn("second.log")
    await wait_ready(bus, "identity")

    async def relay_resumed() -> list[int]:
        """The notification ids the second process's relay said it resumes after."""
        return [
            int(str(line["msg"]).rsplit(" ", 1)[1])
            for line in log_lines(tmp_path / "second.log")
            if str(line.get("msg", "")).startswith("outbox relay for identity resumes after")
        ]

    # It resumes after the newest event it published, or further: its own bookmark also skips
    # the internal events it scanned but never publishes (e.g. the email claim).
    resumed = await eventually(relay_resumed, timeout=SETTLE)
    assert len(resumed) == 1 and last_notification <= resumed[0] <= last_notification + 3
    await asyncio.sleep(1.5)  # a relay that started over would republish by now
    assert await stream_count(bus) == count_before

    created = await client.call(
        "identity",
        "create_user",
        CreateUser(meta=OPERATOR, email="after-restart@example.com"),
        UserCreated,
        timeout=10,
    )
    after = await settled(bus, settings)
    assert_exactly_once(after)
    assert after[: len(before)] == before
    assert user_events(after[len(before) :], created) == [
        "identity.api_key_issued",
        "identity.org_created",
        "identity.user_registered",
    ]
    messages_on_stream, last_seq = await stream_count(bus)
    assert messages_on_stream == count_before[0] + 3
    assert last_seq == count_before[1] + 3


async def test_a_stream_that_lost_the_service_events_is_not_republished(
    spawn: Spawn, bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    """Retention (or a purge) dropping a service's events must not make its relay start over."""
    first = spawn("first.log")
    await wait_ready(bus, "identity")
    client = CommandClient(bus)
    await client.call(
        "identity",
        "create_user",
        CreateUser(meta=OPERATOR, email="kept@example.com"),
        UserCreated,
        timeout=10,
    )
    assert len(await settled(bus, settings)) == 3
    assert await asyncio.to_thread(stop_process, first) == 0
    await bus.js.purge_stream("GATEHOUSE_EVENTS")

    spawn("second.log")
    await wait_ready(bus, "identity")
    await asyncio.sleep(1.5)  # a relay that started over would republish by now
    info = await bus.js.stream_info("GATEHOUSE_EVENTS")
    assert info.state.messages == 0
    created = await client.call(
        "identity", "create_user", CreateUser(meta=OPERATOR, email="new@example.com"), UserCreated, timeout=10
    )

    async def only_the_new_events() -> list[str] | None:
        envelopes = await stream_envelopes(bus)
        return sorted(e.type for e in envelopes) if len(envelopes) == 3 else None

    assert await eventually(only_the_new_events, timeout=SETTLE) == [
        "identity.api_key_issued",
        "identity.org_created",
        "identity.user_registered",
    ]
    assert all(e.org_id == created.org_id for e in await stream_envelopes(bus))
