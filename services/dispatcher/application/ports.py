"""What the use cases need from the world, and the refusals those collaborators raise."""

from datetime import datetime
from typing import Protocol

import msgspec

from contracts.commands import builds as cmd
from contracts.commands.common import CommandMeta
from services.dispatcher.domain import BuildError, Conflict


class MissingKey(Conflict):
    """The user has no agent key: the build is refused before anything is reserved."""


class OverLimit(BuildError):
    def __init__(self, sentence: str, retry_after_s: int | None) -> None:
        super().__init__(sentence)
        self.retry_after_s = retry_after_s


class Unavailable(BuildError):
    pass


class KeyDirectory(Protocol):
    async def has_key(self, org_id: str, user_id: str, key_name: str, meta: CommandMeta) -> bool: ...


class Slots(Protocol):
    async def reserve(self, org_id: str, user_id: str, build_id: str, meta: CommandMeta) -> None:
        """Raises OverLimit with the quota's sentence when the user has no free slot."""

    async def release(self, user_id: str, build_id: str, reason: str) -> None: ...


class WorkQueue(Protocol):
    async def publish(self, order: cmd.BuildOrder) -> None: ...


class Live(Protocol):
    def status(self, change: cmd.StatusChange) -> None: ...


class Nodes(Protocol):
    async def stop(self, node: str, build_id: str, meta: CommandMeta) -> bool: ...


class Heartbeats(Protocol):
    async def alive(self, build_id: str) -> bool: ...


class LogStore(Protocol):
    async def page(self, build_id: str, after: int, limit: int) -> tuple[list[cmd.LogLine], bool]: ...


class ActiveBuild(msgspec.Struct, kw_only=True):
    """A row of the index of queued and running builds."""

    build_id: str
    user_id: str
    status: str
    node: str | None
    pid: int | None
    queued_at: datetime
    started_at: datetime | None


class Index(Protocol):
    async def running(self, user_id: str) -> list[ActiveBuild]: ...
    async def active(self) -> list[ActiveBuild]: ...
