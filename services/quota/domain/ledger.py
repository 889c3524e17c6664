"""The ledger: reservations per user, decided against the user's tier limits. No I/O.

A reservation is named by (user, idempotency key). It is *held* when granted, then
*committed* (the work happened: a call is charged, a slot stays in use) or *released*
(nothing to charge, or the slot is free again). Every change is a fact; `apply` folds a
fact into the balances, and deciding is "check, then apply the fact it produced", so the
live ledger and a ledger rebuilt from the recorded facts are the same by construction.

Rules:
- calls count in the period of their reservation (UTC month by default), held + charged;
  a commit after the period ended still lands in the reservation's period;
- build slots and servers count while held or committed, until released;
- the same key reserved again answers with its reservation (charged at most once); a key
  whose reservation was released may be reserved again (a new hold, the next version);
- commit or release of an unknown or settled reservation changes nothing;
- held calls and held servers not settled within the timeout are released as "expired";
  build slots are held until released;
- a call of a tier with unlimited calls may be charged after it ran, without a hold
  (`record_use`): one fact opens and charges it, once per key;
- a *lease* is a held call reservation of several units that its taker spends itself: each
  call it ran is charged by one fact naming the lease (`record_use` with `lease_key`), which
  moves a unit from held to charged; releasing the lease (returned, or expired) frees only
  the units it did not spend. A use that finds its lease settled or spent is charged all the
  same (the call happened), without a unit of the lease.
"""

import heapq
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TypeVar

import msgspec

from services.kit.ids import uuid5_text
from services.quota.domain.limits import (
    KINDS,
    Invalid,
    Kind,
    PeriodKind,
    TierTable,
    over_limit_sentence,
)
from services.quota.domain.period import label, period_end, period_start, seconds_until_next

K = TypeVar("K")
NAMESPACE = uuid.UUID("3c1f6f0e-9a0b-4f5e-8a51-6c2f7b1d4e90")
MAX_AMOUNT = 1000
MAX_KEY_LENGTH = 200
MAX_REASON_LENGTH = 200
EXPIRED = "expired"
BUILD_RETRY_AFTER_S = 30
# Waiting frees no server (removing one or upgrading does, at once); the header still tells
# clients that retry on 429 not to do so in a tight loop.
SERVER_RETRY_AFTER_S = 60
REFUSAL_RECORD_INTERVAL = timedelta(seconds=60)
EXPIRING_KINDS = frozenset({"call", "server"})
LEASE_MIN = 4  # units: a smaller lease is not worth its round trip, the call is held alone
LEASE_SHARE = 16  # a lease takes at most this fraction of what is left of the allowance


def reservation_id(user_id: str, key: str, period: str = "") -> str:
    """The aggregate id of a new reservation: a call's names its period, so that a key reused
    after its old reservation was forgotten (pruned) can never collide with it."""
    return uuid5_text(NAMESPACE, f"{user_id}\n{key}\n{period}")


class Account(msgspec.Struct, frozen=True):
    user_id: str
    org_id: str
    tier: str


# -- facts ------------------------------------------------------------------------------
class Reserved(msgspec.Struct, frozen=True, kw_only=True):
    reservation_id: str
    version: int
    key: str
    user_id: str
    org_id: str
    kind: Kind
    amount: int
    tier: str
    period_start: datetime
    at: datetime
    expires_at: datetime | None = None
    charged: bool = False  # an unmetered call: reserved and charged in one fact, never held
    lease: bool = False  # a lease: `amount` calls its taker runs without a hold each
    from_lease: str | None = None  # charged: the lease (reservation id) whose unit it spent


class Committed(msgspec.Struct, frozen=True, kw_only=True):
    reservation_id: str
    version: int
    at: datetime


class Released(msgspec.Struct, frozen=True, kw_only=True):
    reservation_id: str
    version: int
    at: datetime
    reason: str
    was_committed: bool = False  # a committed build slot or server freed


class Refused(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    org_id: str
    kind: Kind
    amount: int
    tier: str
    used: int
    limit: int
    sentence: str
    key: str
    at: datetime


Fact = Reserved | Committed | Released | Refused
State = str  # "held" | "committed" | "released"


class Reservation(msgspec.Struct, kw_only=True):
    reservation_id: str
    version: int
    key: str
    user_id: str
    org_id: str
    kind: Kind
    amount: int
    tier: str
    period_start: datetime
    reserved_at: datetime
    expires_at: datetime | None
    state: State = "held"
    lease: bool = False
    used: int = 0  # a lease's units spent (charged by their own facts)

    @property
    def unspent(self) -> int:
        return self.amount - self.used

    @property
    def settled(self) -> bool:
        """Nothing more can happen to it (a committed slot can still be released)."""
        return self.state == "released" or (self.state == "committed" and self.kind == "call")


class Decision(msgspec.Struct, kw_only=True):
    granted: bool
    state: str  # "held" | "committed" | "refused"
    kind: Kind
    used: int
    limit: int | None
    tier: str
    period_start: datetime | None
    reservation: Reservation | None = None
    sentence: str | None = None
    retry_after_s: int | None = None
    facts: list[Fact] = msgspec.field(default_factory=list)


class Settlement(msgspec.Struct, kw_only=True):
    changed: bool
    state: State | None
    reservation: Reservation | None = None
    facts: list[Fact] = msgspec.field(default_factory=list)


class Usage(msgspec.Struct, kw_only=True):
    tier: str
    period_start: datetime
    period_end: datetime
    calls_used: int
    calls_limit: int | None
    builds_used: int
    builds_limit: int | None
    servers_used: int
    servers_limit: int | None


class CallBalance(msgspec.Struct):
    charged: int = 0
    held: int = 0


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise Invalid(f"A reservation key is 1-{MAX_KEY_LENGTH} printable characters.")
    return key


def check_amount(amount: int) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= MAX_AMOUNT:
        raise Invalid(f"A reservation amount is a whole number from 1 to {MAX_AMOUNT}, not {amount!r}.")
    return amount


def check_reason(reason: str) -> str:
    if not reason or len(reason) > MAX_REASON_LENGTH or not reason.isprintable():
        raise Invalid(f"A release reason is 1-{MAX_REASON_LENGTH} printable characters.")
    if reason == EXPIRED:
        raise Invalid("The reason 'expired' is kept for releases made by the quota service.")
    return reason


class Ledger:
    def __init__(
        self,
        tiers: TierTable,
        period: PeriodKind = "month",
        timeout: timedelta | None = None,
        lease_timeout: timedelta | None = None,
    ) -> None:
        self.tiers = tiers
        self.period: PeriodKind = period
        self.timeout = timeout if timeout is not None else timedelta(seconds=120)
        self.lease_timeout = lease_timeout if lease_timeout is not None else timedelta(seconds=30)
        self.leased: dict[tuple[str, datetime], int] = {}  # (user, period) -> lease units unspent
        self.reservations: dict[str, Reservation] = {}  # by reservation id
        self._keys: dict[tuple[str, str], Reservation] = {}  # by (user, key): the latest one
        self._expiry: list[tuple[datetime, str, int]] = []  # heap of (expires_at, reservation id, version)
        self.calls: dict[tuple[str, datetime], CallBalance] = {}
        self.slots: dict[tuple[str, Kind], int] = {}
        self.users: set[str] = set()
        self.reserved_total = 0
        self.charged_total = 0
        self.open = 0
        self.anomalies: list[str] = []  # facts that did not fit (a gap in a replayed log)
        self._refusals: dict[tuple[str, Kind], datetime] = {}

    # -- reads ---------------------------------------------------------------------------
    def used(self, user_id: str, kind: Kind, at: datetime) -> int:
        if kind == "call":
            balance = self.calls.get((user_id, period_start(at, self.period)))
            return balance.charged + balance.held if balance else 0
        return self.slots.get((user_id, kind), 0)

    def usage(self, account: Account, now: datetime) -> Usage:
        limits = self.tiers.limits(account.tier)
        start = period_start(now, self.period)
        return Usage(
            tier=account.tier,
            period_start=start,
            period_end=period_end(start, self.period),
            # Units a lease holds but has not spent are not calls the user made (they count
            # against the limit all the same, and come back when the lease returns).
            calls_used=self.used(account.user_id, "call", now) - self.unspent_leases(account.user_id, now),
            calls_limit=limits.calls,
            builds_used=self.used(account.user_id, "build_slot", now),
            builds_limit=limits.builds,
            servers_used=self.used(account.user_id, "server", now),
            servers_limit=limits.servers,
        )

    def find(self, user_id: str, key: str) -> Reservation | None:
        return self._keys.get((user_id, key))

    def unspent_leases(self, user_id: str, at: datetime | None = None) -> int:
        """Units of this user's allowance held by leases and not spent yet (`at`: only those
        of the period that holds this instant)."""
        if at is None:
            return sum(n for (user, _), n in self.leased.items() if user == user_id)
        return self.leased.get((user_id, period_start(at, self.period)), 0)

    def lease_size(self, account: Account, now: datetime, most: int) -> int:
        """How many calls a lease for this user may hold now: 0 when it is not worth one.

        A lease takes at most 1/LEASE_SHARE of what is left, so the last units of an
        allowance are always held one call at a time (exact at the limit); a small allowance
        (free tier: 50) never gets one.
        """
        limit = self.tiers.limits(account.tier).calls
        if limit is None:
            return most
        size = min(most, (limit - self.used(account.user_id, "call", now)) // LEASE_SHARE)
        return size if size >= LEASE_MIN else 0

    # -- decisions -----------------------------------------------------------------------
    def reserve(
        self, account: Account, kind: Kind, key: str, amount: int, now: datetime, lease: bool = False
    ) -> Decision:
        """Holds `amount` units under `key`; `lease`: a lease of `amount` calls (see the rules)."""
        check_key(key)
        check_amount(amount)
        if kind not in KINDS:
            raise Invalid(f"Unknown reservation kind {kind!r}; kinds are {', '.join(KINDS)}.")
        if lease and kind != "call":
            raise Invalid("Only calls can be leased.")
        limit = self.tiers.limits(account.tier).of(kind)
        existing = self._keys.get((account.user_id, key))
        if existing is not None and existing.state != "released":
            if existing.kind != kind or existing.amount != amount:
                raise Invalid(
                    f"The key {key!r} already names a {existing.kind} reservation of {existing.amount}."
                )
            return Decision(
                granted=True,
                state=existing.state,
                kind=kind,
                used=self.used(account.user_id, kind, existing.period_start),
                limit=limit,
                tier=account.tier,
                period_start=existing.period_start if kind == "call" else None,
                reservation=existing,
            )
        start = period_start(now, self.period)
        used = self.used(account.user_id, kind, now)
        if limit is not None and used + amount > limit:
            return self._refuse(account, kind, key, amount, used, limit, now)
        fact = self._open(account, kind, key, amount, now, existing, lease=lease)
        rid = fact.reservation_id
        return Decision(
            granted=True,
            state="held",
            kind=kind,
            used=used + amount,
            limit=limit,
            tier=account.tier,
            period_start=start if kind == "call" else None,
            reservation=self.reservations[rid],
            facts=[fact],
        )

    def record_use(
        self, account: Account, key: str, now: datetime, lease_key: str | None = None
    ) -> Settlement:
        """Charges a call that already reached its upstream without a hold of its own
        (unmetered users, or a unit of the lease `lease_key`).

        No limit is checked: the call happened. The key is charged once: a held key is
        committed, a committed one changes nothing, otherwise one fact opens and charges it,
        spending a unit of its lease when that lease is still held and has one left.
        """
        check_key(key)
        existing = self._keys.get((account.user_id, key))
        if existing is not None and existing.state != "released":
            if existing.kind != "call":
                raise Invalid(f"The key {key!r} already names a {existing.kind} reservation.")
            if existing.state == "held":
                return self.commit(account.user_id, key, now)
            return Settlement(changed=False, state=existing.state, reservation=existing)
        lease = self._keys.get((account.user_id, lease_key)) if lease_key is not None else None
        if lease is not None and not (lease.lease and lease.state == "held" and lease.unspent > 0):
            lease = None  # settled or spent: the call is charged on its own
        fact = self._open(account, "call", key, 1, now, existing, charged=True, lease_of=lease)
        found = self.reservations[fact.reservation_id]
        return Settlement(changed=True, state="committed", reservation=found, facts=[fact])

    def _open(
        self,
        account: Account,
        kind: Kind,
        key: str,
        amount: int,
        now: datetime,
        existing: Reservation | None,
        charged: bool = False,
        lease: bool = False,
        lease_of: Reservation | None = None,
    ) -> Reserved:
        """Applies and returns the fact of a new hold (or, `charged`, of a call charged at once;
        spending a unit of `lease_of`, it lands in that lease's period)."""
        start = lease_of.period_start if lease_of is not None else period_start(now, self.period)
        rid = self._next_id(account.user_id, key, kind, start, existing)
        prior = self.reservations.get(rid)
        held = not charged and kind in EXPIRING_KINDS
        expires_at = now + (self.lease_timeout if lease else self.timeout) if held else None
        fact = Reserved(
            reservation_id=rid,
            version=prior.version + 1 if prior is not None else 1,
            key=key,
            user_id=account.user_id,
            org_id=account.org_id,
            kind=kind,
            amount=amount,
            tier=account.tier,
            period_start=start,
            at=now,
            expires_at=expires_at,
            charged=charged,
            lease=lease,
            from_lease=lease_of.reservation_id if lease_of is not None else None,
        )
        self.apply(fact)
        return fact

    def _next_id(
        self, user_id: str, key: str, kind: Kind, start: datetime, released: Reservation | None
    ) -> str:
        """The aggregate a new hold of a key is recorded on (its next version when it exists).

        A released key reserved again for the same kind (and, for a call, in the same period)
        continues its reservation. Otherwise the id is derived afresh; when that aggregate
        already exists (the key was used for another kind in between), it continues too, so
        an id never starts again at version 1 and never collides in the store.
        """
        same = released is not None and released.kind == kind
        if same and released is not None and (kind != "call" or released.period_start == start):
            return released.reservation_id
        return reservation_id(user_id, key, label(start, self.period) if kind == "call" else "")

    def _refuse(
        self, account: Account, kind: Kind, key: str, amount: int, used: int, limit: int, now: datetime
    ) -> Decision:
        sentence = over_limit_sentence(kind, limit, self.period, self.tiers.upgrade(account.tier, kind))
        if kind == "call":
            retry_after = seconds_until_next(now, self.period)
        else:
            retry_after = BUILD_RETRY_AFTER_S if kind == "build_slot" else SERVER_RETRY_AFTER_S
        facts: list[Fact] = []
        last = self._refusals.get((account.user_id, kind))
        if last is None or now - last >= REFUSAL_RECORD_INTERVAL or now < last:
            self._refusals[(account.user_id, kind)] = now
            facts.append(
                Refused(
                    user_id=account.user_id,
                    org_id=account.org_id,
                    kind=kind,
                    amount=amount,
                    tier=account.tier,
                    used=used,
                    limit=limit,
                    sentence=sentence,
                    key=key,
                    at=now,
                )
            )
        return Decision(
            granted=False,
            state="refused",
            kind=kind,
            used=used,
            limit=limit,
            tier=account.tier,
            period_start=period_start(now, self.period) if kind == "call" else None,
            sentence=sentence,
            retry_after_s=retry_after,
            facts=facts,
        )

    def commit(self, user_id: str, key: str, now: datetime) -> Settlement:
        found = self._keys.get((user_id, key))
        if found is None:
            return Settlement(changed=False, state=None)
        if found.state != "held":
            return Settlement(changed=False, state=found.state, reservation=found)
        fact = Committed(reservation_id=found.reservation_id, version=found.version + 1, at=now)
        self.apply(fact)
        return Settlement(changed=True, state="committed", reservation=found, facts=[fact])

    def release(self, user_id: str, key: str, reason: str, now: datetime) -> Settlement:
        check_reason(reason)
        found = self._keys.get((user_id, key))
        if found is None:
            return Settlement(changed=False, state=None)
        if found.settled:
            return Settlement(changed=False, state=found.state, reservation=found)
        fact = Released(
            reservation_id=found.reservation_id,
            version=found.version + 1,
            at=now,
            reason=reason,
            was_committed=found.state == "committed",
        )
        self.apply(fact)
        return Settlement(changed=True, state="released", reservation=found, facts=[fact])

    def expire(self, now: datetime, limit: int = 1000) -> list[Fact]:
        """Releases held calls and servers whose timeout passed (at most `limit` at a time)."""
        facts: list[Fact] = []
        while self._expiry and self._expiry[0][0] <= now and len(facts) < limit:
            _, rid, version = heapq.heappop(self._expiry)
            found = self.reservations.get(rid)
            if found is None or found.version != version or found.state != "held":
                continue  # settled (or reserved again) in time
            fact = Released(reservation_id=rid, version=version + 1, at=now, reason=EXPIRED)
            self.apply(fact)
            facts.append(fact)
        return facts

    def prune(self, now: datetime) -> int:
        """Forgets settled calls older than the previous period (their keys stop deduping).

        Build slots and servers are few and are kept: their reservations live on for months.
        """
        keep_from = period_start(period_start(now, self.period) - timedelta(seconds=1), self.period)
        old = [
            r
            for r in self.reservations.values()
            if r.kind == "call" and r.settled and r.period_start < keep_from
        ]
        for r in old:
            del self.reservations[r.reservation_id]
            if self._keys.get((r.user_id, r.key)) is r:
                del self._keys[(r.user_id, r.key)]
        stale = now - REFUSAL_RECORD_INTERVAL
        for who in [w for w, at in self._refusals.items() if at < stale]:
            del self._refusals[who]
        return len(old)

    # -- the fold ------------------------------------------------------------------------
    def apply(self, fact: Fact) -> None:
        """Folds one fact in; a fact seen before (same or older version) changes nothing."""
        if isinstance(fact, Reserved):
            self._apply_reserved(fact)
        elif isinstance(fact, Committed):
            self._apply_committed(fact)
        elif isinstance(fact, Released):
            self._apply_released(fact)

    def apply_all(self, facts: Iterable[Fact]) -> None:
        for fact in facts:
            self.apply(fact)

    def _current(self, fact: Committed | Released) -> Reservation | None:
        found = self.reservations.get(fact.reservation_id)
        if found is None:
            self.anomalies.append(f"reservation {fact.reservation_id}: settled but never reserved")
            return None
        if fact.version <= found.version:
            return None  # seen before
        if fact.version != found.version + 1 or found.state == "released":
            self.anomalies.append(
                f"reservation {fact.reservation_id}: version {fact.version} "
                f"after {found.version} ({found.state})"
            )
            return None
        return found

    def _apply_reserved(self, fact: Reserved) -> None:
        found = self.reservations.get(fact.reservation_id)
        if found is not None and fact.version <= found.version:
            return  # seen before
        if found is not None and found.state != "released":
            self.anomalies.append(f"reservation {fact.reservation_id}: reserved again while {found.state}")
            return
        reservation = Reservation(
            reservation_id=fact.reservation_id,
            version=fact.version,
            key=fact.key,
            user_id=fact.user_id,
            org_id=fact.org_id,
            kind=fact.kind,
            amount=fact.amount,
            tier=fact.tier,
            period_start=fact.period_start,
            reserved_at=fact.at,
            expires_at=fact.expires_at,
            state="committed" if fact.charged else "held",
            lease=fact.lease,
        )
        self.reservations[fact.reservation_id] = reservation
        self._keys[(fact.user_id, fact.key)] = reservation
        if fact.kind == "call":
            balance = self.calls.get((fact.user_id, fact.period_start))
            if balance is None:
                balance = self.calls[(fact.user_id, fact.period_start)] = CallBalance()
            if fact.charged:
                balance.charged += fact.amount
                self.charged_total += fact.amount
                self.users.add(fact.user_id)
                self.reserved_total += 1
                if fact.from_lease is not None:
                    self._spend(fact.from_lease, fact.amount)
                return
            balance.held += fact.amount
            if fact.lease:
                in_period = (fact.user_id, fact.period_start)
                self.leased[in_period] = self.leased.get(in_period, 0) + fact.amount
        else:
            slot = (fact.user_id, fact.kind)
            self.slots[slot] = self.slots.get(slot, 0) + fact.amount
        if fact.expires_at is not None:
            heapq.heappush(self._expiry, (fact.expires_at, fact.reservation_id, fact.version))
        self.users.add(fact.user_id)
        self.reserved_total += 1
        self.open += 1

    def _apply_committed(self, fact: Committed) -> None:
        found = self._current(fact)
        if found is None:
            return
        if found.state != "held":
            self.anomalies.append(f"reservation {fact.reservation_id}: committed while {found.state}")
            return
        found.state, found.version = "committed", fact.version
        if found.kind == "call":
            unspent = found.unspent  # a lease committed whole: its unspent units are charged
            self._unlease(found)
            balance = self.calls[(found.user_id, found.period_start)]
            balance.held -= unspent
            balance.charged += unspent
            self.charged_total += unspent
            self.open -= 1

    def _apply_released(self, fact: Released) -> None:
        found = self._current(fact)
        if found is None:
            return
        if found.settled:
            self.anomalies.append(f"reservation {fact.reservation_id}: released while {found.state}")
            return
        found.state, found.version = "released", fact.version
        if found.kind == "call":
            self._unlease(found)
            self.calls[(found.user_id, found.period_start)].held -= found.unspent
        else:
            slot = (found.user_id, found.kind)
            self.slots[slot] -= found.amount
        self.open -= 1

    def _spend(self, lease_id: str, amount: int) -> None:
        """A charged use of a lease: its unit moves from held to charged (already counted)."""
        lease = self.reservations.get(lease_id)
        if lease is None or not lease.lease or lease.state != "held" or lease.unspent < amount:
            return  # settled or spent before: the use was charged on its own
        lease.used += amount
        self.calls[(lease.user_id, lease.period_start)].held -= amount
        self._leased_less(lease, amount)

    def _unlease(self, found: Reservation) -> None:
        if found.lease and found.unspent:
            self._leased_less(found, found.unspent)

    def _leased_less(self, lease: Reservation, amount: int) -> None:
        _less(self.leased, (lease.user_id, lease.period_start), amount)

    # -- fingerprint -----------------------------------------------------------------------
    def balances(self) -> dict[str, int]:
        """Every non-zero balance by a readable name, e.g. `user u-1 calls 2026-11 charged`."""
        out: dict[str, int] = {}
        for (user, start), balance in self.calls.items():
            name = f"user {user} calls {label(start, self.period)}"
            if balance.charged:
                out[f"{name} charged"] = balance.charged
            if balance.held:
                out[f"{name} held"] = balance.held
        for (user, kind), n in self.slots.items():
            if n:
                out[f"user {user} {kind}s in use"] = n
        return out


def _less(counts: dict[K, int], key: K, amount: int) -> None:
    """Lowers a count, dropping it at zero (so an empty ledger compares equal to a fresh one)."""
    left = counts[key] - amount
    if left:
        counts[key] = left
    else:
        del counts[key]
