"""Registry changes from mcp_proxy, as they happen, on every gateway replica.

`events.mcp_proxy.server_registered` and `…server_removed` from "now" (services/kit/
live_events.py), so the replica hears of every server registered or removed through any
replica and any mcp_proxy instance, without the high-volume `tool_call_completed` events.
"""

from collections.abc import Callable
from typing import Any, Final

from contracts.envelope import Envelope
from contracts.events.mcp import ServerRegistered, ServerRemoved
from services.gateway.mcp.listening import CatalogChange
from services.kit.bus import Bus
from services.kit.live_events import LiveEvents

EVENT_TYPES: Final = ("mcp_proxy.server_registered", "mcp_proxy.server_removed")


def change_of(envelope: Envelope, payload: Any) -> CatalogChange | None:
    """The change an event describes; None for anything else."""
    if not isinstance(payload, ServerRegistered | ServerRemoved):
        return None
    return CatalogChange(payload.server, payload.scope, payload.owner_user_id, envelope.org_id)


class CatalogFeed(LiveEvents):
    def __init__(self, bus: Bus, on_change: Callable[[CatalogChange], None]) -> None:
        super().__init__(bus, EVENT_TYPES, self._apply)
        self.on_change = on_change

    def _apply(self, envelope: Envelope, payload: Any) -> None:
        change = change_of(envelope, payload)
        if change is not None:
            self.on_change(change)
