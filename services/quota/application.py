"""The quota service's use cases: decide in memory, record before answering, compare rebuilds.

One instance decides (it holds the lease, see adapters/leader.py). Each decision is made
synchronously on the in-memory ledger (no await between checking and applying, so two
requests can never both take the last unit), then its facts are handed to the journal
(group commit) and the caller is answered only once they are recorded. A reply therefore
means "recorded": a crash loses no granted reservation. A repeated request that changes
nothing still waits for whatever is being written, so it never reports a state that a
crash could undo.

Leases (docs/quota.md): a call reservation asked with `lease` may be answered with a lease
of several calls, which mcp_proxy spends without asking for each. A call refused while the
user's leases still hold unspent units waits (up to LEASE_WAIT_S past the use window) for
those leases to come back and is decided again, so exactly the limit is granted however
the units were spread.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from contracts.commands.quota import Use
from services.quota.config import QuotaSettings
from services.quota.domain import (
    Account,
    Decision,
    Fact,
    Invalid,
    Kind,
    Ledger,
    Refused,
    Released,
    Reservation,
    Settlement,
    Snapshot,
    UnknownUser,
    Usage,
    differences,
    snapshot,
)

log = logging.getLogger(__name__)

Meta = dict[str, Any]
Entry = tuple[Fact, Reservation | None, Meta]
SERVICE_META: Meta = {"actor": {"kind": "service", "id": "quota"}, "correlation_id": "quota-expiry"}
RECHECK_EVERY_S = 1.0
RECHECK_BURST = 3.0
LEASE_WAIT_S = 2.0  # past the lease window: how long a refusal waits for leases to return


class Unavailable(Exception):
    """The ledger cannot answer right now (loading, or its store failed); try again shortly."""


class WriteFailed(Unavailable):
    pass


class Journal(Protocol):
    """Where decisions are recorded (adapters/writer.py: group commit to the event store)."""

    position: int

    def submit(self, entries: list[Entry]) -> Awaitable[int]: ...
    def post(self, entries: list[Entry]) -> None: ...
    def barrier(self) -> Awaitable[int]: ...


Lookup = Callable[[str, str], Awaitable[Account | None]]  # (org id, user id) -> the user, from identity


class Source(Protocol):
    """An event log the balances can be rebuilt from (the stream, or the store)."""

    name: str

    async def fold(self, ledger: Ledger, up_to: int) -> None: ...


class Rebuilt(msgspec.Struct, frozen=True):
    live: Snapshot
    rebuilt: Snapshot
    source: str
    differences: list[str]
    seconds: float


def utcnow() -> datetime:
    return datetime.now(UTC)


class Quota:
    def __init__(
        self,
        settings: QuotaSettings,
        journal: Journal,
        lookup: Lookup,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings, self.journal, self.lookup, self.clock = settings, journal, lookup, clock
        self.tiers = settings.table()
        self.ledger = self.new_ledger()
        self.accounts: dict[str, Account] = {}
        self.serving = False
        self._gate = asyncio.Event()
        self._gate.set()
        self._snapshotting = asyncio.Lock()
        self._checked: dict[str, tuple[float, float]] = {}  # user -> (recheck tokens, at)
        self._unknown: dict[str, float] = {}  # user -> when identity last said "no such user"
        self._lookups: dict[str, asyncio.Future[Account | None]] = {}
        self._leases_back = asyncio.Event()  # set (and replaced) when a lease is returned or expires

    def new_ledger(self) -> Ledger:
        s = self.settings
        return Ledger(self.tiers, s.period, s.reservation_timeout, s.lease_timeout)

    def adopt(self, ledger: Ledger) -> None:
        """Starts serving from a ledger loaded from the store."""
        if ledger.anomalies:
            log.error(
                "quota store has %d inconsistencies, e.g. %s", len(ledger.anomalies), ledger.anomalies[0]
            )
        self.ledger = ledger
        self.serving = True

    # -- the directory of users, fed by identity events ---------------------------------------
    def register(self, user_id: str, org_id: str, tier: str) -> None:
        self.accounts[user_id] = Account(user_id, org_id, tier)

    def change_tier(self, user_id: str, tier: str) -> None:
        found = self.accounts.get(user_id)
        if found is not None:
            self.accounts[user_id] = Account(user_id, found.org_id, tier)

    # -- commands ----------------------------------------------------------------------------
    async def reserve(
        self, user_id: str, org_id: str, kind: Kind, key: str, amount: int, meta: Meta, lease: bool = False
    ) -> Decision:
        account = await self._account(user_id, org_id)
        await self._enter()
        decision = self._decide(account, kind, key, amount, lease)
        if not decision.granted and await self._tier_moved(account):
            # The tier changed in identity and its event has not reached us yet: decide again.
            await self._enter()
            decision = self._decide(self.accounts[user_id], kind, key, amount, lease)
        if not decision.granted and kind == "call" and self.ledger.unspent_leases(user_id, self.clock()):
            decision = await self._after_leases(self.accounts.get(user_id, account), key, amount)
        entries = self._entries(decision.facts, decision.reservation, meta, account.org_id)
        if not decision.granted:
            self.journal.post(entries)  # the refusal is informative; nobody waits for it
        elif entries:
            await self.journal.submit(entries)
        else:
            await self.journal.barrier()
        return decision

    def _decide(self, account: Account, kind: Kind, key: str, amount: int, lease: bool) -> Decision:
        """A lease when asked for and worth it (a new call key, room left), else a plain hold."""
        now = self.clock()
        unmetered = self.settings.unmetered_grant_s and self.tiers.limits(account.tier).calls is None
        if lease and kind == "call" and amount == 1 and self.settings.lease_max and not unmetered:
            found = self.ledger.find(account.user_id, key)
            size = self.ledger.lease_size(account, now, self.settings.lease_max)
            if size and (found is None or found.state == "released"):
                return self.ledger.reserve(account, "call", f"lease:{uuid.uuid4()}", size, now, lease=True)
        return self.ledger.reserve(account, kind, key, amount, now)

    async def _after_leases(self, account: Account, key: str, amount: int) -> Decision:
        """Decides a refused call again each time a lease comes back, while this user's leases
        hold unspent units (they may be all that is left), for up to the lease window plus
        LEASE_WAIT_S. Exactly the limit is granted, never less because units sat in a lease."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.lease_for_s + LEASE_WAIT_S
        while True:
            left = deadline - loop.time()
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._leases_back.wait()
            await self._enter()
            decision = self.ledger.reserve(account, "call", key, amount, self.clock())
            waiting = self.ledger.unspent_leases(account.user_id, self.clock())
            if decision.granted or not waiting or loop.time() >= deadline:
                return decision

    def _leases_returned(self) -> None:
        self._leases_back.set()  # wakes every waiter; the next ones wait on a fresh event
        self._leases_back = asyncio.Event()

    async def commit(self, user_id: str, key: str, meta: Meta) -> Settlement:
        await self._enter()
        settled = self.ledger.commit(user_id, key, self.clock())
        return await self._settle(settled, meta)

    async def release(self, user_id: str, key: str, reason: str, meta: Meta) -> Settlement:
        await self._enter()
        settled = self.ledger.release(user_id, key, reason, self.clock())
        return await self._settle(settled, meta)

    async def record_usage(
        self, uses: list[Use], meta: Meta, returned: Sequence[tuple[str, str]] = ()
    ) -> tuple[int, list[str]]:
        """Charges calls that reached their upstream, then frees the unspent units of the
        leases `returned` as (user, lease key); recorded before it returns. A held call is
        committed; the others ran without a hold of their own (unmetered, or a lease's unit).

        Returns how many charged something, and the users nobody knows (their uses skipped).
        """
        accounts: list[tuple[Account | str, str, str | None]] = []
        unknown: list[str] = []
        for use in uses:
            if use.held:
                accounts.append((use.user_id, use.key, None))
                continue
            try:
                accounts.append((await self._account(use.user_id, use.org_id), use.key, use.lease))
            except UnknownUser:
                unknown.append(use.user_id)
        await self._enter()
        entries: list[Entry] = []
        changed = 0
        now = self.clock()
        for who, key, lease in accounts:
            try:
                settled = self._charge(who, key, now, lease)
            except Invalid as err:  # a key bound to a build or server: one bad use, not the batch
                log.warning("usage of %s not recorded: %s", key, err)
                continue
            if settled.changed:
                changed += 1
                owner = settled.reservation.org_id if settled.reservation else None
                entries += self._entries(settled.facts, settled.reservation, meta, owner)
        for user_id, lease_key in returned:
            found = self.ledger.find(user_id, lease_key)
            if found is None or not found.lease:
                continue  # not a lease (or forgotten): nothing to free
            settled = self.ledger.release(user_id, lease_key, "returned", now)
            entries += self._entries(settled.facts, settled.reservation, meta, found.org_id)
        await (self.journal.submit(entries) if entries else self.journal.barrier())
        if returned:
            self._leases_returned()
        return changed, unknown

    def _charge(self, who: Account | str, key: str, now: datetime, lease: str | None = None) -> Settlement:
        """A held call (`who` a user id) is committed; an unheld one charged at once."""
        if isinstance(who, Account):
            return self.ledger.record_use(who, key, now, lease)
        found = self.ledger.find(who, key)
        if found is not None and found.kind != "call":
            raise Invalid(f"The key {key!r} names a {found.kind} reservation, not a call.")
        return self.ledger.commit(who, key, now)

    async def usage(self, user_id: str, org_id: str) -> Usage:
        if not self.serving:
            raise Unavailable("The quota ledger is loading; try again shortly.")
        account = await self._account(user_id, org_id)
        return self.ledger.usage(account, self.clock())

    # -- housekeeping (the leader calls these on a timer) --------------------------------------
    def expire_due(self) -> int:
        """Releases held calls and servers past their timeout; the releases are recorded."""
        if not self.serving or not self._gate.is_set():
            return 0
        facts = self.ledger.expire(self.clock())
        if facts:
            found = self.ledger.reservations
            self.journal.post([(f, found.get(getattr(f, "reservation_id", "")), SERVICE_META) for f in facts])
            if any(found[f.reservation_id].lease for f in facts if isinstance(f, Released)):
                self._leases_returned()
        return len(facts)

    def prune(self) -> int:
        return self.ledger.prune(self.clock()) if self.serving else 0

    # -- digests and rebuilds ------------------------------------------------------------------
    async def live_snapshot(self) -> Snapshot:
        """The balances exactly as recorded up to a position: decisions pause for one flush."""
        async with self._snapshotting:
            if not self.serving:
                raise Unavailable("The quota ledger is loading; try again shortly.")
            self._gate.clear()
            try:
                position = await self.journal.barrier()
                return snapshot(self.ledger, position)
            finally:
                self._gate.set()

    async def rebuild(self, source: Source) -> Rebuilt:
        """Folds `source` up to the live position into a fresh ledger and compares the two."""
        started = time.monotonic()
        live = await self.live_snapshot()
        fresh = self.new_ledger()
        await source.fold(fresh, live.position)
        rebuilt = snapshot(fresh, live.position)
        return Rebuilt(live, rebuilt, source.name, differences(live, rebuilt), time.monotonic() - started)

    # -- internals -----------------------------------------------------------------------------
    async def _enter(self) -> None:
        """Waits while a snapshot is being taken; refuses while the ledger is not loaded."""
        if not self._gate.is_set():
            await self._gate.wait()
        if not self.serving:
            raise Unavailable("The quota ledger is loading; try again shortly.")

    async def _settle(self, settled: Settlement, meta: Meta) -> Settlement:
        if settled.facts:
            org_id = settled.reservation.org_id if settled.reservation else None
            await self.journal.submit(self._entries(settled.facts, settled.reservation, meta, org_id))
        else:
            await self.journal.barrier()
        return settled

    @staticmethod
    def _entries(
        facts: list[Fact], reservation: Reservation | None, meta: Meta, org_id: str | None
    ) -> list[Entry]:
        scoped = {**meta, "org_id": org_id}
        return [(f, None if isinstance(f, Refused) else reservation, scoped) for f in facts]

    async def _account(self, user_id: str, org_id: str) -> Account:
        """The user from the identity feed; one not seen yet is looked up in identity once."""
        found = self.accounts.get(user_id)
        if found is not None:
            return found
        missed = self._unknown.get(user_id)
        if missed is not None and time.monotonic() - missed < RECHECK_EVERY_S:
            raise UnknownUser(f"No user {user_id} is known to the quota service.")
        pending = self._lookups.get(user_id)
        if pending is None:
            pending = self._lookups[user_id] = asyncio.ensure_future(self._lookup(org_id, user_id))
            pending.add_done_callback(lambda _: self._lookups.pop(user_id, None))
        fresh = await asyncio.shield(pending)
        if fresh is None:
            if len(self._unknown) > 10_000:
                self._unknown.clear()
            self._unknown[user_id] = time.monotonic()
            raise UnknownUser(f"No user {user_id} is known to the quota service.")
        return self.accounts.setdefault(user_id, fresh)

    async def _tier_moved(self, account: Account) -> bool:
        """Asks identity whether a refused user's tier changed (its event may still be on the way)."""
        if not self._may_check(account.user_id):
            return False
        try:
            fresh = await self._lookup(account.org_id, account.user_id)
        except Unavailable:
            return False
        current = self.accounts.get(account.user_id)
        if current is None:
            return False
        if fresh is not None and fresh.tier != current.tier:
            current = self.accounts[account.user_id] = Account(account.user_id, current.org_id, fresh.tier)
        return current.tier != account.tier  # the feed may have brought it meanwhile

    def _may_check(self, user_id: str) -> bool:
        """A token bucket per user: a few rechecks at once, then one a second (refusals are cheap)."""
        now = time.monotonic()
        tokens, last = self._checked.get(user_id, (RECHECK_BURST, now))
        tokens = min(RECHECK_BURST, tokens + (now - last) / RECHECK_EVERY_S)
        if len(self._checked) > 10_000:
            self._checked.clear()
        if tokens < 1:
            self._checked[user_id] = (tokens, now)
            return False
        self._checked[user_id] = (tokens - 1, now)
        return True

    async def _lookup(self, org_id: str, user_id: str) -> Account | None:
        try:
            return await asyncio.wait_for(self.lookup(org_id, user_id), timeout=2.0)
        except Unavailable:
            raise
        except Exception as err:
            raise Unavailable(f"The identity service could not confirm user {user_id} ({err}).") from None
