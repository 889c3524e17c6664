"""An upstream's own `notifications/tools/list_changed`, told to the gateway replicas.

A stdio process or HTTP/SSE session of (user, server) that hears it from its upstream drops
its cached tool list and calls `changed`; this publishes `UpstreamToolsChanged` on
`mcp.tools_changed.<user_id>` (core NATS: a change nobody is listening for is not kept), at
most once a second per (user, server) (domain/throttle.py: a burst is one message now and one
at the end of the window). Every gateway replica turns it into `notifications/tools/list_changed`
on that user's MCP streams (services/gateway/adapters/upstream_changes.py).
"""

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Final

import msgspec

from contracts.commands.mcp import UpstreamToolsChanged
from contracts.subjects import mcp_tools_changed
from services.kit.bus import Bus
from services.mcp_proxy.application.ports import Target
from services.mcp_proxy.domain.throttle import Throttle

log = logging.getLogger(__name__)

INTERVAL_S: Final = 1.0
_TOKEN: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # a user id usable as one subject token
_encoder = msgspec.json.Encoder()


class ToolChanges:
    def __init__(
        self, bus: Bus, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.bus, self._clock = bus, clock
        self._throttle = Throttle(interval_s)
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._publishing: set[asyncio.Task[None]] = set()
        self.published = 0  # messages sent (for tests)

    def changed(self, target: Target) -> None:
        """The upstream of `target` says its tools changed (called on the event loop)."""
        if not _TOKEN.match(target.user_id):
            return
        key = (target.user_id, target.server)
        message = UpstreamToolsChanged(user_id=target.user_id, org_id=target.org_id, server=target.server)
        delay = self._throttle.offer(key, self._clock())
        if delay is None:
            return
        if delay <= 0:
            self._publish(message)
            return
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._trailing, key, message)

    def _trailing(self, key: tuple[str, str], message: UpstreamToolsChanged) -> None:
        self._timers.pop(key, None)
        self._throttle.sent(key, self._clock())
        self._publish(message)

    def _publish(self, message: UpstreamToolsChanged) -> None:
        self.published += 1
        task = asyncio.get_running_loop().create_task(self._send(message))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _send(self, message: UpstreamToolsChanged) -> None:
        try:
            await self.bus.nc.publish(mcp_tools_changed(message.user_id), _encoder.encode(message))
        except Exception as err:  # a lost notice costs a client a stale list, never a call
            log.info("could not publish an upstream's tools change: %s", type(err).__name__)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._publishing:
            await asyncio.gather(*self._publishing, return_exceptions=True)
