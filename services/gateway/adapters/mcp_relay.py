"""What gateway replicas tell each other about MCP traffic, on core NATS (no sticky routing).

- `mcp.sse.<session_id>`: a JSON-RPC message for a legacy SSE stream. The replica holding
  the stream subscribes; a replica that took the client's POST publishes the answer there.
- `mcp.cancel`: `notifications/cancelled` arrived on a replica that is not running the call;
  the one that is forwards it to mcp_proxy.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final

import msgspec
from nats.aio.msg import Msg

from services.gateway.mcp.exchange import CancelNotice
from services.kit.bus import Bus

log = logging.getLogger(__name__)

CANCEL_SUBJECT: Final = "mcp.cancel"


def sse_subject(session_id: str) -> str:
    return f"mcp.sse.{session_id}"


_encoder = msgspec.json.Encoder()
_cancel_decoder = msgspec.json.Decoder(CancelNotice)


class Relay:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._streams: dict[str, asyncio.Queue[bytes]] = {}

    async def start(self, on_cancel: Callable[[CancelNotice], Awaitable[None]]) -> None:
        async def cancelled(msg: Msg) -> None:
            try:
                notice = _cancel_decoder.decode(msg.data)
            except msgspec.DecodeError:
                return
            await on_cancel(notice)

        await self.bus.nc.subscribe(CANCEL_SUBJECT, cb=cancelled)

    async def broadcast_cancel(self, notice: CancelNotice) -> None:
        await self.bus.nc.publish(CANCEL_SUBJECT, _encoder.encode(notice))

    @asynccontextmanager
    async def stream(self, session_id: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        """Messages for one SSE stream held by this replica, from wherever they were answered."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def arrived(msg: Msg) -> None:
            queue.put_nowait(msg.data)

        self._streams[session_id] = queue
        sub = await self.bus.nc.subscribe(sse_subject(session_id), cb=arrived)
        await self.bus.nc.flush()  # subscribed before the client learns where to POST
        try:
            yield queue
        finally:
            self._streams.pop(session_id, None)
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("SSE relay subscription for a closed stream already gone")

    async def deliver(self, session_id: str, message: bytes) -> None:
        queue = self._streams.get(session_id)
        if queue is not None:
            queue.put_nowait(message)
        else:
            await self.bus.nc.publish(sse_subject(session_id), message)
