"""The gateway's use cases: authenticate locally, forward commands to the owning service."""

import asyncio
import time
import uuid
from datetime import UTC, datetime

import msgspec

from contracts.commands.common import CommandMeta
from contracts.commands.identity import TouchKey
from contracts.envelope import Actor
from contracts.events.identity import ApiKeyIssued
from services.gateway.domain import AccessView, Denied, Principal
from services.identity.domain import hash_key, looks_like_key
from services.kit import telemetry
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.rpc import CommandClient

TOUCH_EVERY_S = 60.0


class Gateway:
    def __init__(
        self, settings: Settings, bus: Bus, view: AccessView, view_ready: asyncio.Event | None = None
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.view = view
        self.view_ready = view_ready or asyncio.Event()
        self.client = CommandClient(bus)
        self.pepper = settings.require_pepper()
        self._touched: dict[str, float] = {}

    def authenticate(self, api_key: str) -> Principal | Denied:
        if not looks_like_key(api_key):
            return Denied.UNKNOWN
        return self.view.authenticate(hash_key(api_key, self.pepper), datetime.now(UTC))

    def learn(self, *facts: msgspec.Struct) -> None:
        """Applies what a command just did to this gateway's view at once (the events follow)."""
        for fact in facts:
            self.view.apply(fact)

    def issued_key_fact(
        self,
        user_id: str,
        key_id: str,
        api_key: str,
        name: str,
        created_at: datetime,
        expires_at: datetime | None,
    ) -> ApiKeyIssued:
        return ApiKeyIssued(
            key_id=key_id,
            user_id=user_id,
            name=name,
            prefix=api_key[:12],
            key_hash=hash_key(api_key, self.pepper),
            created_at=created_at,
            expires_at=expires_at,
        )

    async def note_use(self, principal: Principal) -> None:
        """Tells identity a key was used, at most once a minute per key from this gateway."""
        now = time.monotonic()
        last = self._touched.get(principal.key_id)
        if last is not None and now - last < TOUCH_EVERY_S:
            return
        self._touched[principal.key_id] = now
        await self.client.send(
            "identity",
            "touch_key",
            TouchKey(user_id=principal.user_id, key_id=principal.key_id, used_at=datetime.now(UTC)),
        )

    @staticmethod
    def meta(
        principal: Principal | None, ip: str | None, user_agent: str | None, request_id: str | None
    ) -> CommandMeta:
        actor = (
            Actor(
                kind="user",
                id=principal.user_id,
                key_id=principal.key_id,
                ip=ip,
                user_agent=user_agent,
            )
            if principal
            else Actor(kind="anonymous", id="anonymous", ip=ip, user_agent=user_agent)
        )
        return CommandMeta(
            actor=actor,
            correlation_id=request_id or str(uuid.uuid4()),
            trace=telemetry.current_trace(),
        )
