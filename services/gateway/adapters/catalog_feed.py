"""Registry changes from mcp_proxy, as they happen, on every gateway replica.

Two JetStream ordered consumers from "now" (`DeliverPolicy.NEW`), one per subject
(`events.mcp_proxy.server_registered`, `…server_removed`), so the replica hears of every
server registered or removed through any replica and any mcp_proxy instance, without the
high-volume `tool_call_completed` events. Ordered consumers are ephemeral: nothing to clean up,
and a replica that restarts does not replay history (its streams are new too).
"""

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import msgspec
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from contracts.envelope import decode_envelope
from contracts.events import decode_payload
from contracts.events.mcp import ServerRegistered, ServerRemoved
from contracts.subjects import event_subject
from services.gateway.mcp.listening import CatalogChange
from services.kit.bus import Bus

log = logging.getLogger(__name__)

SUBJECTS: Final = ("mcp_proxy.server_registered", "mcp_proxy.server_removed")


def change_of(raw: bytes) -> CatalogChange | None:
    """The change an event describes; None for anything else (or undecodable)."""
    try:
        envelope = decode_envelope(raw)
        payload = decode_payload(envelope)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        log.warning("undecodable registry event: %s", err)
        return None
    if not isinstance(payload, ServerRegistered | ServerRemoved):
        return None
    return CatalogChange(payload.server, payload.scope, payload.owner_user_id, envelope.org_id)


class CatalogFeed:
    def __init__(self, bus: Bus, on_change: Callable[[CatalogChange], None]) -> None:
        self.bus, self.on_change = bus, on_change
        self._subs: list[Any] = []

    async def start(self) -> None:
        for subject in SUBJECTS:
            self._subs.append(
                await self.bus.js.subscribe(
                    event_subject(subject),
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.NEW,
                    cb=self._on,
                )
            )

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def _on(self, msg: Msg) -> None:
        change = change_of(msg.data)
        if change is not None:
            self.on_change(change)
