"""What the quota service learns from identity: users' orgs and tiers.

A feed (an ordered consumer of `events.identity.>` from the start of the stream) keeps the
directory in memory; `lookup` asks identity directly, for a user the feed has not brought
yet or whose tier may just have changed (an upgrade applies to the very next request).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from contracts.commands.common import CommandMeta
from contracts.commands.identity import ListUsers, UserList
from contracts.envelope import SYSTEM, decode_envelope
from contracts.events import decode_payload
from contracts.events import identity as ev
from contracts.subjects import STREAM, service_events
from services.kit.bus import Bus
from services.kit.rpc import CommandClient, CommandFailed
from services.quota.application import Quota, Unavailable
from services.quota.domain import Account

log = logging.getLogger(__name__)


class IdentityFeed:
    """Applies user registrations and tier changes to the quota directory; `ready` once caught up."""

    def __init__(self, bus: Bus, quota: Quota) -> None:
        self.bus, self.quota = bus, quota
        self.ready = asyncio.Event()
        self._sub: object | None = None
        self._target = 0

    async def start(self) -> None:
        subject = service_events("identity")
        try:
            last = await self.bus.js.get_last_msg(STREAM, subject)
            self._target = last.seq or 0
        except NotFoundError:
            self.ready.set()
        self._sub = await self.bus.js.subscribe(
            subject, cb=self._on_message, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()  # type: ignore[attr-defined]
            self._sub = None

    async def _on_message(self, msg: Msg) -> None:
        try:
            payload = decode_payload(decode_envelope(msg.data))
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("skipping undecodable identity event at seq %s", msg.metadata.sequence.stream)
            payload = None
        if isinstance(payload, ev.UserRegistered):
            self.quota.register(payload.user_id, payload.org_id, payload.tier)
        elif isinstance(payload, ev.TierChanged):
            self.quota.change_tier(payload.user_id, payload.tier)
        if not self.ready.is_set() and msg.metadata.sequence.stream >= self._target:
            self.ready.set()


def identity_lookup(bus: Bus) -> Callable[[str, str], Awaitable[Account | None]]:
    client = CommandClient(bus)

    async def lookup(org_id: str, user_id: str) -> Account | None:
        # A fresh meta per call: the client stamps its deadline on the meta it sends.
        meta = CommandMeta(actor=SYSTEM, correlation_id=f"quota-lookup-{user_id}")
        try:
            request = ListUsers(meta=meta, org_id=org_id)
            users = await client.call("identity", "list_users", request, UserList, timeout=1.5)
        except CommandFailed as failed:
            raise Unavailable(failed.problem.detail) from None
        for user in users.users:
            if user.user_id == user_id:
                return Account(user.user_id, user.org_id, user.tier)
        return None

    return lookup
