"""The server limit as mcp_proxy drives the ledger (hypothesis), with no I/O.

mcp_proxy registers a user's server as: reserve `server:user:<name>` -> record the
registration -> commit; a name already registered commits (the unit is its own); any other
failure releases; removing the server releases. This machine runs that protocol on the real
ledger, with crashes between the steps, expiries and tier changes, against a plain model.
"""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from services.quota.domain import (
    SERVER_RETRY_AFTER_S,
    Account,
    Fact,
    Ledger,
    Limits,
    TierTable,
    differences,
    snapshot,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
TIMEOUT = timedelta(seconds=120)
TIERS = TierTable(
    {
        "free": Limits(calls=5, builds=1, servers=1),
        "pro": Limits(calls=5, builds=3, servers=3),
        "team": Limits(calls=5, builds=10, servers=None),
    }
)
NAMES = ["github", "jira", "notes", "wiki", "spark"]
USER, ORG = "u-1", "o-1"


def key(name: str) -> str:
    return f"server:user:{name}"


class ServerRegistry(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(TIERS, "month", TIMEOUT)
        self.now = T0
        self.tier = "free"
        self.facts: list[Fact] = []
        self.catalog: set[str] = set()  # what mcp_proxy has recorded
        self.units: dict[str, str] = {}  # name -> "held" | "committed" | "released" (the model)
        self.expiring: dict[str, datetime] = {}  # held units and when they expire

    @property
    def account(self) -> Account:
        return Account(USER, ORG, self.tier)

    def _live(self) -> set[str]:
        return {n for n, state in self.units.items() if state != "released"}

    def _reserve(self, name: str) -> bool:
        live_before = self._live()
        limit = TIERS.limits(self.tier).servers
        decision = self.ledger.reserve(self.account, "server", key(name), 1, self.now)
        self.facts.extend(decision.facts)
        if name in live_before:
            assert decision.granted and self._live() == live_before  # a name counts once
            return True
        fits = limit is None or len(live_before) < limit
        assert decision.granted == fits
        if not fits:
            assert decision.sentence and decision.sentence.startswith("Server limit reached")
            assert decision.retry_after_s == SERVER_RETRY_AFTER_S
            return False
        self.units[name] = "held"
        self.expiring[name] = self.now + TIMEOUT
        return True

    def _settle(self, name: str, verb: str) -> None:
        if verb == "commit":
            settled = self.ledger.commit(USER, key(name), self.now)
            expected = self.units.get(name) == "held"
        else:
            settled = self.ledger.release(USER, key(name), "removed", self.now)
            expected = self.units.get(name) in ("held", "committed")
        self.facts.extend(settled.facts)
        assert settled.changed == expected
        if expected:
            self.units[name] = "committed" if verb == "commit" else "released"
            self.expiring.pop(name, None)

    @rule(name=st.sampled_from(NAMES), crash=st.sampled_from([None, None, None, "reserved", "recorded"]))
    def register(self, name: str, crash: str | None) -> None:
        if not self._reserve(name):
            return  # 429: nothing recorded
        if crash == "reserved":
            return  # mcp_proxy died before recording: the hold expires
        if name not in self.catalog:
            self.catalog.add(name)
            if crash == "recorded":
                return  # recorded but never committed: the hold expires, the server is uncounted
        self._settle(name, "commit")  # registered now, or already (409): the unit is the name's

    @rule(name=st.sampled_from(NAMES))
    def registration_fails(self, name: str) -> None:
        """An invalid spec or a store error after the reservation: the unit is given back."""
        if name in self.catalog:
            return  # that would be the 409 path
        if self._reserve(name):
            self._settle(name, "release")

    @rule(name=st.sampled_from(NAMES))
    def remove(self, name: str) -> None:
        self.catalog.discard(name)  # a 404 for an unknown name releases too (a unit left behind)
        self._settle(name, "release")

    @rule(tier=st.sampled_from(["free", "pro", "team"]))
    def change_tier(self, tier: str) -> None:
        self.tier = tier  # takes effect at the next reservation

    @rule(seconds=st.sampled_from([1, 60, 121, 86400]))
    def tick(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)
        expired = self.ledger.expire(self.now)
        self.facts.extend(expired)
        due = {n for n, at in self.expiring.items() if at <= self.now and self.units[n] == "held"}
        assert len(expired) == len(due)
        for name in due:
            self.units[name] = "released"
            del self.expiring[name]

    @invariant()
    def servers_used_is_the_number_of_live_names(self) -> None:
        assert self.ledger.used(USER, "server", self.now) == len(self._live())
        assert self.ledger.usage(self.account, self.now).servers_used == len(self._live())

    @invariant()
    def a_committed_unit_is_a_registered_server(self) -> None:
        committed = {n for n, state in self.units.items() if state == "committed"}
        assert committed <= self.catalog  # never charged for a server that does not exist

    @invariant()
    def the_log_rebuilds_the_same_holdings(self) -> None:
        fresh = Ledger(TIERS, "month", TIMEOUT)
        fresh.apply_all(self.facts)
        fresh.apply_all(self.facts)  # a redelivered log changes nothing
        assert differences(snapshot(self.ledger, 0), snapshot(fresh, 0)) == []


TestServerRegistry = ServerRegistry.TestCase
TestServerRegistry.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_over_the_limit_then_remove_then_upgrade() -> None:
    book = Ledger(TIERS, "month", TIMEOUT)
    free = Account(USER, ORG, "free")
    assert book.reserve(free, "server", key("github"), 1, T0).granted
    book.commit(USER, key("github"), T0)
    assert book.reserve(free, "server", key("github"), 1, T0).state == "committed"  # the same unit
    refused = book.reserve(free, "server", key("jira"), 1, T0)
    assert not refused.granted and refused.retry_after_s == SERVER_RETRY_AFTER_S
    assert refused.sentence == "Server limit reached (1 server). Upgrade to Pro for 3 servers."
    assert book.release(USER, key("github"), "removed", T0).changed
    assert book.reserve(free, "server", key("jira"), 1, T0).granted
    pro = Account(USER, ORG, "pro")
    assert book.reserve(pro, "server", key("notes"), 1, T0).granted
    assert book.usage(pro, T0).servers_used == 2 and book.usage(pro, T0).servers_limit == 3
