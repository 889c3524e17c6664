"""The quota gate over the quota service (`cmd.quota.reserve|commit|release`, kind "call").

Enabled with GATEHOUSE_MCP_QUOTA=on (docs/mcp.md); without it mcp_proxy lets every call
through (AllowAll) and the quota service still counts calls from ToolCallCompleted events.
A reservation is keyed by the call's request id, so a retried request is charged once.
Commit and release are sent after the reply has gone back (they are idempotent, and an
unsettled reservation expires on its own). The quota service unreachable means no call:
`reserve` fails with 503.
"""

import asyncio
import logging

from contracts.commands.common import CommandMeta
from contracts.commands.mcp import Caller
from contracts.commands.quota import Commit, Release, Reserve, Settled
from contracts.commands.quota import Reservation as QuotaReservation
from contracts.envelope import Actor
from services.kit.rpc import CommandClient, CommandFailed
from services.mcp_proxy.application.ports import QuotaExceeded, Reservation

log = logging.getLogger(__name__)
META = CommandMeta(actor=Actor(kind="service", id="mcp_proxy"), correlation_id="quota")


class QuotaService:
    def __init__(self, client: CommandClient, timeout_s: float = 5.0) -> None:
        self.client, self.timeout_s = client, timeout_s
        self._settling: set[asyncio.Task[None]] = set()

    async def reserve(self, caller: Caller, request_id: str, server: str, tool: str) -> Reservation:
        request = Reserve(
            meta=META, user_id=caller.user_id, org_id=caller.org_id, kind="call", key=request_id
        )
        answer = await self.client.call("quota", "reserve", request, QuotaReservation, timeout=self.timeout_s)
        if not answer.granted:
            raise QuotaExceeded(answer.sentence or "Your tool call quota is used up.", answer.retry_after_s)
        return Reservation(request_id, caller.user_id)

    async def commit(self, reservation: Reservation) -> None:
        self._later("commit", Commit(meta=META, user_id=reservation.user_id, key=reservation.request_id))

    async def release(self, reservation: Reservation) -> None:
        self._later("release", Release(meta=META, user_id=reservation.user_id, key=reservation.request_id))

    def _later(self, verb: str, request: Commit | Release) -> None:
        async def settle() -> None:
            try:
                await self.client.call("quota", verb, request, Settled, timeout=self.timeout_s)
            except CommandFailed as failed:  # the reservation expires on its own
                log.warning("quota %s of %s failed: %s", verb, request.key, failed.problem.detail)

        task = asyncio.get_running_loop().create_task(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
