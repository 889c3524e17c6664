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

Leases (limited tiers with room left, docs/quota.md "Leases"): every reservation asks for
one; when the quota service answers with a lease of n calls, this call and the next n-1 of
that user (at that tier, within `lease_for_s`) run without a round trip each. Each that
reached its upstream is a Use naming the lease; one that did not hands its unit back to the
lease. When the window closes or the units run out, the lease is returned in the usage
message after its last use, so its unspent units are freed. One request at a time asks for
a user's next lease; callers arriving meanwhile wait for its answer.
"""

import asyncio
import contextlib
import logging
import time

from contracts.commands.common import CommandMeta
from contracts.commands.mcp import Caller
from contracts.commands.quota import RecordUsage, Release, Reserve, Returned, Settled, UsageReceipt, Use
from contracts.commands.quota import Reservation as QuotaReservation
from contracts.envelope import Actor
from services.kit.rpc import CommandClient, CommandFailed
from services.kit.tasks import stop_task
from services.mcp_proxy.application.ports import QuotaExceeded, Reservation

log = logging.getLogger(__name__)
META = CommandMeta(actor=Actor(kind="service", id="mcp_proxy"), correlation_id="quota")
MAX_USES = 1000  # per message (the quota service's limit)
MAX_PENDING = 200_000  # uses waiting for delivery; beyond it the oldest are dropped (logged)


class Lease:
    """Units of a user's allowance this instance may spend without asking, until `until`."""

    __slots__ = ("done", "grant", "key", "left", "running", "until")

    def __init__(self, key: str, grant: tuple[str, str], left: int, until: float) -> None:
        self.key, self.grant, self.left, self.until = key, grant, left, until  # grant: (user, tier)
        self.running = 0  # calls holding one of its units that have not settled yet
        self.done = False  # no more units are taken; returned once `running` is 0


class QuotaService:
    def __init__(self, client: CommandClient, timeout_s: float = 5.0, usage_interval_s: float = 0.05) -> None:
        self.client, self.timeout_s, self.usage_interval_s = client, timeout_s, usage_interval_s
        self._settling: set[asyncio.Task[None]] = set()
        self._unmetered: dict[tuple[str, str], float] = {}  # (user, tier) -> monotonic deadline
        self._leases: dict[tuple[str, str], Lease] = {}  # (user, tier) -> the lease being spent
        self._running: dict[str, Lease] = {}  # lease key -> lease, until it is returned
        self._asking: dict[tuple[str, str], asyncio.Future[bool]] = {}  # a request under way: leased?
        self._uses: list[Use] = []
        self._returned: list[Returned] = []
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
        for lease in list(self._running.values()):
            self._retire(lease, force=True)
        with contextlib.suppress(CommandFailed):  # a last delivery; what fails is lost (logged)
            while self._uses or self._returned:
                await self._deliver()
        if self._uses:
            log.error("%d calls were not charged: quota did not answer", len(self._uses))

    # -- the gate -----------------------------------------------------------------------
    def granted(self, caller: Caller, request_id: str) -> Reservation | None:
        grant = (caller.user_id, caller.tier)
        lease = self._leases.get(grant)
        if lease is not None:
            if lease.left > 0 and lease.until > time.monotonic():
                lease.left -= 1
                lease.running += 1
                return Reservation(request_id, caller.user_id, caller.org_id, held=False, lease=lease.key)
            self._retire(lease)
        until = self._unmetered.get(grant)
        if until is None:
            return None
        if until > time.monotonic():
            return Reservation(request_id, caller.user_id, caller.org_id, held=False)
        del self._unmetered[grant]
        return None

    async def reserve(self, caller: Caller, request_id: str, server: str, tool: str) -> Reservation:
        grant = (caller.user_id, caller.tier)
        while True:
            found = self.granted(caller, request_id)
            if found is not None:
                return found
            asking = self._asking.get(grant)
            if asking is None:
                break
            if not await asyncio.shield(asking):  # that answer was no lease: ask for this call alone
                return await self._ask(caller, request_id)
        self._asking[grant] = asked = asyncio.get_running_loop().create_future()
        leased = False
        try:
            reservation = await self._ask(caller, request_id)
            leased = reservation.lease is not None
            return reservation
        finally:
            del self._asking[grant]
            asked.set_result(leased)  # wakes the calls that waited for this user's next lease

    async def _ask(self, caller: Caller, request_id: str) -> Reservation:
        request = Reserve(
            meta=META, user_id=caller.user_id, org_id=caller.org_id, kind="call", key=request_id, lease=True
        )
        answer = await self.client.call("quota", "reserve", request, QuotaReservation, timeout=self.timeout_s)
        if not answer.granted:
            raise QuotaExceeded(answer.sentence or "Your tool call quota is used up.", answer.retry_after_s)
        if answer.unmetered_for_s and answer.tier == caller.tier:
            if len(self._unmetered) > 100_000:
                self._unmetered.clear()
            self._unmetered[(caller.user_id, caller.tier)] = time.monotonic() + answer.unmetered_for_s
        if answer.lease_key is not None:
            return self._lease(caller, request_id, answer)
        return Reservation(request_id, caller.user_id, caller.org_id)

    def _lease(self, caller: Caller, request_id: str, answer: QuotaReservation) -> Reservation:
        """Keeps a granted lease (this call spends its first unit) and schedules its end."""
        assert answer.lease_key is not None
        window = answer.lease_for_s or 0.0
        grant = (caller.user_id, caller.tier)
        lease = Lease(answer.lease_key, grant, (answer.lease_units or 1) - 1, time.monotonic() + window)
        lease.running = 1
        self._running[lease.key] = lease
        if answer.tier == caller.tier:  # decided at another tier: this call only, then returned
            old = self._leases.get(grant)
            if old is not None:
                self._retire(old)
            self._leases[grant] = lease
            asyncio.get_running_loop().call_later(window, self._retire, lease)
        else:
            lease.done = True
        return Reservation(request_id, caller.user_id, caller.org_id, held=False, lease=lease.key)

    async def commit(self, reservation: Reservation) -> None:
        self._use(reservation)  # held or not: charged in the next usage message
        if reservation.lease is not None:
            self._settled(reservation.lease)

    async def release(self, reservation: Reservation) -> None:
        if reservation.held:  # an unmetered call that never reached its upstream holds nothing
            release = Release(meta=META, user_id=reservation.user_id, key=reservation.request_id)
            self._later("release", release)
        elif reservation.lease is not None:  # its unit stays unspent: freed when the lease returns
            self._settled(reservation.lease)

    # -- leases ---------------------------------------------------------------------------
    def _settled(self, key: str) -> None:
        lease = self._running.get(key)
        if lease is not None:
            lease.running -= 1
            if lease.done and not lease.running:
                self._return(lease)

    def _retire(self, lease: Lease, force: bool = False) -> None:
        """No more units are taken from `lease`; it is returned once its calls settled."""
        if not lease.done:
            lease.done = True
            if self._leases.get(lease.grant) is lease:
                del self._leases[lease.grant]
        if (force or not lease.running) and lease.key in self._running:
            self._return(lease)

    def _return(self, lease: Lease) -> None:
        del self._running[lease.key]
        self._returned.append(Returned(user_id=lease.grant[0], key=lease.key))  # sent after its uses
        self._wake.set()

    def _later(self, verb: str, request: Release) -> None:
        async def settle() -> None:
            try:
                await self.client.call("quota", verb, request, Settled, timeout=self.timeout_s)
            except CommandFailed as failed:  # the reservation expires on its own
                log.warning("quota %s of %s failed: %s", verb, request.key, failed.problem.detail)

        task = asyncio.get_running_loop().create_task(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    # -- charging calls (held, unmetered, a lease's units) ------------------------------------
    def _use(self, reservation: Reservation) -> None:
        r = reservation
        use = Use(user_id=r.user_id, org_id=r.org_id, key=r.request_id, held=r.held, lease=r.lease)
        self._uses.append(use)
        if len(self._uses) > MAX_PENDING:
            del self._uses[0]
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("calls are being dropped uncharged: the quota service is not answering")
        self._wake.set()

    async def _send_uses(self) -> None:
        backoff = 0.2
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.usage_interval_s)  # let a burst share one message
            self._wake.clear()
            while self._uses or self._returned:
                try:
                    await self._deliver()
                    backoff = 0.2
                except CommandFailed as failed:
                    if failed.problem.status < 500:  # refused as such: sending it again won't help
                        log.error("quota refused a usage message, dropped: %s", failed.problem.detail)
                        del self._uses[:MAX_USES]
                        if not self._uses:
                            self._returned.clear()
                        continue
                    detail = failed.problem.detail
                    log.warning("charging %d calls failed, retrying: %s", len(self._uses), detail)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)

    async def _deliver(self) -> None:
        batch = self._uses[:MAX_USES]
        # Leases go back with the message that carries the last pending uses (theirs among them).
        returned = self._returned[:MAX_USES] if len(batch) == len(self._uses) else []
        message = RecordUsage(meta=META, uses=batch, returned=returned)
        timeout = self.timeout_s
        receipt = await self.client.call("quota", "record_usage", message, UsageReceipt, timeout=timeout)
        del self._uses[: len(batch)]
        del self._returned[: len(returned)]
        if receipt.unknown_users:
            unknown = sorted(set(receipt.unknown_users))
            log.warning("quota does not know users %s: their calls were not charged", unknown)
