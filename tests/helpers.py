"""Small tools shared by integration and e2e tests."""

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from contracts.commands.common import CommandMeta
from contracts.envelope import Actor, Envelope, decode_envelope
from services.kit.bus import Bus, connect, ensure_stream
from services.kit.config import Settings
from services.kit.host import Build, Component

OPERATOR = CommandMeta(actor=Actor(kind="operator", id="test"), correlation_id="test")


@asynccontextmanager
async def running(build: Build, settings: Settings, name: str = "test") -> AsyncIterator[Bus]:
    """Runs a service's components inside the test's event loop."""
    bus = await connect(settings, name)
    await ensure_stream(bus, settings)
    components: list[Component] = await build(bus, settings)
    for c in components:
        await c.start()
    try:
        yield bus
    finally:
        for c in reversed(components):
            await c.stop()
        await bus.close()


def spawn_service(name: str, env: dict[str, str], log: Path, **extra_env: str) -> subprocess.Popen[bytes]:
    """Runs `python -m services.<name>` as its own OS process (for crash tests)."""
    full = {**os.environ, **env, **extra_env}
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=full, stdout=out, stderr=out)


async def stream_envelopes(bus: Bus, subject: str = "events.>") -> list[Envelope]:
    """Every event currently on the stream (in stream order)."""
    info = await bus.js.stream_info("GATEHOUSE_EVENTS")
    out: list[Envelope] = []
    if info.state.messages == 0:
        return out
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:
                break
            out.append(decode_envelope(msg.data))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0, step: float = 0.05) -> Any:
    """Retries `check` until it returns a truthy value; the last falsy value fails the test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    result: Any = None
    while loop.time() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s (last value: {result!r})")


class StreamMessage(NamedTuple):
    seq: int
    subject: str
    headers: dict[str, str]
    envelope: Envelope


async def stream_messages(bus: Bus, subject: str = "events.>") -> list[StreamMessage]:
    """Every message currently on the stream with its sequence and headers (in stream order)."""
    info = await bus.js.stream_info("GATEHOUSE_EVENTS")
    out: list[StreamMessage] = []
    if info.state.messages == 0:
        return out
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except Exception:
                break
            out.append(
                StreamMessage(
                    msg.metadata.sequence.stream,
                    msg.subject,
                    dict(msg.headers or {}),
                    decode_envelope(msg.data),
                )
            )
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


async def wait_ready(bus: Bus, service: str, timeout: float = 30.0) -> None:
    """Waits until `service` answers its ping (a freshly spawned process takes a moment)."""
    from contracts.commands.common import Ping, Pong
    from services.kit.rpc import CommandClient, CommandFailed

    client = CommandClient(bus)

    async def answers() -> bool:
        try:
            pong = await client.call(service, "ping", Ping(), Pong, timeout=2)
        except CommandFailed:
            return False
        return pong.database

    await eventually(answers, timeout=timeout, step=0.1)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def eventually_sync(check: Callable[[], Any], timeout: float = 10.0, step: float = 0.1) -> Any:
    """`eventually` for synchronous checks (subprocesses, blocking HTTP clients)."""
    import time

    deadline = time.monotonic() + timeout
    result: Any = None
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s (last value: {result!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def http_upstream(script: Path | str, *flags: str, log: Path) -> Iterator[int]:
    """An upstream MCP server script listening on a free loopback port (yielded) once it
    accepts connections; terminated afterwards. Its output goes to `log`."""
    port = free_port()
    with open(log, "ab") as out:
        command = [sys.executable, str(script), *flags, "--port", str(port)]
        process = subprocess.Popen(command, stdout=out, stderr=out)
        try:
            for _ in range(150):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            yield port
        finally:
            process.terminate()
            process.wait(10)
