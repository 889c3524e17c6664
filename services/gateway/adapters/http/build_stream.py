"""The SSE stream of one build: its log lines and status changes, as they happen.

It subscribes to the build's live subjects first (`builds.<id>.log`, `builds.<id>.status`),
then sends the stored lines after the client's position (`Last-Event-ID`, or `?after=`)
and the current status, then what arrives live. Each log line is an event `log` whose id
is its line number, so a client that reconnects with `Last-Event-ID` resumes exactly after
the last line it saw; a status change is an event `status` (without id). A gap in the live
lines (a slow client dropped some) is filled from the stored lines. The stream ends after
a final status (completed, failed, canceled) and the lines stored before it.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec
from litestar.response import ServerSentEventMessage
from nats.aio.msg import Msg

from contracts.commands import builds as cmd
from contracts.commands.common import CommandMeta
from contracts.subjects import build_live
from services.gateway.application import Gateway
from services.gateway.domain import Principal

KEEPALIVE_S = 15.0
MAX_QUEUED = 10_000
_encoder = msgspec.json.Encoder()
_batch = msgspec.json.Decoder(cmd.LogBatch)
_change = msgspec.json.Decoder(cmd.StatusChange)


def log_event(line: cmd.LogLine) -> ServerSentEventMessage:
    body = _encoder.encode({"n": line.n, "stream": line.stream, "text": line.text}).decode()
    return ServerSentEventMessage(data=body, event="log", id=line.n)


def status_event(change: cmd.StatusChange) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=_encoder.encode(change).decode(), event="status")


class BuildStream:
    def __init__(self, gateway: Gateway, principal: Principal, build_id: str, meta: CommandMeta) -> None:
        self.gateway, self.principal, self.build_id, self.meta = gateway, principal, build_id, meta
        self.last = 0
        self.status: cmd.Status = "queued"

    async def _page(self) -> list[cmd.LogLine]:
        p = self.principal
        ask = cmd.GetLogs(
            meta=self._meta(),
            org_id=p.org_id,
            user_id=p.user_id,
            build_id=self.build_id,
            after=self.last,
            limit=2000,
        )
        page = await self.gateway.client.call("dispatcher", "logs", ask, cmd.LogPage, timeout=10)
        self.status = page.status
        return page.lines

    def _meta(self) -> CommandMeta:
        """A copy per call: the client stamps each request's deadline on its meta."""
        return msgspec.structs.replace(self.meta, deadline=None)

    async def _current(self) -> cmd.StatusChange:
        p = self.principal
        ask = cmd.GetBuild(meta=self._meta(), org_id=p.org_id, user_id=p.user_id, build_id=self.build_id)
        view = await self.gateway.client.call("dispatcher", "get", ask, cmd.BuildView)
        self.status = view.status
        return cmd.StatusChange(
            build_id=self.build_id,
            status=view.status,
            at=datetime.now(UTC),
            exit_code=view.exit_code,
            error=view.error,
        )

    async def _backfill(self) -> AsyncIterator[ServerSentEventMessage]:
        while True:
            lines = await self._page()
            for line in lines:
                if line.n > self.last:
                    self.last = line.n
                    yield log_event(line)
            if len(lines) < 2000:
                return

    async def events(self, after: int) -> AsyncIterator[ServerSentEventMessage]:
        self.last = after
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def received(msg: Msg) -> None:
            if queue.qsize() < MAX_QUEUED:  # beyond: dropped here, refilled from the store below
                queue.put_nowait(msg)

        sub = await self.gateway.bus.nc.subscribe(build_live(self.build_id), cb=received)
        try:
            async for event in self._backfill():
                yield event
            yield status_event(await self._current())
            if self.status in cmd.TERMINAL:
                return
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ServerSentEventMessage(comment="keepalive")
                    continue
                if msg.subject.endswith(".log"):
                    lines = _batch.decode(msg.data).lines
                    if lines and lines[0].n > self.last + 1:
                        async for event in self._backfill():  # a gap: fill it from the store
                            yield event
                    for line in lines:
                        if line.n > self.last:
                            self.last = line.n
                            yield log_event(line)
                    continue
                change = _change.decode(msg.data)
                if change.status in cmd.TERMINAL:
                    async for event in self._backfill():  # lines stored before the end
                        yield event
                    yield status_event(change)
                    return
                yield status_event(change)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
