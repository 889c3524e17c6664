"""Leases: a held call reservation of several units its taker spends one use at a time (no I/O).

A lease of `amount` calls counts in full at once; each use (`record_use` naming the lease)
moves one unit from held to charged; returning or expiring it frees only the unspent units.
The facts a lease produces rebuild the same ledger, and survive the store and the stream.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eventsourcing.persistence import JSONTranscoder, Notification

from contracts.envelope import decode_envelope, encode_envelope
from contracts.events import decode_payload
from contracts.events import quota as ev
from services.kit.outbox import envelope_for
from services.quota.adapters.outbox import translate
from services.quota.adapters.sources import fact_from_stream
from services.quota.adapters.store import QuotaMapper, fact_of, recordable
from services.quota.domain import (
    DEFAULT_TIERS,
    EXPIRED,
    Account,
    Fact,
    Invalid,
    Ledger,
    Released,
    Reservation,
    Reserved,
    TierTable,
    differences,
    period_start,
    snapshot,
)
from services.quota.domain.ledger import LEASE_MIN, LEASE_SHARE

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
TIERS = TierTable(DEFAULT_TIERS)  # free 50 calls, pro 500, team 5000, enterprise unlimited
TIMEOUT = timedelta(seconds=120)
LEASE_TIMEOUT = timedelta(seconds=30)
PRO = Account("u-pro", "o-1", "pro")
FREE = Account("u-free", "o-1", "free")
BIG = Account("u-big", "o-2", "enterprise")
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)
DECEMBER = datetime(2026, 12, 1, tzinfo=UTC)


def ledger() -> Ledger:
    return Ledger(TIERS, "month", TIMEOUT, LEASE_TIMEOUT)


def lease(book: Ledger, account: Account, key: str, amount: int, now: datetime = T0) -> Reservation:
    decision = book.reserve(account, "call", key, amount, now, lease=True)
    assert decision.granted and decision.reservation is not None
    return decision.reservation


def counted(book: Ledger, account: Account, now: datetime = T0) -> int:
    """Calls counted against the limit in `now`'s period: charged + held (a lease: all of it)."""
    return book.used(account.user_id, "call", now)


def use(book: Ledger, account: Account, key: str, lease_key: str, now: datetime = T0) -> Reserved | None:
    """Records one use; returns its fact (None when it changed nothing)."""
    settled = book.record_use(account, key, now, lease_key=lease_key)
    assert len(settled.facts) == (1 if settled.changed else 0)
    if not settled.facts:
        return None
    fact = settled.facts[0]
    assert isinstance(fact, Reserved)
    return fact


# -- holding and spending ---------------------------------------------------------------------
def test_a_lease_holds_its_whole_amount_at_once() -> None:
    book = ledger()
    decision = book.reserve(PRO, "call", "lease-1", 8, T0, lease=True)
    assert decision.granted and decision.state == "held" and decision.used == 8
    assert decision.reservation is not None and decision.reservation.lease
    assert decision.reservation.expires_at == T0 + LEASE_TIMEOUT  # the lease timeout, not TIMEOUT
    [fact] = decision.facts
    assert isinstance(fact, Reserved)
    assert (fact.lease, fact.charged, fact.amount, fact.from_lease) == (True, False, 8, None)
    assert counted(book, PRO) == 8
    assert book.unspent_leases(PRO.user_id) == 8
    assert book.calls[(PRO.user_id, NOVEMBER)].held == 8
    assert book.calls[(PRO.user_id, NOVEMBER)].charged == 0
    assert book.open == 1


def test_uses_spend_units_without_changing_what_is_counted_and_each_key_is_charged_once() -> None:
    book = ledger()
    held = lease(book, PRO, "lease-1", 4)
    fact = use(book, PRO, "req-1", "lease-1")
    assert fact is not None
    assert fact.charged and fact.from_lease == held.reservation_id and fact.amount == 1
    assert not fact.lease and fact.expires_at is None
    assert counted(book, PRO) == 4  # the lease counted the unit already
    assert book.unspent_leases(PRO.user_id) == 3
    assert held.used == 1 and held.state == "held"
    balance = book.calls[(PRO.user_id, NOVEMBER)]
    assert (balance.charged, balance.held) == (1, 3)
    assert book.charged_total == 1
    before = snapshot(book, 0)
    for _ in range(3):  # the same request retried: charged once, the lease keeps its units
        assert use(book, PRO, "req-1", "lease-1") is None
    assert snapshot(book, 0) == before
    assert held.used == 1 and book.unspent_leases(PRO.user_id) == 3
    assert use(book, PRO, "req-2", "lease-1") is not None
    assert use(book, PRO, "req-3", "lease-1") is not None
    assert held.used == 3 and book.unspent_leases(PRO.user_id) == 1
    assert counted(book, PRO) == 4
    assert book.open == 1  # uses open nothing: the lease is the only open reservation


def test_returning_a_lease_frees_exactly_its_unspent_units() -> None:
    book = ledger()
    held = lease(book, PRO, "lease-1", 10)
    for i in range(3):
        assert use(book, PRO, f"req-{i}", "lease-1") is not None
    returned = book.release(PRO.user_id, "lease-1", "returned", T0 + timedelta(seconds=5))
    assert returned.changed and returned.state == "released"
    [fact] = returned.facts
    assert isinstance(fact, Released) and fact.reason == "returned" and not fact.was_committed
    assert held.state == "released"
    assert counted(book, PRO) == 3  # the three spent units stay charged, seven are free
    balance = book.calls[(PRO.user_id, NOVEMBER)]
    assert (balance.charged, balance.held) == (3, 0)
    assert book.unspent_leases(PRO.user_id) == 0
    assert book.open == 0
    assert not book.release(PRO.user_id, "lease-1", "returned", T0 + timedelta(seconds=6)).changed
    assert counted(book, PRO) == 3


def test_an_expired_lease_frees_its_unspent_units_after_the_lease_timeout() -> None:
    assert LEASE_TIMEOUT < TIMEOUT
    book = ledger()
    held = lease(book, PRO, "lease-1", 6)
    assert use(book, PRO, "req-1", "lease-1", T0 + timedelta(seconds=1)) is not None
    assert use(book, PRO, "req-2", "lease-1", T0 + timedelta(seconds=2)) is not None
    assert book.expire(T0 + LEASE_TIMEOUT - timedelta(seconds=1)) == []
    assert counted(book, PRO) == 6
    expired = book.expire(T0 + LEASE_TIMEOUT)
    assert [(type(f), f.reservation_id, f.reason) for f in expired] == [  # type: ignore[union-attr]
        (Released, held.reservation_id, EXPIRED)
    ]
    assert held.state == "released"
    assert counted(book, PRO) == 2
    assert book.unspent_leases(PRO.user_id) == 0
    assert book.expire(T0 + TIMEOUT) == []  # nothing left to expire


def test_a_use_after_the_lease_was_returned_is_charged_on_its_own() -> None:
    book = ledger()
    held = lease(book, PRO, "lease-1", 4)
    assert use(book, PRO, "req-1", "lease-1") is not None
    assert book.release(PRO.user_id, "lease-1", "returned", T0).changed
    assert counted(book, PRO) == 1
    late = use(book, PRO, "req-2", "lease-1", T0 + timedelta(seconds=1))
    assert late is not None and late.charged and late.from_lease is None
    assert counted(book, PRO) == 2  # the call happened: +1
    assert held.used == 1 and book.unspent_leases(PRO.user_id) == 0
    assert book.calls[(PRO.user_id, NOVEMBER)].held == 0


def test_a_use_after_the_lease_expired_is_charged_on_its_own() -> None:
    book = ledger()
    lease(book, PRO, "lease-1", 4)
    assert len(book.expire(T0 + LEASE_TIMEOUT)) == 1
    late = use(book, PRO, "req-1", "lease-1", T0 + LEASE_TIMEOUT)
    assert late is not None and late.from_lease is None
    assert counted(book, PRO) == 1
    assert book.calls[(PRO.user_id, NOVEMBER)].held == 0


def test_a_use_beyond_the_leases_amount_is_charged_on_its_own() -> None:
    book = ledger()
    held = lease(book, PRO, "lease-1", 4)
    for i in range(4):
        fact = use(book, PRO, f"req-{i}", "lease-1")
        assert fact is not None and fact.from_lease == held.reservation_id
    assert held.used == 4 and held.unspent == 0 and held.state == "held"
    assert book.unspent_leases(PRO.user_id) == 0 and all(u != PRO.user_id for u, _ in book.leased)
    assert counted(book, PRO) == 4
    beyond = use(book, PRO, "req-4", "lease-1")
    assert beyond is not None and beyond.charged and beyond.from_lease is None
    assert held.used == 4  # the lease is not overdrawn
    assert counted(book, PRO) == 5
    balance = book.calls[(PRO.user_id, NOVEMBER)]
    assert (balance.charged, balance.held) == (5, 0)
    assert book.release(PRO.user_id, "lease-1", "returned", T0).changed  # a spent lease frees nothing
    assert counted(book, PRO) == 5 and book.unspent_leases(PRO.user_id) == 0


def test_a_use_naming_an_unknown_lease_or_a_plain_hold_is_charged_on_its_own() -> None:
    book = ledger()
    assert book.reserve(PRO, "call", "plain", 3, T0).granted  # a hold, not a lease
    nowhere = use(book, PRO, "req-1", "no-such-lease")
    assert nowhere is not None and nowhere.from_lease is None
    plain = use(book, PRO, "req-2", "plain")
    assert plain is not None and plain.from_lease is None
    assert counted(book, PRO) == 5  # the hold of 3 is untouched, two calls charged
    assert book.calls[(PRO.user_id, NOVEMBER)].held == 3


def test_unspent_leases_tracks_several_leases_per_user_and_returns_to_zero() -> None:
    book = ledger()
    lease(book, PRO, "lease-a", 5)
    lease(book, PRO, "lease-b", 7, T0 + timedelta(seconds=20))
    lease(book, BIG, "lease-c", 9)  # another user's lease is not counted
    assert book.unspent_leases(PRO.user_id) == 12
    assert book.unspent_leases(BIG.user_id) == 9
    assert use(book, PRO, "req-1", "lease-a") is not None
    assert use(book, PRO, "req-2", "lease-a") is not None
    assert use(book, PRO, "req-3", "lease-b") is not None
    assert book.unspent_leases(PRO.user_id) == 9
    assert book.release(PRO.user_id, "lease-b", "returned", T0 + timedelta(seconds=21)).changed
    assert book.unspent_leases(PRO.user_id) == 3
    assert len(book.expire(T0 + LEASE_TIMEOUT)) == 2  # lease-a and BIG's lease-c
    assert book.unspent_leases(PRO.user_id) == 0 and book.unspent_leases(BIG.user_id) == 0
    assert book.leased == {}
    assert counted(book, PRO) == 3 and counted(book, BIG) == 0
    assert book.unspent_leases("u-nobody") == 0


def test_usage_shows_the_calls_made_not_the_units_a_lease_holds_unspent() -> None:
    book = ledger()
    lease(book, PRO, "lease-1", 8)
    assert book.usage(PRO, T0).calls_used == 0 and counted(book, PRO) == 8
    assert use(book, PRO, "req-1", "lease-1") is not None
    assert use(book, PRO, "req-2", "lease-1") is not None
    assert book.usage(PRO, T0).calls_used == 2 and counted(book, PRO) == 8
    assert book.reserve(PRO, "call", "plain", 1, T0).granted  # a plain hold shows at once
    assert book.usage(PRO, T0).calls_used == 3 and counted(book, PRO) == 9
    assert book.release(PRO.user_id, "lease-1", "returned", T0).changed
    assert book.usage(PRO, T0).calls_used == 3 and counted(book, PRO) == 3


def test_usage_of_a_new_month_is_not_lowered_by_last_months_lease() -> None:
    before_midnight = datetime(2026, 11, 30, 23, 59, 50, tzinfo=UTC)
    after_midnight = before_midnight + timedelta(seconds=15)
    book = ledger()
    lease(book, PRO, "lease-1", 5, before_midnight)  # held until 00:00:20, in November
    for i in range(3):
        assert book.reserve(PRO, "call", f"dec-{i}", 1, after_midnight).granted
        assert book.commit(PRO.user_id, f"dec-{i}", after_midnight).changed
    assert counted(book, PRO, after_midnight) == 3
    assert book.usage(PRO, after_midnight).calls_used == 3  # got max(0, 3 - 5) = 0


# -- how big a lease may be -------------------------------------------------------------------
def test_lease_size_takes_a_share_of_what_is_left_of_a_limited_allowance() -> None:
    assert (LEASE_MIN, LEASE_SHARE) == (4, 16)
    book = ledger()
    assert book.lease_size(PRO, T0, 64) == 31  # 500 // 16
    assert book.lease_size(PRO, T0, 10) == 10  # capped by what the taker asks for
    assert book.lease_size(PRO, T0, LEASE_MIN) == LEASE_MIN
    assert book.lease_size(PRO, T0, LEASE_MIN - 1) == 0  # too small to be worth one
    lease(book, PRO, "lease-1", 31)
    assert book.lease_size(PRO, T0, 64) == 29  # (500 - 31) // 16: the held lease counts
    assert book.release(PRO.user_id, "lease-1", "returned", T0).changed
    assert book.lease_size(PRO, T0, 64) == 31


@pytest.mark.parametrize(
    ("used", "size"),
    [
        (0, 31),
        (500 - LEASE_MIN * LEASE_SHARE, LEASE_MIN),  # 64 left: exactly the smallest lease
        (500 - LEASE_MIN * LEASE_SHARE + 1, 0),  # 63 left: held one call at a time
        (499, 0),
        (500, 0),
    ],
)
def test_lease_size_is_zero_when_less_than_lease_min_shares_are_left(used: int, size: int) -> None:
    book = ledger()
    if used:
        assert book.reserve(PRO, "call", "bulk", used, T0).granted
    assert counted(book, PRO) == used
    assert book.lease_size(PRO, T0, 1000) == size


def test_lease_size_is_zero_for_the_free_tier_and_what_was_asked_for_an_unlimited_one() -> None:
    book = ledger()
    assert book.lease_size(FREE, T0, 64) == 0  # 50 // 16 = 3 < LEASE_MIN
    assert book.lease_size(BIG, T0, 64) == 64
    assert book.lease_size(BIG, T0, 7) == 7
    lease(book, BIG, "lease-1", 500)
    assert book.lease_size(BIG, T0, 64) == 64  # nothing is left over an unlimited allowance


def test_a_lease_is_refused_when_it_would_exceed_the_limit() -> None:
    book = ledger()
    assert book.reserve(PRO, "call", "bulk", 480, T0).granted
    refused = book.reserve(PRO, "call", "lease-1", 21, T0, lease=True)
    assert not refused.granted and refused.state == "refused"
    assert refused.reservation is None and refused.used == 480 and refused.limit == 500
    assert not any(isinstance(f, Reserved) for f in refused.facts)
    assert book.find(PRO.user_id, "lease-1") is None
    assert book.unspent_leases(PRO.user_id) == 0
    assert counted(book, PRO) == 480
    exact = book.reserve(PRO, "call", "lease-1", 20, T0, lease=True)  # exactly up to the limit
    assert exact.granted and exact.used == 500
    assert book.unspent_leases(PRO.user_id) == 20


@pytest.mark.parametrize("kind", ["build_slot", "server"])
def test_only_calls_can_be_leased(kind: str) -> None:
    book = ledger()
    with pytest.raises(Invalid, match="leased"):
        book.reserve(PRO, kind, "lease-1", 2, T0, lease=True)  # type: ignore[arg-type]
    assert book.find(PRO.user_id, "lease-1") is None
    assert book.used(PRO.user_id, kind, T0) == 0  # type: ignore[arg-type]


def test_a_lease_reserved_again_with_its_key_answers_with_itself() -> None:
    book = ledger()
    first = lease(book, PRO, "lease-1", 6)
    again = book.reserve(PRO, "call", "lease-1", 6, T0 + timedelta(seconds=1), lease=True)
    assert again.granted and again.reservation is first and again.facts == []
    assert book.unspent_leases(PRO.user_id) == 6 and counted(book, PRO) == 6
    with pytest.raises(Invalid, match="already names"):
        book.reserve(PRO, "call", "lease-1", 7, T0, lease=True)


# -- periods ----------------------------------------------------------------------------------
def test_a_use_lands_in_the_leases_period_even_after_the_month_turned() -> None:
    before_midnight = datetime(2026, 11, 30, 23, 59, 50, tzinfo=UTC)
    after_midnight = before_midnight + timedelta(seconds=15)
    assert period_start(before_midnight) == NOVEMBER and period_start(after_midnight) == DECEMBER
    book = ledger()
    held = lease(book, PRO, "lease-1", 5, before_midnight)
    fact = use(book, PRO, "req-1", "lease-1", after_midnight)
    assert fact is not None and fact.from_lease == held.reservation_id
    assert fact.period_start == NOVEMBER  # the lease's period, not the clock's
    november = book.calls[(PRO.user_id, NOVEMBER)]
    assert (november.charged, november.held) == (1, 4)
    assert (PRO.user_id, DECEMBER) not in book.calls
    assert counted(book, PRO, after_midnight) == 0  # December's allowance is untouched
    assert book.used(PRO.user_id, "call", before_midnight) == 5
    assert book.release(PRO.user_id, "lease-1", "returned", after_midnight).changed
    assert (november.charged, november.held) == (1, 0)
    late = use(book, PRO, "req-2", "lease-1", after_midnight)  # the lease is gone: December pays
    assert late is not None and late.from_lease is None and late.period_start == DECEMBER
    assert counted(book, PRO, after_midnight) == 1
    assert book.used(PRO.user_id, "call", before_midnight) == 1


# -- rebuilds ---------------------------------------------------------------------------------
def lease_history() -> tuple[Ledger, list[tuple[Fact, Reservation | None]]]:
    """A live ledger and every fact it produced, each with its reservation (for the store).

    Leases spent, retried, overdrawn, returned, expired and crossing a month; after each step
    the facts so far rebuild the live ledger exactly.
    """
    book = ledger()
    log: list[tuple[Fact, Reservation | None]] = []
    start = datetime(2026, 11, 30, 23, 59, 40, tzinfo=UTC)

    def keep(facts: list[Fact], reservation: Reservation | None = None) -> None:
        for fact in facts:
            rid = getattr(fact, "reservation_id", None)
            found = reservation if reservation is not None else book.reservations.get(rid or "")
            log.append((fact, found))
        assert_rebuilds(book, [f for f, _ in log])

    def at(seconds: int) -> datetime:
        return start + timedelta(seconds=seconds)

    keep(book.reserve(PRO, "call", "lease-a", 5, at(0), lease=True).facts)
    keep(book.reserve(PRO, "call", "lease-b", 4, at(1), lease=True).facts)
    keep(book.reserve(BIG, "call", "lease-c", 3, at(1), lease=True).facts)
    keep(book.reserve(PRO, "call", "plain", 1, at(2)).facts)
    for i in range(3):
        keep(book.record_use(PRO, f"req-a{i}", at(3 + i), lease_key="lease-a").facts)
    keep(book.record_use(PRO, "req-a0", at(6), lease_key="lease-a").facts)  # a retry: nothing
    for i in range(5):  # one more than lease-b holds
        keep(book.record_use(PRO, f"req-b{i}", at(7), lease_key="lease-b").facts)
    keep(book.record_use(BIG, "req-c0", at(8), lease_key="lease-c").facts)
    settled = book.commit(PRO.user_id, "plain", at(9))
    keep(settled.facts, settled.reservation)
    settled = book.release(PRO.user_id, "lease-b", "returned", at(10))
    keep(settled.facts, settled.reservation)
    keep(book.record_use(PRO, "req-b9", at(11), lease_key="lease-b").facts)  # after the return
    keep(book.record_use(PRO, "req-a3", at(25), lease_key="lease-a").facts)  # after midnight: November's
    keep(book.expire(at(35)))  # lease-a and lease-c expire
    keep(book.record_use(PRO, "req-a4", at(36), lease_key="lease-a").facts)  # after the expiry
    keep(book.reserve(PRO, "call", "lease-a", 5, at(37), lease=True).facts)  # the key leased again
    keep(book.record_use(PRO, "req-a5", at(38), lease_key="lease-a").facts)
    return book, log


def assert_rebuilds(live: Ledger, facts: list[Fact]) -> None:
    rebuilt = ledger()
    rebuilt.apply_all(facts)
    assert differences(snapshot(live, 0), snapshot(rebuilt, 0)) == []
    assert snapshot(rebuilt, 0) == snapshot(live, 0)
    rebuilt.apply_all(facts)  # a redelivered log changes nothing
    assert differences(snapshot(live, 0), snapshot(rebuilt, 0)) == []
    assert rebuilt.leased == live.leased  # not in the snapshot: compared on their own
    assert {rid: (r.state, r.used, r.lease) for rid, r in rebuilt.reservations.items()} == {
        rid: (r.state, r.used, r.lease) for rid, r in live.reservations.items()
    }
    assert rebuilt.anomalies == []


def test_the_lease_history_rebuilds_the_live_ledger_after_every_step() -> None:
    book, log = lease_history()
    facts = [f for f, _ in log]
    assert sum(isinstance(f, Reserved) and f.lease for f in facts) == 4
    spent = [f for f in facts if isinstance(f, Reserved) and f.from_lease is not None]
    assert len(spent) == 3 + 4 + 1 + 1 + 1
    on_their_own = [f for f in facts if isinstance(f, Reserved) and f.charged and f.from_lease is None]
    assert [f.key for f in on_their_own] == ["req-b4", "req-b9", "req-a4"]
    assert {f.key: f.period_start for f in spent if f.key in ("req-a3", "req-a5")} == {
        "req-a3": NOVEMBER,  # the first lease-a was taken in November
        "req-a5": DECEMBER,  # the second in December
    }
    # November: plain, a0-a2, b0-b3, b4 and b9 (on their own), a3 (lease-a's unit after midnight)
    assert book.calls[(PRO.user_id, NOVEMBER)].charged == 1 + 3 + 4 + 2 + 1
    assert book.calls[(PRO.user_id, NOVEMBER)].held == 0
    assert book.calls[(PRO.user_id, DECEMBER)].charged == 2  # a4 (on its own), a5
    assert book.calls[(PRO.user_id, DECEMBER)].held == 4  # the second lease-a, one unit spent
    assert book.unspent_leases(PRO.user_id) == 4
    assert book.unspent_leases(BIG.user_id) == 0


# -- the store and the stream -----------------------------------------------------------------
META = {"actor": {"kind": "user", "id": "u-pro", "key_id": "k-1"}, "correlation_id": "corr-1"}
MAPPER = QuotaMapper(transcoder=JSONTranscoder())


def through_the_store(fact: Fact, reservation: Reservation | None, position: int) -> tuple[Any, Notification]:
    """The fact as the writer records it, read back as the notification the relay selects."""
    stored = MAPPER.to_stored_event(recordable(fact, reservation, META))
    notification = Notification(
        originator_id=stored.originator_id,
        originator_version=stored.originator_version,
        topic=stored.topic,
        state=stored.state,
        id=position,
    )
    return MAPPER.to_domain_event(notification), notification


def test_lease_facts_survive_the_store() -> None:
    book, log = lease_history()
    back: list[Fact] = []
    for position, (fact, reservation) in enumerate(log, start=1):
        event, _ = through_the_store(fact, reservation, position)
        again = fact_of(event)
        assert again == fact
        assert again is not None
        back.append(again)
    leases = [f for f in back if isinstance(f, Reserved) and f.lease]
    uses = [f for f in back if isinstance(f, Reserved) and f.from_lease is not None]
    assert len(leases) == 4 and len(uses) == 10
    assert_rebuilds(book, back)


def test_lease_facts_survive_the_stream() -> None:
    book, log = lease_history()
    back: list[Fact] = []
    payloads: list[object] = []
    for position, (fact, reservation) in enumerate(log, start=1):
        event, notification = through_the_store(fact, reservation, position)
        out = translate(event)
        assert out is not None
        envelope = envelope_for(notification, event.timestamp, out)
        received = decode_envelope(encode_envelope(envelope))
        payloads.append(decode_payload(received))
        again = fact_from_stream(received)
        assert again == fact, envelope.type
        assert again is not None
        back.append(again)
    public_leases = [p for p in payloads if isinstance(p, ev.Reserved) and p.lease]
    public_uses = [p for p in payloads if isinstance(p, ev.UsageRecorded) and p.lease_id is not None]
    assert len(public_leases) == 4 and len(public_uses) == 10
    assert all(not p.held for p in public_uses)  # each opens and charges its own reservation
    leases = [f for f in back if isinstance(f, Reserved) and f.lease]
    uses = [f for f in back if isinstance(f, Reserved) and f.from_lease is not None]
    assert [f.reservation_id for f in leases] == [p.reservation_id for p in public_leases]
    assert [f.from_lease for f in uses] == [p.lease_id for p in public_uses]
    assert_rebuilds(book, back)
