"""An upstream's own tools changes, from mcp_proxy, on every gateway replica.

mcp_proxy publishes `UpstreamToolsChanged` on `mcp.tools_changed.<user_id>` (core NATS) when a
user's upstream process or session sends `notifications/tools/list_changed`
(services/mcp_proxy/adapters/tool_changes.py). Every replica subscribes, without a queue
group: the user's streams may be on any of them. Only mcp_proxy may publish there
(services/kit/natsauth.py).
"""

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg

from contracts.commands.mcp import UpstreamToolsChanged
from contracts.subjects import MCP_TOOLS_CHANGED
from services.gateway.mcp.listening import UpstreamChange
from services.kit.bus import Bus

log = logging.getLogger(__name__)
_decode = msgspec.json.Decoder(UpstreamToolsChanged).decode


def change_of(subject: str, data: bytes) -> UpstreamChange | None:
    """The change a message describes; None when it is malformed or its subject names another
    user than its body."""
    try:
        message = _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if subject.rpartition(".")[2] != message.user_id:
        return None
    return UpstreamChange(message.user_id, message.server)


class UpstreamChanges:
    def __init__(self, bus: Bus, on_change: Callable[[UpstreamChange], None]) -> None:
        self.bus, self.on_change = bus, on_change
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.bus.nc.subscribe(MCP_TOOLS_CHANGED, cb=self._on)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on(self, msg: Msg) -> None:
        change = change_of(msg.subject, msg.data)
        if change is None:
            log.warning("malformed message on %s", msg.subject)
            return
        self.on_change(change)
