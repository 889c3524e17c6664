"""The dispatcher's partners, over their commands: secrets (is there a key?), quota (a slot),
runner nodes (stop one build), and the slot keeper that gives a slot back when a build ends.
"""

import logging
from typing import Any

from contracts.commands import builds as cmd
from contracts.commands import quota
from contracts.commands import secrets as sec
from contracts.commands.common import CommandMeta
from contracts.envelope import Actor
from services.dispatcher.adapters.follower import Event, Follower
from services.dispatcher.application import OverLimit
from services.kit.rpc import CommandClient, CommandFailed

log = logging.getLogger(__name__)
SERVICE = Actor(kind="service", id="dispatcher")


class SecretsKeys:
    """Asks for the secret's metadata only: the dispatcher never sees an agent key."""

    def __init__(self, client: CommandClient) -> None:
        self.client = client

    async def has_key(self, org_id: str, user_id: str, key_name: str, meta: CommandMeta) -> bool:
        ask = sec.GetSecret(meta=meta, org_id=org_id, user_id=user_id, scope="user", name=key_name)
        try:
            await self.client.call("secrets", "get", ask, sec.SecretView, timeout=5)
        except CommandFailed as failed:
            if failed.problem.status == 404:
                return False  # never set, or revoked
            raise
        return True


class QuotaSlots:
    """One `build_slot` reservation per build, keyed by the build id, held for its whole life."""

    def __init__(self, client: CommandClient) -> None:
        self.client = client

    async def reserve(self, org_id: str, user_id: str, build_id: str, meta: CommandMeta) -> None:
        ask = quota.Reserve(meta=meta, user_id=user_id, org_id=org_id, kind="build_slot", key=build_id)
        got = await self.client.call("quota", "reserve", ask, quota.Reservation, timeout=5)
        if not got.granted:
            raise OverLimit(got.sentence or "Concurrent build limit reached.", got.retry_after_s)

    async def release(self, user_id: str, build_id: str, reason: str) -> None:
        meta = CommandMeta(actor=SERVICE, correlation_id=build_id)
        ask = quota.Release(meta=meta, user_id=user_id, key=build_id, reason=reason)
        await self.client.call("quota", "release", ask, quota.Settled, timeout=5)


class RunnerNodes:
    def __init__(self, client: CommandClient) -> None:
        self.client = client

    async def stop(self, node: str, build_id: str, meta: CommandMeta) -> bool:
        ask = cmd.StopSession(meta=meta, build_id=build_id)
        done = await self.client.call("session_runner", cmd.stop_verb(node), ask, cmd.Stopping, timeout=3)
        return done.found


class SlotKeeper(Follower):
    """Releases the slot of every build that ended (at least once; a release is idempotent)."""

    def __init__(self, slots: QuotaSlots, *args: Any, **kwargs: Any) -> None:
        super().__init__("slots", *args, **kwargs)
        self.slots = slots

    async def handle(self, events: list[Event], position: int) -> None:
        for _, e in events:
            if type(e).__qualname__ != "Build.Finished":
                continue
            user_id = str((getattr(e, "meta", None) or {}).get("user_id", ""))
            try:
                await self.slots.release(user_id, str(e.originator_id), f"build {e.status}")
            except CommandFailed as failed:
                if failed.problem.status != 404:  # 404: quota does not know the user or the key
                    raise
        await self.in_thread(self.save_position, position)
