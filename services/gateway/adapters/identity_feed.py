"""Keeps the gateway's AccessView in step with `events.identity.>` on the stream."""

import asyncio
import logging

import msgspec
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from contracts.envelope import decode_envelope
from contracts.events import decode_payload
from contracts.subjects import STREAM, service_events
from services.gateway.domain import AccessView
from services.kit.bus import Bus

log = logging.getLogger(__name__)


class IdentityFeed:
    """An ordered consumer from the start of the stream; `ready` once it has caught up."""

    def __init__(self, bus: Bus, view: AccessView) -> None:
        self.bus, self.view = bus, view
        self.ready = asyncio.Event()
        self._sub: object | None = None
        self._target = 0

    async def start(self) -> None:
        subject = service_events("identity")
        try:
            last = await self.bus.js.get_last_msg(STREAM, subject)
            self._target = last.seq or 0
        except NotFoundError:
            self.ready.set()  # nothing to catch up on
        self._sub = await self.bus.js.subscribe(
            subject, cb=self._on_message, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()  # type: ignore[attr-defined]

    async def _on_message(self, msg: Msg) -> None:
        try:
            payload = decode_payload(decode_envelope(msg.data))
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("skipping undecodable identity event at seq %s", msg.metadata.sequence.stream)
            payload = None
        if payload is not None:
            self.view.apply(payload)
        if not self.ready.is_set() and msg.metadata.sequence.stream >= self._target:
            self.ready.set()
