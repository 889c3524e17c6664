"""Follows the facts that make this instance's caches stale, from the stream.

Registry changes (`events.mcp_proxy.server_registered|server_removed`, from any instance)
drop the cached catalog and stop the processes of a removed server; secret changes
(`events.secrets.secret_stored|secret_revoked`) drop cached secret values. Ordered
JetStream consumers from "now" (delivered to this connection's own inbox, which the NATS
permissions allow) rather than core subscriptions on `events.>` (which they do not).
"""

import contextlib
import logging
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from contracts.commands.mcp import Scope
from contracts.envelope import decode_envelope
from contracts.events import decode_payload
from contracts.events.mcp import ServerRegistered, ServerRemoved
from contracts.events.secrets import SecretRevoked, SecretStored
from contracts.subjects import event_subject
from services.kit.bus import Bus
from services.mcp_proxy.adapters.secrets import RevealingSecrets
from services.mcp_proxy.application.registry import Registry

log = logging.getLogger(__name__)
SUBJECTS = (
    "mcp_proxy.server_registered",
    "mcp_proxy.server_removed",
    "secrets.secret_stored",
    "secrets.secret_revoked",
)


class Feeds:
    def __init__(self, bus: Bus, registry: Registry, secrets: RevealingSecrets) -> None:
        self.bus, self.registry, self.secrets = bus, registry, secrets
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
        try:
            envelope = decode_envelope(msg.data)
            payload = decode_payload(envelope)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            log.warning("undecodable event on %s: %s", msg.subject, err)
            return
        if isinstance(payload, ServerRegistered | ServerRemoved):
            owner = payload.owner_user_id if payload.scope == "user" else envelope.org_id
            if owner is None:
                return
            scope: Scope = "user" if payload.scope == "user" else "org"
            removed = payload.server if isinstance(payload, ServerRemoved) else None
            self.registry.changed(scope, owner, removed=removed)
        elif isinstance(payload, SecretStored | SecretRevoked):
            self.secrets.invalidate(envelope.org_id, payload.name)
