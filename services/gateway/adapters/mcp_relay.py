"""What gateway replicas tell each other about MCP traffic, on core NATS (no sticky routing).

- `mcp.sse.<session_id>`: a JSON-RPC message for a legacy SSE stream. The replica holding
  the stream subscribes; a replica that took the client's POST publishes the answer there.
- `mcp.cancel`: `notifications/cancelled` arrived on a replica that is not running the call;
  the one that is forwards it to mcp_proxy.

And from mcp_proxy: `mcp.notify.<request_id>` (contracts/subjects.py), the progress and log
notifications of one tool call and the upstream's requests to the client, heard by the
replica that sent the call (`listen`). To mcp_proxy: `mcp.answer.<request_id>.<seq>`, the
client's answer to such a request, from whichever replica the client POSTed it to (`answer`).
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from contracts.commands.mcp import AnswerReceipt
from contracts.subjects import mcp_answer, mcp_notices
from services.gateway.mcp.exchange import CancelNotice
from services.kit.bus import Bus

log = logging.getLogger(__name__)

CANCEL_SUBJECT: Final = "mcp.cancel"
ANSWER_TIMEOUT_S: Final = 5.0
_NOT_WAITING: Final = AnswerReceipt(
    accepted=False, detail="The request this answers is no longer waiting (its tool call ended)."
)


def sse_subject(session_id: str) -> str:
    return f"mcp.sse.{session_id}"


_encoder = msgspec.json.Encoder()
_cancel_decoder = msgspec.json.Decoder(CancelNotice)
_receipt_decoder = msgspec.json.Decoder(AnswerReceipt)


class NoticeInbox:
    """The notifications of one call, in the order mcp_proxy published them.

    A subscription without a callback: nats-py's reader appends each message to its queue
    while it parses the connection, so every notification published before the call's
    outcome is in the queue by the time the outcome is delivered (`drain` then takes them).
    A callback subscription would hand them over on a task of its own, after the outcome.
    """

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub
        self._queue: asyncio.Queue[Msg] = sub._pending_queue  # nats-py 2.x, see above

    async def next(self) -> bytes:
        return self._taken(await self._queue.get())  # cancel-safe: an item not taken stays queued

    def drain(self) -> list[bytes]:
        return [self._taken(self._queue.get_nowait()) for _ in range(self._queue.qsize())]

    def _taken(self, msg: Msg) -> bytes:
        self._sub._pending_size -= len(msg.data)
        return msg.data


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
    async def listen(self, request_id: str) -> AsyncIterator[NoticeInbox]:
        """Subscribed before the call is sent: one connection keeps SUB and the command in order."""
        sub = await self.bus.nc.subscribe(mcp_notices(request_id))
        try:
            yield NoticeInbox(sub)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("notice subscription of a finished call already gone")

    async def answer(self, request_id: str, seq: int, answer: bytes) -> AnswerReceipt | None:
        """Hands a client's answer to the mcp_proxy instance whose call waits for it; None when
        nobody confirmed it in time."""
        try:
            reply = await self.bus.nc.request(mcp_answer(request_id, seq), answer, timeout=ANSWER_TIMEOUT_S)
        except NoRespondersError:
            return _NOT_WAITING  # the call is over: nobody listens for its answers any more
        except NatsTimeout:
            return None
        try:
            return _receipt_decoder.decode(reply.data)
        except msgspec.DecodeError:
            return None

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
