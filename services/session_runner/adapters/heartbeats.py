"""Heartbeats in the KV bucket `gatehouse_build_heartbeats` (a TTL expires what is not renewed).

Every few seconds (a third of the TTL, at most 3 s) the node writes one key per build whose
worker is alive (it reported within the last few ticks) and one for itself. A build's key is
written as soon as it is claimed and deleted when it ends. If the node dies, or a worker
hangs, its keys expire and the dispatcher's reaper fails those builds.
"""

import asyncio
import contextlib
import logging
import time

import msgspec
from nats.js.kv import KeyValue

from contracts.commands.builds import Heartbeat
from services.kit.tasks import stop_task
from services.session_runner.application import Runner

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()


class NodeState(msgspec.Struct, kw_only=True):
    node: str
    capacity: int
    running: int


class Heartbeats:
    def __init__(self, kv: KeyValue, runner: Runner, every_s: float, tick_s: float = 2.0) -> None:
        self.kv, self.runner, self.every_s, self.tick_s = kv, runner, every_s, tick_s
        self._known: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def nudge(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeats")

    async def stop(self) -> None:
        if self._task:
            await stop_task(self._task)
        with contextlib.suppress(Exception):
            await self.kv.delete(f"node.{self.runner.node}")

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("heartbeats not written: %s", err)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.every_s)

    async def beat(self) -> None:
        now = time.monotonic()
        sessions = dict(self.runner.sessions)
        for build_id, session in sessions.items():
            if session.alive(now, self.tick_s):
                await self.kv.put(
                    build_id, _encoder.encode(Heartbeat(node=self.runner.node, pid=session.pid))
                )
        for gone in self._known - set(sessions):
            with contextlib.suppress(Exception):
                await self.kv.delete(gone)
        self._known = set(sessions)
        state = NodeState(
            node=self.runner.node, capacity=self.runner.settings.capacity, running=len(sessions)
        )
        await self.kv.put(f"node.{self.runner.node}", _encoder.encode(state))
