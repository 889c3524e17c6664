"""The server limit over the quota service (`cmd.quota.reserve|commit|release`, kind "server").

Enabled with GATEHOUSE_MCP_QUOTA=on, like the call gate. A user's own server holds one
unit under the key `server:user:<name>`: the same name always names the same reservation,
so registering it again never counts twice. The quota service unreachable means no new
registration (503); a commit or release that fails is logged and left to the quota
service's expiry (a held unit is released after its timeout).
"""

import logging

from contracts.commands.common import CommandMeta
from contracts.commands.mcp import Caller
from contracts.commands.quota import Commit, Release, Reserve, Settled
from contracts.commands.quota import Reservation as QuotaReservation
from contracts.envelope import Actor
from services.kit.rpc import CommandClient, CommandFailed
from services.mcp_proxy.application.ports import QuotaExceeded

log = logging.getLogger(__name__)
META = CommandMeta(actor=Actor(kind="service", id="mcp_proxy"), correlation_id="server-quota")


class ServerQuota:
    def __init__(self, client: CommandClient, timeout_s: float = 5.0) -> None:
        self.client, self.timeout_s = client, timeout_s

    async def reserve(self, caller: Caller, key: str) -> None:
        request = Reserve(meta=META, user_id=caller.user_id, org_id=caller.org_id, kind="server", key=key)
        answer = await self.client.call("quota", "reserve", request, QuotaReservation, timeout=self.timeout_s)
        if not answer.granted:
            raise QuotaExceeded(answer.sentence or "Your server limit is reached.", answer.retry_after_s)

    async def commit(self, caller: Caller, key: str) -> None:
        await self._settle("commit", Commit(meta=META, user_id=caller.user_id, key=key))

    async def release(self, caller: Caller, key: str, reason: str) -> None:
        await self._settle("release", Release(meta=META, user_id=caller.user_id, key=key, reason=reason))

    async def _settle(self, verb: str, request: Commit | Release) -> None:
        try:
            await self.client.call("quota", verb, request, Settled, timeout=self.timeout_s)
        except CommandFailed as failed:  # a held unit expires on its own
            log.warning("quota %s of %s failed: %s", verb, request.key, failed.problem.detail)
