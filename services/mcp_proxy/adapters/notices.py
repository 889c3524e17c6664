"""An upstream's notifications during one tool call, sent on to the caller over core NATS.

The gateway replica that took the call subscribes to `mcp.notify.<request_id>` before it
sends `CallTool`, and asks for what its MCP client can receive (`progress_token`,
`log_level`). Each message is one JSON-RPC notification, ready to forward:

- `notifications/progress` with the upstream's params, its token replaced by the client's;
- `notifications/message` (a log line) at the requested level or above;
- a `ClientRequest` (sampling, elicitation) when the caller's client declared that capability
  (`CallTool.client_features`); its answer comes back on `mcp.answer.…` (adapters/asks.py).

All are redacted like log lines (registered secret values, API keys) and published in
order, before the call's outcome (`flush`): NATS keeps one connection's messages in order,
so the gateway has every notification by the time the outcome arrives. Nothing else of the
call (arguments, stderr) is published here.
"""

import asyncio
import logging
import re
from typing import Final

import msgspec

from contracts.commands.mcp import CLIENT_FEATURES, CallTool
from contracts.subjects import mcp_notices
from services.kit.bus import Bus
from services.kit.redaction import redact
from services.mcp_proxy.adapters.asks import ClientAsks, needed_feature
from services.mcp_proxy.application.ports import Asked, CallListener

log = logging.getLogger(__name__)

LEVELS: Final = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
_TOKEN: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # a request id usable as one subject token
_encoder = msgspec.json.Encoder()
_decode_params = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode


class _Level(msgspec.Struct):
    level: str = "info"


_decode_level = msgspec.json.Decoder(_Level).decode


def progress_notification(params: bytes, token: bytes) -> bytes | None:
    """The upstream's progress params as the client's notification (None if malformed)."""
    try:
        fields = _decode_params(params)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if "progress" not in fields:
        return None
    fields["progressToken"] = msgspec.Raw(token)
    return b'{"jsonrpc":"2.0","method":"notifications/progress","params":' + _encoder.encode(fields) + b"}"


def log_notification(params: bytes, floor: int) -> bytes | None:
    """A log notification at `LEVELS[floor]` or above, as the client gets it (None: dropped)."""
    try:
        level = _decode_level(params).level
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if level not in LEVELS or LEVELS.index(level) < floor:
        return None
    return b'{"jsonrpc":"2.0","method":"notifications/message","params":' + params + b"}"


class BusListener:
    def __init__(
        self,
        bus: Bus,
        call: CallTool,
        token: bytes | None,
        floor: int | None,
        features: frozenset[str] = frozenset(),
    ) -> None:
        self.bus, self.subject = bus, mcp_notices(call.request_id)
        self._token, self._floor, self._features = token, floor, features
        self.wants_progress = token is not None
        self.wants_logs = floor is not None
        self._last: asyncio.Task[None] | None = None
        self._asks = ClientAsks(bus, call.request_id, call.caller.user_id, self._send) if features else None

    def progress(self, params: bytes) -> None:
        if self._token is not None:
            self._send(progress_notification(params, self._token))

    def log(self, params: bytes) -> None:
        if self._floor is not None:
            self._send(log_notification(params, self._floor))

    def accepts(self, method: str, params: bytes) -> bool:
        return self._asks is not None and needed_feature(method, params) in self._features

    async def ask(self, method: str, params: bytes) -> Asked:
        assert self._asks is not None, "ask only what accepts() allows"
        return await self._asks.ask(method, params)

    def _send(self, message: bytes | None) -> None:
        if message is None:
            return
        clean = redact(message.decode("utf-8", "replace")).encode()
        self._last = asyncio.get_running_loop().create_task(self._publish(self._last, clean))

    async def _publish(self, before: "asyncio.Task[None] | None", message: bytes) -> None:
        if before is not None:
            await asyncio.wait({before})  # one after the other, whatever the scheduling
        try:
            await self.bus.nc.publish(self.subject, message)
        except Exception as err:  # a lost notification must not fail the call
            log.info("could not publish a notification of a tool call: %s", type(err).__name__)

    async def flush(self) -> None:
        if self._asks is not None:
            await self._asks.end()
        if self._last is not None:
            await asyncio.wait({self._last})


class BusNotices:
    """Makes a listener for each call that asks for notifications (CallTool.progress_token,
    log_level) or whose client answers requests (client_features)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def listener(self, call: CallTool) -> CallListener | None:
        token = None if call.progress_token is None else _encoder.encode(call.progress_token)
        floor = LEVELS.index(call.log_level) if call.log_level in LEVELS else None
        features = frozenset(f for f in call.client_features if f in CLIENT_FEATURES)
        if (token is None and floor is None and not features) or not _TOKEN.match(call.request_id):
            return None
        return BusListener(self.bus, call, token, floor, features)
