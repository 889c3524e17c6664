"""The quota gate over the quota service (`cmd.quota.reserve|release|record_usage`).

Enabled with GATEHOUSE_MCP_QUOTA=on (docs/mcp.md); without it mcp_proxy lets every call
through (AllowAll). A reservation is keyed by the call's request id, so a retried request
is charged once. Charges and releases are sent after the reply has gone back (they are
idempotent, and an unsettled reservation expires on its own): a call that reached its
upstream is charged in the next `record_usage` message (many calls each, every 20 ms), a
hold that never reached it is released at once. The quota service unreachable means no
call: `reserve` fails with 503.

Unmetered users (a tier with unlimited calls): the quota service answers their reservation
with `unmetered_for_s`. For that long, that user's calls at that tier skip the hold (no
round trip before the upstream call) and each call that reached its upstream is charged
afterwards with `record_usage`, many per message, within `usage_interval_s`. The grant is
keyed by the tier the gateway authenticated the caller with, so a tier change (the next
request carries the new tier) asks the quota service again at once. Uses that cannot be
delivered are retried; a crash of mcp_proxy loses at most the last interval's charges, the
same loss as a hold that expires because its commit never came (docs/quota.md).
"""

import asyncio
import contextlib
import logging
import time

from contracts.commands.common import CommandMeta
from contracts.commands.mcp import Caller
from contracts.commands.quota import RecordUsage, Release, Reserve, Settled, UsageReceipt, Use
from contracts.commands.quota import Reservation as QuotaReservation
from contracts.envelope import Actor
from services.kit.rpc import CommandClient, CommandFailed
from services.kit.tasks import stop_task
from services.mcp_proxy.application.ports import QuotaExceeded, Reservation

log = logging.getLogger(__name__)
META = CommandMeta(actor=Actor(kind="service", id="mcp_proxy"), correlation_id="quota")
MAX_USES = 1000  # per message (the quota service's limit)
MAX_PENDING = 200_000  # uses waiting for delivery; beyond it the oldest are dropped (logged)


class QuotaService:
    def __init__(self, client: CommandClient, timeout_s: float = 5.0, usage_interval_s: float = 0.02) -> None:
        self.client, self.timeout_s, self.usage_interval_s = client, timeout_s, usage_interval_s
        self._settling: set[asyncio.Task[None]] = set()
        self._unmetered: dict[tuple[str, str], float] = {}  # (user, tier) -> monotonic deadline
        self._uses: list[Use] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    # -- lifecycle (the usage sender) ---------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._send_uses(), name="quota-usage")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        with contextlib.suppress(CommandFailed):  # a last delivery; what fails is lost (logged)
            while self._uses:
                await self._deliver()
        if self._uses:
            log.error("%d unmetered calls were not charged: quota did not answer", len(self._uses))

    # -- the gate -----------------------------------------------------------------------
    def granted(self, caller: Caller, request_id: str) -> Reservation | None:
        grant = (caller.user_id, caller.tier)
        until = self._unmetered.get(grant)
        if until is None:
            return None
        if until > time.monotonic():
            return Reservation(request_id, caller.user_id, caller.org_id, held=False)
        del self._unmetered[grant]
        return None

    async def reserve(self, caller: Caller, request_id: str, server: str, tool: str) -> Reservation:
        found = self.granted(caller, request_id)
        if found is not None:
            return found
        request = Reserve(
            meta=META, user_id=caller.user_id, org_id=caller.org_id, kind="call", key=request_id
        )
        answer = await self.client.call("quota", "reserve", request, QuotaReservation, timeout=self.timeout_s)
        if not answer.granted:
            raise QuotaExceeded(answer.sentence or "Your tool call quota is used up.", answer.retry_after_s)
        if answer.unmetered_for_s and answer.tier == caller.tier:
            if len(self._unmetered) > 100_000:
                self._unmetered.clear()
            self._unmetered[(caller.user_id, caller.tier)] = time.monotonic() + answer.unmetered_for_s
        return Reservation(request_id, caller.user_id, caller.org_id)

    async def commit(self, reservation: Reservation) -> None:
        self._use(reservation)  # held or not: charged in the next usage message

    async def release(self, reservation: Reservation) -> None:
        if reservation.held:  # an unmetered call that never reached its upstream holds nothing
            release = Release(meta=META, user_id=reservation.user_id, key=reservation.request_id)
            self._later("release", release)

    def _later(self, verb: str, request: Release) -> None:
        async def settle() -> None:
            try:
                await self.client.call("quota", verb, request, Settled, timeout=self.timeout_s)
            except CommandFailed as failed:  # the reservation expires on its own
                log.warning("quota %s of %s failed: %s", verb, request.key, failed.problem.detail)

        task = asyncio.get_running_loop().create_task(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    # -- charging unmetered calls ---------------------------------------------------------
    def _use(self, reservation: Reservation) -> None:
        r = reservation
        self._uses.append(Use(user_id=r.user_id, org_id=r.org_id, key=r.request_id, held=r.held))
        if len(self._uses) > MAX_PENDING:
            del self._uses[0]
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("unmetered calls are being dropped uncharged: the quota service is not answering")
        self._wake.set()

    async def _send_uses(self) -> None:
        backoff = 0.2
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.usage_interval_s)  # let a burst share one message
            self._wake.clear()
            while self._uses:
                try:
                    await self._deliver()
                    backoff = 0.2
                except CommandFailed as failed:
                    if failed.problem.status < 500:  # refused as such: sending it again won't help
                        log.error("quota refused a usage message, dropped: %s", failed.problem.detail)
                        del self._uses[:MAX_USES]
                        continue
                    detail = failed.problem.detail
                    log.warning("charging %d unmetered calls failed, retrying: %s", len(self._uses), detail)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)

    async def _deliver(self) -> None:
        batch = self._uses[:MAX_USES]
        receipt = await self.client.call(
            "quota", "record_usage", RecordUsage(meta=META, uses=batch), UsageReceipt, timeout=self.timeout_s
        )
        del self._uses[: len(batch)]
        if receipt.unknown_users:
            unknown = sorted(set(receipt.unknown_users))
            log.warning("quota does not know users %s: their calls were not charged", unknown)
