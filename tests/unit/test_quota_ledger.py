"""The quota ledger's rules, proven on generated histories (hypothesis), with no I/O."""

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.kit.config import ConfigError
from services.quota.config import load_quota_settings, parse_tiers
from services.quota.domain import (
    DEFAULT_TIERS,
    EXPIRED,
    Account,
    Committed,
    Fact,
    Invalid,
    Ledger,
    Limits,
    Refused,
    Released,
    Reserved,
    TierTable,
    UnknownTier,
    differences,
    fingerprint,
    period_end,
    period_start,
    seconds_until_next,
    snapshot,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
TIERS = TierTable(DEFAULT_TIERS)
FREE = Account("u-free", "o-1", "free")
TIMEOUT = timedelta(seconds=120)


def ledger(limits: Limits | None = None) -> Ledger:
    table = TierTable({"free": limits}) if limits else TIERS
    return Ledger(table, "month", TIMEOUT)


def replayed(facts: list[Fact], limits: Limits | None = None) -> Ledger:
    fresh = ledger(limits)
    fresh.apply_all(facts)
    return fresh


# -- a model-checked history --------------------------------------------------------------
KEYS = [f"k{i}" for i in range(8)]
BIG = Account("u-3", "o-1", "enterprise")  # unlimited calls: its calls may be charged without a hold
LIMITED = [Account("u-1", "o-1", "free"), Account("u-2", "o-2", "free")]
USERS = [*LIMITED, BIG]
ACCOUNTS = {a.user_id: a for a in USERS}
SMALL = Limits(calls=3, builds=1, servers=2)
LIMITS = {"free": SMALL, "enterprise": DEFAULT_TIERS["enterprise"]}
LEASE_TIMEOUT = timedelta(seconds=30)


def machine_ledger() -> Ledger:
    return Ledger(TierTable(LIMITS), "month", TIMEOUT, LEASE_TIMEOUT)


class LedgerMachine(RuleBasedStateMachine):
    """Random reserve / commit / release / expire / clock moves, and leases taken, spent and
    returned by limited users, against a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = machine_ledger()
        self.now = T0
        self.facts: list[Fact] = []
        # model: (user, key) -> [state, kind, amount, period_start, expires_at]
        self.model: dict[tuple[str, str], list[object]] = {}
        self.charges: dict[tuple[str, str], int] = {}
        # (user, key) -> units spent, for the keys whose model entry is a lease
        self.leases: dict[tuple[str, str], int] = {}
        # (user, period) -> calls charged without a unit of their lease and without a limit
        # check (the lease was settled, spent or unknown): only these may push a user over
        self.late: dict[tuple[str, datetime], int] = {}

    def _model_used(self, user: str, kind: str, at: datetime) -> int:
        start = period_start(at)
        total = 0
        for (u, key), (state, k, amount, period, _) in self.model.items():
            if u != user or k != kind or state == "released":
                continue
            if kind == "call" and period != start:
                continue
            if kind == "call" or state in ("held", "committed"):
                # a lease's spent units are charged by the uses' own entries
                total += amount - self.leases.get((u, key), 0)  # type: ignore[operator]
        return total

    def _held_leases(self) -> list[tuple[str, str]]:
        return sorted(k for k in self.leases if self.model[k][0] == "held")

    @rule(
        user=st.sampled_from(USERS),
        key=st.sampled_from(KEYS),
        kind=st.sampled_from(["call", "call", "build_slot", "server"]),
        amount=st.integers(1, 2),
    )
    def reserve(self, user: Account, key: str, kind: str, amount: int) -> None:
        existing = self.model.get((user.user_id, key))
        if (
            existing is not None
            and existing[0] != "released"
            and (existing[1], existing[2]) != (kind, amount)
        ):
            with pytest.raises(Invalid):
                self.ledger.reserve(user, kind, key, amount, self.now)  # type: ignore[arg-type]
            return
        used_before = self._model_used(user.user_id, kind, self.now)
        decision = self.ledger.reserve(user, kind, key, amount, self.now)  # type: ignore[arg-type]
        self.facts.extend(decision.facts)
        limit = LIMITS[user.tier].of(kind)  # type: ignore[arg-type]
        if existing is not None and existing[0] != "released":
            assert decision.granted and not [f for f in decision.facts if isinstance(f, Reserved)]
            return
        fits = limit is None or used_before + amount <= limit
        assert decision.granted == fits
        if fits:
            expires = self.now + TIMEOUT if kind in ("call", "server") else None
            self.model[(user.user_id, key)] = ["held", kind, amount, period_start(self.now), expires]
            self.leases.pop((user.user_id, key), None)
        else:
            assert decision.sentence and not any(isinstance(f, Reserved) for f in decision.facts)

    @rule(user=st.sampled_from(USERS), key=st.sampled_from(KEYS))
    def commit(self, user: Account, key: str) -> None:
        settled = self.ledger.commit(user.user_id, key, self.now)
        self.facts.extend(settled.facts)
        entry = self.model.get((user.user_id, key))
        assert settled.changed == (entry is not None and entry[0] == "held")
        if settled.changed:
            assert entry is not None
            entry[0] = "committed"
            if entry[1] == "call":
                self.charges[(user.user_id, key)] = self.charges.get((user.user_id, key), 0) + 1

    @rule(key=st.sampled_from(KEYS))
    def use(self, key: str) -> None:
        """An unmetered call that reached its upstream, charged without a hold (or after one)."""
        entry = self.model.get((BIG.user_id, key))
        if entry is not None and entry[0] != "released" and entry[1] != "call":
            with pytest.raises(Invalid):
                self.ledger.record_use(BIG, key, self.now)
            return
        settled = self.ledger.record_use(BIG, key, self.now)
        self.facts.extend(settled.facts)
        charges = entry is None or entry[0] in ("held", "released")
        assert settled.changed == charges
        if charges:
            self.charges[(BIG.user_id, key)] = self.charges.get((BIG.user_id, key), 0) + 1
            if entry is not None and entry[0] == "held":
                entry[0] = "committed"
            else:
                self.model[(BIG.user_id, key)] = ["committed", "call", 1, period_start(self.now), None]
                self.leases.pop((BIG.user_id, key), None)

    @rule(user=st.sampled_from(USERS), key=st.sampled_from(KEYS))
    def release(self, user: Account, key: str) -> None:
        settled = self.ledger.release(user.user_id, key, "not used", self.now)
        self.facts.extend(settled.facts)
        entry = self.model.get((user.user_id, key))
        releasable = entry is not None and (
            entry[0] == "held" or (entry[0] == "committed" and entry[1] != "call")
        )
        assert settled.changed == releasable
        if releasable:
            assert entry is not None
            entry[0] = "released"

    @rule(user=st.sampled_from(LIMITED), key=st.sampled_from(KEYS), amount=st.integers(1, 3))
    def take_lease(self, user: Account, key: str, amount: int) -> None:
        existing = self.model.get((user.user_id, key))
        if existing is not None and existing[0] != "released":
            if (existing[1], existing[2]) != ("call", amount):
                with pytest.raises(Invalid):
                    self.ledger.reserve(user, "call", key, amount, self.now, lease=True)
                return
            decision = self.ledger.reserve(user, "call", key, amount, self.now, lease=True)
            assert decision.granted and decision.facts == []  # answers with what the key names
            assert decision.reservation is not None
            assert decision.reservation.lease == ((user.user_id, key) in self.leases)
            return
        used_before = self._model_used(user.user_id, "call", self.now)
        unspent_before = self.ledger.unspent_leases(user.user_id)
        decision = self.ledger.reserve(user, "call", key, amount, self.now, lease=True)
        self.facts.extend(decision.facts)
        fits = used_before + amount <= SMALL.calls  # type: ignore[operator]
        assert decision.granted == fits
        if not fits:
            assert not any(isinstance(f, Reserved) for f in decision.facts)
            assert self.ledger.unspent_leases(user.user_id) == unspent_before
            return
        [fact] = decision.facts
        assert isinstance(fact, Reserved) and fact.lease and not fact.charged and fact.amount == amount
        assert fact.expires_at == self.now + LEASE_TIMEOUT
        assert self.ledger.unspent_leases(user.user_id) == unspent_before + amount
        period = period_start(self.now)
        self.model[(user.user_id, key)] = ["held", "call", amount, period, self.now + LEASE_TIMEOUT]
        self.leases[(user.user_id, key)] = 0

    @rule(user=st.sampled_from(LIMITED), lease_key=st.sampled_from(KEYS), key=st.sampled_from(KEYS))
    def use_lease(self, user: Account, lease_key: str, key: str) -> None:
        """A use naming any key as its lease (held, settled, spent, no lease at all)."""
        self._use(user, lease_key, key)

    @precondition(lambda self: len(self._held_leases()) > 0)
    @rule(data=st.data(), key=st.sampled_from(KEYS))
    def use_held_lease(self, data: st.DataObject, key: str) -> None:
        """A use of a lease still held (fresh key: a unit spent if one is left)."""
        user_id, lease_key = data.draw(st.sampled_from(self._held_leases()))
        self._use(ACCOUNTS[user_id], lease_key, key)

    def _use(self, user: Account, lease_key: str, key: str) -> None:
        """A call its taker ran on a lease (`lease_key`), charged under its request `key`: a key
        seen before is a retry (charged once), a fresh one spends a unit if the lease has one."""
        entry = self.model.get((user.user_id, key))
        if entry is not None and entry[0] != "released" and entry[1] != "call":
            with pytest.raises(Invalid):
                self.ledger.record_use(user, key, self.now, lease_key=lease_key)
            return
        lease = self.model.get((user.user_id, lease_key))
        units = self.leases.get((user.user_id, lease_key))
        used_before = self.ledger.used(user.user_id, "call", self.now)
        unspent_before = self.ledger.unspent_leases(user.user_id)
        settled = self.ledger.record_use(user, key, self.now, lease_key=lease_key)
        self.facts.extend(settled.facts)
        if entry is not None and entry[0] == "committed":  # a retry: nothing changes
            assert not settled.changed and settled.facts == []
            assert self.ledger.unspent_leases(user.user_id) == unspent_before
            return
        assert settled.changed
        self.charges[(user.user_id, key)] = self.charges.get((user.user_id, key), 0) + 1
        if entry is not None and entry[0] == "held":  # its own hold (a lease: all of it) is committed
            assert [type(f) for f in settled.facts] == [Committed]
            entry[0] = "committed"
            return
        [fact] = settled.facts
        assert isinstance(fact, Reserved) and fact.charged and fact.amount == 1
        spends = (
            units is not None
            and lease is not None
            and lease[0] == "held"
            and units < lease[2]  # type: ignore[operator]
            and lease_key != key
        )
        self.leases.pop((user.user_id, key), None)  # a released lease's key opened as a call
        if spends:
            assert lease is not None and units is not None
            found = self.ledger.find(user.user_id, lease_key)
            assert found is not None and fact.from_lease == found.reservation_id
            assert fact.period_start == lease[3]  # the lease's period
            self.leases[(user.user_id, lease_key)] = units + 1
            self.model[(user.user_id, key)] = ["committed", "call", 1, lease[3], None]
            assert self.ledger.used(user.user_id, "call", self.now) == used_before
            assert self.ledger.unspent_leases(user.user_id) == unspent_before - 1
        else:
            assert fact.from_lease is None
            period = period_start(self.now)
            assert fact.period_start == period
            self.late[(user.user_id, period)] = self.late.get((user.user_id, period), 0) + 1
            self.model[(user.user_id, key)] = ["committed", "call", 1, period, None]
            assert self.ledger.used(user.user_id, "call", self.now) == used_before + 1
            assert self.ledger.unspent_leases(user.user_id) == unspent_before

    @precondition(lambda self: len(self._held_leases()) > 0)
    @rule(data=st.data())
    def return_lease(self, data: st.DataObject) -> None:
        user, key = data.draw(st.sampled_from(self._held_leases()))
        entry = self.model[(user, key)]
        unspent = entry[2] - self.leases[(user, key)]  # type: ignore[operator]
        period: datetime = entry[3]  # type: ignore[assignment]
        used_before = self.ledger.used(user, "call", period)
        unspent_before = self.ledger.unspent_leases(user)
        settled = self.ledger.release(user, key, "returned", self.now)
        self.facts.extend(settled.facts)
        assert settled.changed and [type(f) for f in settled.facts] == [Released]
        entry[0] = "released"
        assert self.ledger.used(user, "call", period) == used_before - unspent  # only the unspent
        assert self.ledger.unspent_leases(user) == unspent_before - unspent

    @rule(seconds=st.sampled_from([1, 30, 90, 121, 3600, 40 * 86400]))
    def tick(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)
        facts = self.ledger.expire(self.now)
        self.facts.extend(facts)
        expected = {
            k
            for k, e in self.model.items()
            if e[0] == "held" and e[4] is not None and e[4] <= self.now  # type: ignore[operator]
        }
        found = [self.ledger.reservations[f.reservation_id] for f in facts]  # type: ignore[union-attr]
        got = {(r.user_id, r.key) for r in found}
        assert got == expected
        assert all(isinstance(f, Released) and f.reason == EXPIRED for f in facts)
        for k in expected:
            self.model[k][0] = "released"
            if k in self.leases:  # a lease expires after its own, shorter, timeout
                assert self.model[k][4] == self.ledger.find(*k).reserved_at + LEASE_TIMEOUT  # type: ignore[union-attr]

    @precondition(lambda self: len(self.facts) > 0)
    @rule()
    def prune(self) -> None:
        before = snapshot(self.ledger, 0)
        self.ledger.prune(self.now)
        assert snapshot(self.ledger, 0) == before  # forgetting settled keys changes no balance
        for user, key in list(self.model):  # forgotten keys are new again
            if self.ledger.find(user, key) is None:
                del self.model[(user, key)]
                self.charges.pop((user, key), None)
                self.leases.pop((user, key), None)

    @invariant()
    def never_over_any_limit(self) -> None:
        """Reservations never take a user over a limit; a call charged after its lease was
        settled or spent is not checked (it happened), so only those may exceed it."""
        for user in USERS:
            for kind in ("call", "build_slot", "server"):
                used = self.ledger.used(user.user_id, kind, self.now)  # type: ignore[arg-type]
                assert used == self._model_used(user.user_id, kind, self.now)
                limit = LIMITS[user.tier].of(kind)  # type: ignore[arg-type]
                late = self.late.get((user.user_id, period_start(self.now)), 0) if kind == "call" else 0
                assert limit is None or used - late <= limit

    @invariant()
    def unspent_leases_are_the_unspent_units_of_held_leases(self) -> None:
        for user in USERS:
            in_model = 0
            for k, spent in self.leases.items():
                state, _, amount, _, _ = self.model[k]
                if k[0] == user.user_id and state == "held":
                    in_model += amount - spent  # type: ignore[operator]
            in_ledger = sum(
                r.unspent
                for r in self.ledger.reservations.values()
                if r.user_id == user.user_id and r.lease and r.state == "held"
            )
            assert self.ledger.unspent_leases(user.user_id) == in_model == in_ledger
            assert in_ledger >= 0
        for (user_id, key), spent in self.leases.items():
            found = self.ledger.find(user_id, key)
            assert found is not None and found.lease and found.used == spent
            assert 0 <= found.used <= found.amount

    @invariant()
    def charged_at_most_once_per_key(self) -> None:
        assert all(n == 1 for n in self.charges.values())

    @invariant()
    def the_facts_rebuild_the_same_ledger_even_when_repeated(self) -> None:
        live = snapshot(self.ledger, 0)
        once = machine_ledger()
        once.apply_all(self.facts)
        assert snapshot(once, 0) == live
        twice = machine_ledger()
        twice.apply_all(self.facts)
        twice.apply_all(self.facts)  # a redelivered log changes nothing
        assert differences(live, snapshot(twice, 0)) == []


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- targeted properties ------------------------------------------------------------------
@given(callers=st.integers(1, 200), limit=st.integers(0, 60))
def test_exactly_limit_distinct_keys_are_granted(callers: int, limit: int) -> None:
    book = ledger(Limits(calls=limit, builds=1, servers=1))
    granted = sum(book.reserve(FREE, "call", f"req-{i}", 1, T0).granted for i in range(callers))
    assert granted == min(callers, limit)


@given(retries=st.integers(1, 30), commit_every=st.integers(1, 5))
def test_the_same_key_retried_is_reserved_and_charged_once(retries: int, commit_every: int) -> None:
    book = ledger()
    facts: list[Fact] = []
    for i in range(retries):
        facts += book.reserve(FREE, "call", "same-request", 1, T0 + timedelta(seconds=i)).facts
        if i % commit_every == 0:
            facts += book.commit(FREE.user_id, "same-request", T0 + timedelta(seconds=i)).facts
    assert sum(isinstance(f, Reserved) for f in facts) == 1
    assert sum(isinstance(f, Committed) for f in facts) == 1
    assert book.used(FREE.user_id, "call", T0) == 1
    assert book.charged_total == 1


@given(key=st.text(min_size=1, max_size=20).filter(str.isprintable), reserve_first=st.booleans())
def test_settling_an_unknown_or_settled_key_changes_nothing(key: str, reserve_first: bool) -> None:
    book = ledger()
    if reserve_first:
        book.reserve(FREE, "call", key, 1, T0)
        assert book.commit(FREE.user_id, key, T0).changed
    before = snapshot(book, 0)
    for _ in range(3):
        assert not book.commit(FREE.user_id, key, T0).changed
        assert not book.release(FREE.user_id, key, "gone", T0).changed
        assert not book.commit("someone-else", key, T0).changed
    assert snapshot(book, 0) == before


@given(
    reserved_at=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
    ),
    delay=st.timedeltas(min_value=timedelta(0), max_value=timedelta(seconds=119)),
)
def test_a_charge_lands_in_the_period_of_its_reservation(reserved_at: datetime, delay: timedelta) -> None:
    book = ledger()
    book.reserve(FREE, "call", "k", 1, reserved_at)
    committed_at = reserved_at + delay
    assert book.commit(FREE.user_id, "k", committed_at).changed
    start = period_start(reserved_at)
    assert book.calls[(FREE.user_id, start)].charged == 1
    if period_start(committed_at) != start:  # the month turned in between
        assert book.used(FREE.user_id, "call", committed_at) == 0


def test_period_boundaries_are_utc_calendar_months() -> None:
    assert period_start(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)) == datetime(2026, 12, 1, tzinfo=UTC)
    assert period_end(datetime(2026, 12, 1, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)
    assert seconds_until_next(datetime(2026, 11, 30, 23, 59, 0, 500, tzinfo=UTC)) == 60


def test_the_free_users_51st_call_is_refused_with_the_sentence_then_pro_allows_it() -> None:
    book = ledger()
    for i in range(50):
        assert book.reserve(FREE, "call", f"r{i}", 1, T0).granted
        book.commit(FREE.user_id, f"r{i}", T0)
    refused = book.reserve(FREE, "call", "r50", 1, T0)
    assert not refused.granted
    assert refused.sentence == "Monthly quota exceeded (50 calls). Upgrade to Pro for 500 calls/month."
    assert refused.retry_after_s == 3600  # T0 is one hour before December
    assert [type(f) for f in refused.facts] == [Refused]
    again = book.reserve(FREE, "call", "r50", 1, T0 + timedelta(seconds=1))
    assert again.facts == []  # refusals are recorded at most once a minute per user and kind
    upgraded = book.reserve(Account(FREE.user_id, FREE.org_id, "pro"), "call", "r50", 1, T0)
    assert upgraded.granted and upgraded.limit == 500 and upgraded.used == 51


def test_sentences_for_slots_and_the_top_tier() -> None:
    book = ledger()
    assert book.reserve(FREE, "build_slot", "b1", 1, T0).granted
    build = book.reserve(FREE, "build_slot", "b2", 1, T0)
    assert (
        build.sentence == "Concurrent build limit reached (1 build). Upgrade to Pro for 3 concurrent builds."
    )
    assert build.retry_after_s == 30
    assert book.reserve(FREE, "server", "s1", 1, T0).granted
    server = book.reserve(FREE, "server", "s2", 1, T0)
    assert server.sentence == "Server limit reached (1 server). Upgrade to Pro for 10 servers."
    assert server.retry_after_s == 60  # waiting frees nothing, but clients must not spin
    team = Account("u-team", "o-1", "team")
    book = Ledger(TierTable({**DEFAULT_TIERS, "team": Limits(calls=1, builds=10, servers=50)}), "month")
    book.reserve(team, "call", "t1", 1, T0)
    assert book.reserve(team, "call", "t2", 1, T0).sentence == (
        "Monthly quota exceeded (1 call). Upgrade to Enterprise for unlimited calls."
    )


def test_committed_slots_stay_in_use_until_released_and_calls_cannot_be_refunded() -> None:
    book = ledger()
    book.reserve(FREE, "build_slot", "b1", 1, T0)
    book.commit(FREE.user_id, "b1", T0)
    assert book.expire(T0 + timedelta(days=30)) == []  # build slots never expire
    assert book.used(FREE.user_id, "build_slot", T0) == 1
    assert book.release(FREE.user_id, "b1", "finished", T0).changed
    assert book.used(FREE.user_id, "build_slot", T0) == 0
    book.reserve(FREE, "call", "c1", 1, T0)
    book.commit(FREE.user_id, "c1", T0)
    assert not book.release(FREE.user_id, "c1", "oops", T0).changed
    assert book.used(FREE.user_id, "call", T0) == 1


def test_an_unsettled_call_expires_and_its_key_can_be_reserved_again() -> None:
    book = ledger()
    first = book.reserve(FREE, "call", "crashed", 1, T0)
    assert book.expire(T0 + TIMEOUT - timedelta(seconds=1)) == []
    expired = book.expire(T0 + TIMEOUT)
    assert [(type(f), f.reason) for f in expired] == [(Released, EXPIRED)]  # type: ignore[union-attr]
    assert book.used(FREE.user_id, "call", T0) == 0
    assert not book.commit(FREE.user_id, "crashed", T0 + TIMEOUT).changed  # too late: not charged
    again = book.reserve(FREE, "call", "crashed", 1, T0 + TIMEOUT)
    assert again.granted and again.reservation and first.reservation
    assert again.reservation.version == 3


@pytest.mark.parametrize("amount", [0, -1, 1001, 10**9, True])
def test_absurd_amounts_are_refused(amount: int) -> None:
    with pytest.raises(Invalid, match="amount"):
        ledger().reserve(FREE, "call", "k", amount, T0)


def test_bad_keys_reasons_kinds_and_tiers_are_refused() -> None:
    book = ledger()
    with pytest.raises(Invalid):
        book.reserve(FREE, "call", "", 1, T0)
    with pytest.raises(Invalid):
        book.reserve(FREE, "call", "x" * 201, 1, T0)
    with pytest.raises(Invalid):
        book.reserve(FREE, "coffee", "k", 1, T0)  # type: ignore[arg-type]
    with pytest.raises(UnknownTier, match="platinum"):
        book.reserve(Account("u", "o", "platinum"), "call", "k", 1, T0)
    book.reserve(FREE, "call", "k", 1, T0)
    with pytest.raises(Invalid, match="expired"):
        book.release(FREE.user_id, "k", EXPIRED, T0)
    with pytest.raises(Invalid, match="already names"):
        book.reserve(FREE, "build_slot", "k", 1, T0)


def test_fingerprints_ignore_what_pruning_forgets() -> None:
    book = ledger()
    book.reserve(FREE, "call", "old", 1, T0 - timedelta(days=70))
    book.commit(FREE.user_id, "old", T0 - timedelta(days=70))
    before = fingerprint(snapshot(book, 7))
    assert book.prune(T0) == 1 and not book.reservations
    assert fingerprint(snapshot(book, 7)) == before


def test_differences_name_the_balance_that_differs() -> None:
    live = ledger()
    live.reserve(FREE, "call", "a", 1, T0)
    live.commit(FREE.user_id, "a", T0)
    assert differences(snapshot(live, 1), snapshot(ledger(), 1)) == [
        "user u-free calls 2026-11 charged: live 1, rebuilt 0",
        "total users: live 1, rebuilt 0",
        "total reservations: live 1, rebuilt 0",
        "total charged calls: live 1, rebuilt 0",
    ]


def test_a_log_with_a_gap_is_reported() -> None:
    book = ledger()
    book.apply(Committed(reservation_id="nope", version=2, at=T0))
    assert book.anomalies and "never reserved" in book.anomalies[0]


# -- configuration ------------------------------------------------------------------------
def test_tiers_default_to_the_brief_and_are_overridden_field_by_field() -> None:
    assert parse_tiers(None)["free"] == Limits(calls=50, builds=1, servers=1)
    tiers = parse_tiers('{"free": {"calls": 100}, "team": {"servers": null}}')
    assert tiers["free"] == Limits(calls=100, builds=1, servers=1)
    assert tiers["team"].servers is None and tiers["team"].calls == 5000
    settings_ = load_quota_settings({"GATEHOUSE_QUOTA_RESERVATION_TIMEOUT_S": "2.5"})
    assert settings_.reservation_timeout == timedelta(seconds=2.5) and settings_.period == "month"


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ('{"platinum": {"calls": 1}}', "unknown tier 'platinum'"),
        ('{"free": {"calls": -1}}', "free.calls"),
        ('{"free": {"calls": 1.5}}', "free.calls"),
        ('{"free": {"minutes": 1}}', "unknown field(s) minutes"),
        ("[1]", "JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_bad_tier_configuration_is_named(raw: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_tiers(raw)


def test_bad_timeouts_and_periods_are_named() -> None:
    with pytest.raises(ConfigError, match="RESERVATION_TIMEOUT"):
        load_quota_settings({"GATEHOUSE_QUOTA_RESERVATION_TIMEOUT_S": "-3"})
    with pytest.raises(ConfigError, match="PERIOD"):
        load_quota_settings({"GATEHOUSE_QUOTA_PERIOD": "fortnight"})
