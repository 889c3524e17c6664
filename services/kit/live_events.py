"""Events as they happen, for caches that go stale: JetStream ordered consumers from "now".

Ordered consumers deliver to this connection's own inbox (which the NATS permissions allow,
unlike core subscriptions on `events.>`), are ephemeral (nothing to clean up), and do not
replay history after a restart (a restarted process starts with empty caches anyway).
"""

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from contracts.envelope import Envelope, decode_envelope
from contracts.events import decode_payload
from contracts.subjects import event_subject
from services.kit.bus import Bus

log = logging.getLogger(__name__)

OnEvent = Callable[[Envelope, Any], None]  # the envelope and its decoded payload


class LiveEvents:
    def __init__(self, bus: Bus, event_types: Iterable[str], on_event: OnEvent) -> None:
        """`event_types` as `<service>.<event>` (e.g. `mcp_proxy.server_removed`)."""
        self.bus, self.event_types, self.on_event = bus, tuple(event_types), on_event
        self._subs: list[Any] = []

    async def start(self) -> None:
        for event_type in self.event_types:
            self._subs.append(
                await self.bus.js.subscribe(
                    event_subject(event_type),
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
        try:
            envelope = decode_envelope(msg.data)
            payload = decode_payload(envelope)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            log.warning("undecodable event on %s: %s", msg.subject, err)
            return
        self.on_event(envelope, payload)
