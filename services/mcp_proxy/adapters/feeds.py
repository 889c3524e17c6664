"""Follows the facts that make this instance's caches stale, from the stream.

Registry changes (`events.mcp_proxy.server_registered|server_removed`, from any instance)
drop the cached catalog and stop the processes of a removed server; secret changes
(`events.secrets.secret_stored|secret_revoked`) drop cached secret values.
"""

from typing import Any

from contracts.commands.mcp import Scope
from contracts.envelope import Envelope
from contracts.events.mcp import ServerRegistered, ServerRemoved
from contracts.events.secrets import SecretRevoked, SecretStored
from services.kit.bus import Bus
from services.kit.live_events import LiveEvents
from services.mcp_proxy.adapters.secrets import RevealingSecrets
from services.mcp_proxy.application.registry import Registry

EVENT_TYPES = (
    "mcp_proxy.server_registered",
    "mcp_proxy.server_removed",
    "secrets.secret_stored",
    "secrets.secret_revoked",
)


class Feeds(LiveEvents):
    def __init__(self, bus: Bus, registry: Registry, secrets: RevealingSecrets) -> None:
        super().__init__(bus, EVENT_TYPES, self._apply)
        self.registry, self.secrets = registry, secrets

    def _apply(self, envelope: Envelope, payload: Any) -> None:
        if isinstance(payload, ServerRegistered | ServerRemoved):
            owner = payload.owner_user_id if payload.scope == "user" else envelope.org_id
            if owner is None:
                return
            scope: Scope = "user" if payload.scope == "user" else "org"
            removed = payload.server if isinstance(payload, ServerRemoved) else None
            self.registry.changed(scope, owner, removed=removed)
        elif isinstance(payload, SecretStored | SecretRevoked):
            self.secrets.invalidate(envelope.org_id, payload.name)
