"""An upstream's requests to the caller's MCP client during one tool call (sampling, elicitation).

The request goes out on the call's notice subject (`mcp.notify.<request_id>`) as a
`ClientRequest` whose id is the call's own counter, in order with the notifications; the
gateway replica streaming the call hands it to the client under an id of its own. The
client's response may reach any replica, which sends it as a `ClientAnswer` request to
`mcp.answer.<request_id>.<seq>`: this instance listens there for the life of the call (from
the first request on) and answers with an `AnswerReceipt`.

Tenants are walls: an answer is taken only from the call's own user (the gateway verified the
session; this checks again), once, and only while the call waits. Params and answers are user
content: they are never logged and never recorded.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from contracts.commands.mcp import AnswerReceipt, ClientAnswer, ClientRequest
from contracts.subjects import mcp_answers
from services.kit.bus import Bus
from services.mcp_proxy.application.ports import Asked

log = logging.getLogger(__name__)

MAX_OPEN: Final = 16  # requests of one call waiting for the client at once
INTERNAL_ERROR: Final = -32603
_encode = msgspec.json.Encoder().encode
_decode_answer = msgspec.json.Decoder(ClientAnswer).decode


class _Feature(msgspec.Struct):
    mode: str = "form"


_decode_feature = msgspec.json.Decoder(_Feature).decode


def needed_feature(method: str, params: bytes) -> str | None:
    """The client capability a request needs (contracts CLIENT_FEATURES); None: not relayed."""
    if method == "sampling/createMessage":
        return "sampling"
    if method != "elicitation/create":
        return None
    try:
        return f"elicitation.{_decode_feature(params).mode}"
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _receipt(accepted: bool, detail: str = "") -> bytes:
    return _encode(AnswerReceipt(accepted=accepted, detail=detail))


class ClientAsks:
    """The requests of one call waiting for its client, and the subscription their answers use."""

    def __init__(self, bus: Bus, request_id: str, user_id: str, send: Callable[[bytes], None]) -> None:
        self.bus, self.request_id, self.user_id, self._send = bus, request_id, user_id, send
        self._seq = 0
        self._open: dict[int, asyncio.Future[Asked]] = {}
        self._sub: Subscription | None = None
        self._ended = False

    async def ask(self, method: str, params: bytes) -> Asked:
        if self._ended:
            return Asked(code=INTERNAL_ERROR, message="The tool call is over; the client was not asked.")
        if len(self._open) >= MAX_OPEN:
            return Asked(code=INTERNAL_ERROR, message="Too many requests to the client at once.")
        if self._sub is None:  # SUB goes out before the request does, on the same connection
            self._sub = await self.bus.nc.subscribe(mcp_answers(self.request_id), cb=self._answered)
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[Asked] = asyncio.get_running_loop().create_future()
        self._open[seq] = fut
        self._send(_encode(ClientRequest(id=seq, method=method, params=msgspec.Raw(params))))
        try:
            return await fut
        finally:
            self._open.pop(seq, None)

    async def _answered(self, msg: Msg) -> None:
        detail = self._take(msg)
        if msg.reply:
            try:
                await self.bus.nc.publish(msg.reply, _receipt(detail is None, detail or ""))
            except Exception as err:  # the gateway then reports that nobody confirmed
                log.info("could not confirm a client answer: %s", type(err).__name__)

    def _take(self, msg: Msg) -> str | None:
        """None when the answer was handed to the waiting request; else why it was refused."""
        try:
            seq = int(msg.subject.rsplit(".", 1)[1])
            answer = _decode_answer(msg.data)
        except (ValueError, IndexError, msgspec.DecodeError, msgspec.ValidationError):
            return "The answer could not be read."
        if answer.user_id != self.user_id:
            log.warning("refused a client answer for a call of another user (request %s)", self.request_id)
            return "No request of yours waits for this answer."
        fut = self._open.get(seq)
        if fut is None or fut.done():
            return "The request this answers is no longer waiting (answered already, or its call ended)."
        if answer.error is not None:
            err = answer.error
            fut.set_result(Asked(code=err.code, message=err.message, data=bytes(err.data) or None))
        elif answer.result and memoryview(answer.result)[:1] == b"{":
            fut.set_result(Asked(result=bytes(answer.result)))
        else:
            return "A response needs a `result` object or an `error`."
        return None

    async def end(self) -> None:
        """The call is over: what still waits is answered with an error, and listening stops."""
        self._ended = True
        for fut in self._open.values():
            if not fut.done():
                fut.set_result(
                    Asked(code=INTERNAL_ERROR, message="The tool call ended before the client answered.")
                )
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:  # drained, not dropped: an answer already delivered still gets its receipt
                await sub.drain()
            except Exception:
                log.debug("answer subscription of a finished call already gone")
